"""LoraFleet's images as built by `make images`, run with podman: what each runs, as whom, where it
may write, and that a trainer image serves builtin:tiny (tests/trainer/test_service_images.py reads
the Dockerfiles; these run what they built)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from lorafleet_local import images, polling, processes

pytestmark = pytest.mark.images

TRAINERS = ("trainer-cpu", "trainer-cuda")
WRITABLE = ("/var/lib/lorafleet", "/var/cache/lorafleet")
USER = "10001:10001"
# Run inside a container as its user: which paths it can create a file in, and who owns them.
PROBE = """
import json, os, sys
out = {"uid": os.getuid(), "gid": os.getgid(), "writable": {}, "owner": {}}
for path in sys.argv[1:]:
    try:
        with open(os.path.join(path, ".probe"), "w") as f:
            f.write("x")
        out["writable"][path] = True
    except OSError:
        out["writable"][path] = False
    st = os.stat(path)
    out["owner"][path] = f"{st.st_uid}:{st.st_gid}"
print(json.dumps(out))
"""


def tag(name: str) -> str:
    image = images.IMAGES[name]
    if not images.exists(image.tag):
        pytest.fail(f"{image.tag} is not built: run `make images`")
    return image.tag


def inspect(name: str) -> dict:
    return json.loads(images.podman("image", "inspect", tag(name)).stdout)[0]["Config"]


def run(name: str, *args: str, entrypoint: str | None = None, read_only: bool = False) -> str:
    flags = [*images.LIMITS, "--rm", "--network", "none"]
    if read_only:
        # As a pod's readOnlyRootFilesystem: no tmpfs on /tmp either (podman adds one by default).
        flags += ["--read-only", "--read-only-tmpfs=false"]
    if entrypoint is not None:
        flags += ["--entrypoint", entrypoint]
    done = images.podman("run", *flags, tag(name), *args, check=False)
    assert done.returncode == 0, f"{name} {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize(
    ("name", "entrypoint", "cmd"),
    [
        ("operator", ["lorafleet-operator"], None),
        ("gateway", ["lorafleet-gateway"], None),
        ("trainer-cpu", ["lorafleet-trainer"], ["serve"]),
        ("trainer-cuda", ["lorafleet-trainer"], ["serve"]),
    ],
)
def test_entrypoint_and_user(name: str, entrypoint: list[str], cmd: list[str] | None) -> None:
    config = inspect(name)
    assert config["Entrypoint"] == entrypoint
    assert config.get("Cmd") == cmd
    assert config["User"] == USER
    # The entrypoint answers as that user (the console script is on PATH and imports), and the user
    # has a name: kopf names the operator's identity after it, and crashed without one on a real node.
    assert "usage:" in run(name, "--help")
    who = "import getpass, os; print(os.getuid(), os.getgid(), getpass.getuser())"
    assert run(name, "-c", who, entrypoint="python") == "10001 10001 lorafleet\n"


@pytest.mark.parametrize(
    ("name", "has"), [("operator", ["kopf", "httpx"]), ("gateway", ["fastapi", "httpx"])]
)
def test_the_control_images_have_no_ml_stack(name: str, has: list[str]) -> None:
    modules = ("kopf", "fastapi", "httpx", "torch", "transformers")
    code = f"import importlib.util as u; print([m for m in {modules!r} if u.find_spec(m)])"
    assert run(name, "-c", code, entrypoint="python") == f"{has!r}\n"


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_writes_only_its_volumes(name: str) -> None:
    config = inspect(name)
    assert set(config["Volumes"]) == set(WRITABLE)
    paths = (*WRITABLE, "/opt/lorafleet", "/opt/python/lib")
    # As the image is: the user owns its two paths and nothing it runs from.
    seen = json.loads(run(name, "-c", PROBE, *paths, entrypoint="python"))
    assert (seen["uid"], seen["gid"]) == (10001, 10001)
    assert seen["writable"] == {p: p in WRITABLE for p in paths}
    assert all(seen["owner"][p] == USER for p in WRITABLE)
    # With a read-only root (the trainer pods' securityContext) the two volumes stay writable.
    seen = json.loads(run(name, "-c", PROBE, *paths, "/tmp", entrypoint="python", read_only=True))
    assert seen["writable"] == {p: p in WRITABLE for p in (*paths, "/tmp")}


@pytest.fixture(params=TRAINERS)
def trainer(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """A trainer container serving builtin:tiny on a loopback port, root filesystem read-only."""
    port = processes.free_port()
    name = f"lorafleet-image-test-{request.param}-{port}"
    images.podman(
        "run",
        *images.LIMITS,
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--read-only-tmpfs=false",
        "--env",
        "LORAFLEET_TRAINER_HOST=127.0.0.1",
        "--env",
        f"LORAFLEET_TRAINER_PORT={port}",
        # No GPU here: the CUDA image runs its CPU path, as it would on a node without one.
        "--env",
        "LORAFLEET_TRAINER_DEVICE=cpu",
        "--env",
        "LORAFLEET_TRAINER_BASE_MODEL=builtin:tiny",
        tag(request.param),
    )
    try:
        yield name, port
    finally:
        images.podman("rm", "--force", "--time", "0", name, check=False)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_trainer_image_serves_builtin_tiny(trainer: tuple[str, int]) -> None:
    name, port = trainer

    def ready_or_stopped() -> str | None:
        if images.podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() != "true":
            return "stopped"
        return "ready" if http_status(f"http://127.0.0.1:{port}/readyz") == 200 else None

    outcome = polling.eventually(f"{name} /readyz", ready_or_stopped, timeout=300, interval=0.5)
    logs = images.podman("logs", name, check=False)
    assert outcome == "ready", f"{name} stopped:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert b"lorafleet_trainer_" in response.read()
    # SIGTERM (what the kubelet sends) ends it cleanly, as PID 1.
    images.podman("stop", "--time", "60", name)
    code = images.podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    assert code == "0", images.podman("logs", name, check=False).stderr[-2000:]
