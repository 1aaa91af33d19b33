"""Settings: environment variables, flags over environment, quantities, errors naming the source."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet_trainer import settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith(settings.ENV_PREFIX):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = settings.load()
    assert s.base_model == "builtin:tiny"
    assert s.max_queue == 32
    assert s.auth_token_file is None
    assert s.host == "127.0.0.1"


def test_every_field_is_settable_from_its_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAFLEET_TRAINER_BASE_MODEL", "/models/qwen")
    monkeypatch.setenv("LORAFLEET_TRAINER_PORT", "9000")
    monkeypatch.setenv("LORAFLEET_TRAINER_STORAGE", str(tmp_path))
    monkeypatch.setenv("LORAFLEET_TRAINER_CACHE_CAPACITY", "48Gi")
    monkeypatch.setenv("LORAFLEET_TRAINER_MAX_QUEUE", "4")
    monkeypatch.setenv("LORAFLEET_TRAINER_MAX_BODY_BYTES", "1Mi")
    monkeypatch.setenv("LORAFLEET_TRAINER_GPU_RESIDENCY", "keep")
    s = settings.load()
    assert (s.base_model, s.port, s.storage, s.max_queue) == ("/models/qwen", 9000, tmp_path, 4)
    assert s.cache_capacity == 48 * 2**30
    assert s.max_body_bytes == 2**20
    assert s.gpu_residency == "keep"


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_TRAINER_MAX_QUEUE", "4")
    assert settings.load({"max_queue": "7"}).max_queue == 7


def test_a_bad_variable_is_named_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_TRAINER_MAX_QUEUE", "lots")
    with pytest.raises(settings.SettingsError, match=r"^LORAFLEET_TRAINER_MAX_QUEUE: "):
        settings.load()


def test_a_bad_flag_is_named_as_a_flag() -> None:
    with pytest.raises(settings.SettingsError, match=r"^--cache-capacity: .*quantity"):
        settings.load({"cache_capacity": "48 gigs"})
    with pytest.raises(settings.SettingsError, match=r"^--device: "):
        settings.load({"device": "tpu"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("1024", 1024), ("1Ki", 1024), ("1.5Gi", 3 * 2**29), ("2M", 2_000_000), ("3k", 3000)],
)
def test_quantities(text: str, expected: int) -> None:
    assert settings.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["-1", "1Zi", "Gi", "", "1e9", True])
def test_bad_quantities(text: object) -> None:
    with pytest.raises(ValueError):
        settings.parse_bytes(text)
