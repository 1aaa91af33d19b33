"""Hostile input over real HTTP: every request gets a 4xx, never a 5xx, a crash or a changed adapter.

Path traversal in both name fields (plain, percent-encoded, encoded slashes, Unicode look-alikes)
and in the body's module names; deeply nested JSON; token lists far past the limits; the NaN and
Infinity literals Python's JSON parser accepts; wrong types everywhere. One trainer serves the
whole battery; after it, not one file under the trainer's work directory nor its cache changed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.reliability import hostile, killing
from tests.trainer.service import live, payloads

ADAPTER = killing.ROUTE

TRAVERSALS = [
    "..",
    "%2e%2e",
    "%2E%2E",
    "..%2F..%2Fetc",
    "%2e%2e%2f%2e%2e%2fetc",
    "..%5C..%5Cetc",
    "%252e%252e",
    ".hidden",
    "chaos%2Fkilled",
    "%00",
    "a%00b",
    "%E2%80%A4%E2%80%A4",  # ONE DOT LEADER twice: looks like ".."
    "%EF%BC%8E%EF%BC%8E",  # FULLWIDTH FULL STOP twice
    "k%C3%AFlled",  # a non-ASCII letter
    "UPPER",
    "-lead",
    "a" * 254,
]


def _paths() -> list[tuple[str, str]]:
    """(method, path) pairs that put each traversal in the namespace and in the name."""
    out = []
    for bad in TRAVERSALS:
        for ns, name in ((bad, killing.NAME), (killing.NAMESPACE, bad), (bad, bad)):
            base = f"/v1/adapters/{ns}/{name}"
            out += [("PUT", base), ("POST", f"{base}/distill"), ("DELETE", base), ("DELETE", f"{base}/cache")]
            out += [("GET", base), ("GET", f"{base}/export")]
    out += [("GET", "/v1/adapters/../../../etc/passwd"), ("POST", "/v1/adapters/chaos/../killed/distill")]
    return out


def _sample(**changes: Any) -> dict[str, Any]:
    return {**killing.step_samples(0)[0], **changes}


def _distill(**sample_changes: Any) -> bytes:
    return json.dumps({"samples": [_sample(**sample_changes)]}).encode()


BODIES: list[tuple[str, str, bytes]] = [
    # deeply nested JSON, in a field and as the whole body
    ("POST", f"{ADAPTER}/distill", b'{"samples": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    ("POST", f"{ADAPTER}/distill", b"{" + b'"a":{' * 50_000 + b"}" * 50_001),
    ("PUT", ADAPTER, b'{"lora": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    # huge token lists
    ("POST", f"{ADAPTER}/distill", _distill(prompt_token_ids=[5] * 300_000)),
    (
        "POST",
        f"{ADAPTER}/distill",
        _distill(response_token_ids=[5] * 100_000, response_logprobs=[-1.0] * 100_000),
    ),
    ("POST", f"{ADAPTER}/distill", json.dumps({"samples": [_sample()] * 5000}).encode()),
    # NaN / Infinity literals, which Python's json module parses by default
    (
        "POST",
        f"{ADAPTER}/distill",
        _distill().replace(b'"response_logprobs": [', b'"response_logprobs": [NaN, '),
    ),
    (
        "POST",
        f"{ADAPTER}/distill",
        _distill().replace(b'"response_logprobs": [', b'"response_logprobs": [-Infinity, '),
    ),
    ("POST", f"{ADAPTER}/distill", _distill()[:-1] + b', "training": {"learning_rate": NaN}}'),
    ("POST", f"{ADAPTER}/distill", _distill()[:-1] + b', "training": {"learning_rate": Infinity}}'),
    ("POST", f"{ADAPTER}/distill", _distill()[:-1] + b', "training": {"learning_rate": 1e400}}'),
    (
        "PUT",
        ADAPTER,
        b'{"lora": {"rank": NaN, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"]}, "epoch": 2}',
    ),
    (
        "PUT",
        ADAPTER,
        b'{"lora": {"rank": 8, "alpha": Infinity, "dropout": 0.0, "target_modules": ["q_proj"]}, "epoch": 2}',
    ),
    # path traversal and junk in the body's module names
    *[
        ("PUT", ADAPTER, json.dumps(payloads.init_body(epoch=2, target_modules=[m])).encode())
        for m in ("../../etc/passwd", "..", "q_proj/../../x", "\u2024\u2024", "", "q_proj\x00")
    ],
    # wrong types
    ("POST", f"{ADAPTER}/distill", b'{"samples": "all of them"}'),
    ("POST", f"{ADAPTER}/distill", b'{"samples": [1, 2, 3]}'),
    ("POST", f"{ADAPTER}/distill", b'{"samples": []}'),
    ("POST", f"{ADAPTER}/distill", b"[]"),
    ("POST", f"{ADAPTER}/distill", b"null"),
    ("POST", f"{ADAPTER}/distill", b'"x"'),
    ("POST", f"{ADAPTER}/distill", b"{not json"),
    ("POST", f"{ADAPTER}/distill", b"\xff\xfe\x00garbage"),
    ("POST", f"{ADAPTER}/distill", b""),
    ("POST", f"{ADAPTER}/distill", _distill(prompt_token_ids=["5"])),
    ("POST", f"{ADAPTER}/distill", _distill(prompt_token_ids=[5.5])),
    ("POST", f"{ADAPTER}/distill", _distill(prompt_token_ids=[-1])),
    ("POST", f"{ADAPTER}/distill", _distill(prompt_token_ids=[2**63])),
    ("POST", f"{ADAPTER}/distill", _distill(prompt_token_ids=[10**6])),
    ("POST", f"{ADAPTER}/distill", _distill(response_logprobs=[1.0, 2.0])),
    ("POST", f"{ADAPTER}/distill", _distill(response_logprobs="lots")),
    ("POST", f"{ADAPTER}/distill", _distill(feedback=None)),
    ("POST", f"{ADAPTER}/distill", _distill(feedback=["list"])),
    ("POST", f"{ADAPTER}/distill", _distill(system_prompt={"a": 1})),
    ("POST", f"{ADAPTER}/distill", _distill()[:-1] + b', "training": {"learning_rate": "fast"}}'),
    ("POST", f"{ADAPTER}/distill", _distill()[:-1] + b', "training": {"teacher_top_k": -3}}'),
    ("POST", f"{ADAPTER}/distill", _distill()[:-1] + b', "unexpected": true}'),
    ("PUT", ADAPTER, b'{"lora": {"rank": "8"}, "epoch": 2}'),
    ("PUT", ADAPTER, json.dumps(payloads.init_body(epoch=2, rank=-8)).encode()),
    ("PUT", ADAPTER, json.dumps(payloads.init_body(epoch=2, rank=10**9)).encode()),
    ("PUT", ADAPTER, json.dumps(payloads.init_body(epoch=True)).encode()),
    ("PUT", ADAPTER, json.dumps(payloads.init_body(epoch=-1)).encode()),
    ("PUT", ADAPTER, json.dumps(payloads.init_body(epoch="2")).encode()),
    ("PUT", ADAPTER, json.dumps(payloads.init_body(epoch=0)).encode()),  # older epoch: 409
    ("PUT", ADAPTER, json.dumps(payloads.init_body(epoch=2, rank=4)).encode()),  # other shape: 409
]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[tuple[live.LiveTrainer, Path]]:
    workdir = tmp_path_factory.mktemp("hostile")
    trainer = live.start_trainer(workdir, token=killing.TOKEN, model_cache_dir=model_cache)
    c = trainer.client()
    assert c.put(ADAPTER, json=payloads.init_body(epoch=1)).status_code in (200, 201)
    assert c.post(f"{ADAPTER}/distill", json=killing.body(0)).status_code == 200
    yield trainer, workdir
    trainer.stop()


def _battery(server: live.LiveTrainer, requests: list[tuple[str, str, bytes | None]]) -> list[str]:
    problems = []
    for method, path, body in requests:
        status, answer = hostile.raw(server, method, path, body)
        if not 400 <= status < 500:
            problems.append(f"{method} {path[:80]} body={(body or b'')[:60]!r}: {status} {answer[:200]!r}")
        elif status != 404 and b"error" not in answer and b"detail" not in answer:
            problems.append(f"{method} {path[:80]}: {status} without an error message")
    return problems


def test_traversal_in_names_is_refused_and_changes_nothing(server: tuple[live.LiveTrainer, Path]) -> None:
    trainer, workdir = server
    before = hostile.fingerprint(trainer, workdir)
    body = json.dumps(killing.body(1)).encode()
    problems = _battery(trainer, [(m, p, body if m in ("POST", "PUT") else None) for m, p in _paths()])
    assert problems == []
    assert trainer.process.poll() is None
    assert hostile.fingerprint(trainer, workdir) == before


def test_malformed_bodies_are_refused_and_change_nothing(server: tuple[live.LiveTrainer, Path]) -> None:
    trainer, workdir = server
    before = hostile.fingerprint(trainer, workdir)
    problems = _battery(trainer, [(m, p, b) for m, p, b in BODIES])
    assert problems == []
    assert trainer.process.poll() is None
    assert hostile.fingerprint(trainer, workdir) == before
    # And the adapter still trains normally afterwards.
    r = trainer.client().post(f"{ADAPTER}/distill", json=killing.body(1))
    assert r.status_code == 200 and r.json()["version"] == 2


def test_missing_or_wrong_tokens_are_refused(server: tuple[live.LiveTrainer, Path]) -> None:
    trainer, workdir = server
    before = hostile.fingerprint(trainer, workdir)
    body = json.dumps(killing.body(2)).encode()
    for token in ("", "wrong", killing.TOKEN + "x", killing.TOKEN[:-1], killing.TOKEN.upper()):
        for method, path in (
            ("POST", f"{ADAPTER}/distill"),
            ("PUT", ADAPTER),
            ("DELETE", ADAPTER),
            ("GET", ADAPTER),
        ):
            # An empty token sends no authorization header at all.
            status, _ = hostile.raw(trainer, method, path, body if method in ("POST", "PUT") else None, token)
            assert status == 401, f"{method} {path} with token {token!r}: {status}"
    assert hostile.fingerprint(trainer, workdir) == before


def test_epoch_beyond_int64_is_refused(server: tuple[live.LiveTrainer, Path]) -> None:
    # The CRD's status.epoch is an int64; a larger epoch stored here could never be matched by the
    # operator and would lock every later placement out with 409.
    trainer, workdir = server
    before = hostile.fingerprint(trainer, workdir)
    for epoch in (2**63, 2**70):
        status, answer = hostile.raw(
            trainer, "PUT", ADAPTER, json.dumps(payloads.init_body(epoch=epoch)).encode()
        )
        assert status == 422 and b"epoch" in answer, (epoch, status, answer[:200])
    assert hostile.fingerprint(trainer, workdir) == before
