"""CLaaS-shaped feedback through the gateway trains the adapter on its real trainer.

A real ``lorafleet-trainer serve`` (builtin:tiny, auth on) and the gateway's app on a real HTTP
server. CLaaS's documented bodies, verbatim, single and batch, become distill steps (the answers
were never served through this gateway, so each is scored first, and the answer says so); bad
input, unknown adapters and tokens of another namespace are refused by name and change nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from tests.gateway import live_gateway
from tests.gateway.test_claas import BATCH, SINGLE
from tests.trainer.service import live

from lorafleet_gateway.app import Gateway
from lorafleet_gateway.directory import Adapter

pytest.importorskip("lorafleet_trainer")

TRAINER_TOKEN = "trainer-secret-1"
TOKENS = {"tok-a": ["team-a"], "tok-b": ["team-b"]}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[live.LiveTrainer]:
    running = live.start_trainer(
        tmp_path_factory.mktemp("trainer"), token=TRAINER_TOKEN, args=["--threads", "1"]
    )
    try:
        for name in ("alice", "bob"):
            put = running.client().put(f"/v1/adapters/team-a/{name}", json={"lora": {"rank": 4}, "epoch": 1})
            assert put.status_code == 201, put.text
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def gateway(trainer: live.LiveTrainer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    files = tmp_path_factory.mktemp("gateway")
    (files / "tokens.json").write_text(json.dumps(TOKENS))
    (files / "trainer-token").write_text(TRAINER_TOKEN + "\n")
    known = [
        Adapter("team-a", "alice", "alice", trainer.base_url),
        Adapter("team-a", "bob", "bob-v1", trainer.base_url),
    ]
    with live_gateway.serving(
        known, tokens_file=files / "tokens.json", trainer_token_file=files / "trainer-token"
    ) as (url, _):
        yield url


def version(trainer: live.LiveTrainer, name: str) -> int:
    return int(trainer.client().get(f"/v1/adapters/team-a/{name}").json()["version"])


def post(url: str, body: object, token: str | None = "tok-a") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{url}/v1/feedback", json=body, headers=headers, timeout=300)


def test_claas_bodies_verbatim_become_steps(gateway: str, trainer: live.LiveTrainer) -> None:
    before = version(trainer, "alice")
    single = post(gateway, SINGLE)
    assert single.status_code == 200, single.text
    answer = single.json()
    assert answer["status"] == "ok" and answer["lora_id"] == "team-a/alice"
    assert answer["version"] == before + 1 == version(trainer, "alice")
    assert answer["batch_size"] == 1 and answer["results"][0]["samples"] == [f"scored:{before}"]
    assert set(answer["distill_result"]["metadata"]) >= {"distill_loss", "grad_norm"}
    # The answer's total is the whole request, the step's own total is in its result.
    assert answer["timing_ms"]["total"] > answer["results"][0]["timing_ms"]["total"] > 0
    batch = post(gateway, BATCH)
    assert batch.status_code == 200, batch.text
    assert batch.json()["version"] == before + 2 == version(trainer, "alice")  # one step, two samples
    assert batch.json()["batch_size"] == 2


def test_the_served_name_names_the_adapter_too(gateway: str, trainer: live.LiveTrainer) -> None:
    before = version(trainer, "bob")
    answer = post(gateway, {**SINGLE, "lora_id": "bob-v1", "training": {"learning_rate": 1e-4}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["lora_id"] == "team-a/bob" and version(trainer, "bob") == before + 1


@pytest.mark.parametrize(
    ("body", "token", "status", "field"),
    [
        pytest.param(SINGLE, None, 401, "Authorization", id="no-token"),
        pytest.param(SINGLE, "tok-x", 401, "Authorization", id="unknown-token"),
        pytest.param(SINGLE, "tok-b", 403, "lora_id", id="other-namespace"),
        pytest.param({**SINGLE, "lora_id": "team-a/nobody"}, "tok-a", 404, "lora_id", id="unknown-adapter"),
        pytest.param({**SINGLE, "feedback": ""}, "tok-a", 422, "feedback", id="empty-feedback"),
        pytest.param(
            {**SINGLE, "training": {"alpha": 7}}, "tok-a", 422, "training.alpha", id="alpha-out-of-bounds"
        ),
        pytest.param(
            {"requests": [SINGLE, {**SINGLE, "lora_id": "team-a/nobody"}]},
            "tok-a",
            404,
            "requests[1].lora_id",
            id="batch-one-bad",
        ),
        pytest.param("not an object", "tok-a", 422, None, id="not-an-object"),
    ],
)
def test_bad_requests_are_refused_by_name_and_change_nothing(
    gateway: str, trainer: live.LiveTrainer, body: object, token: str | None, status: int, field: str | None
) -> None:
    before = (version(trainer, "alice"), version(trainer, "bob"))
    answer = post(gateway, body, token)
    assert answer.status_code == status, answer.text
    error = answer.json()
    if field is not None:
        assert error["field"] == field and error["error"].startswith(f"{field}: "), error
    assert (version(trainer, "alice"), version(trainer, "bob")) == before


def test_a_body_that_is_not_json_is_refused(gateway: str) -> None:
    answer = httpx.post(
        f"{gateway}/v1/feedback", content=b"{", headers={"Authorization": "Bearer tok-a"}, timeout=30
    )
    assert answer.status_code == 400 and answer.json()["field"] == "body"


def test_models_lists_what_the_token_may_use(gateway: str) -> None:
    mine = httpx.get(f"{gateway}/v1/models", headers={"Authorization": "Bearer tok-a"}, timeout=30).json()
    assert sorted(c["id"] for c in mine["data"]) == ["alice", "bob-v1"]
    theirs = httpx.get(f"{gateway}/v1/models", headers={"Authorization": "Bearer tok-b"}, timeout=30).json()
    assert theirs["data"] == []


def test_a_keyed_retry_through_another_replica_is_answered_not_applied(
    gateway: str, trainer: live.LiveTrainer
) -> None:
    """Two gateway replicas share nothing but the trainer, where the key is committed."""
    body = {**SINGLE, "feedback": "Answer like a sailor."}
    key = {"Authorization": "Bearer tok-a", "Idempotency-Key": "client-retry-1"}
    before = version(trainer, "alice")
    first = httpx.post(f"{gateway}/v1/feedback", json=body, headers=key, timeout=300)
    assert first.status_code == 200, first.text
    assert (first.json()["version"], first.json()["results"][0]["replayed"]) == (before + 1, False)
    known = [Adapter("team-a", "alice", "alice", trainer.base_url)]
    files = trainer.storage.parent / "replica"
    files.mkdir(exist_ok=True)
    (files / "tokens.json").write_text(json.dumps(TOKENS))
    (files / "trainer-token").write_text(TRAINER_TOKEN)
    with live_gateway.serving(
        known, tokens_file=files / "tokens.json", trainer_token_file=files / "trainer-token"
    ) as (replica, _):
        # Not in this replica's record: it scores the response with the current version, so its
        # samples differ from the first step's, and the key still matches (the request's digest).
        again = httpx.post(f"{replica}/v1/feedback", json=body, headers=key, timeout=300)
        assert again.status_code == 200, again.text
        assert again.json()["version"] == before + 1 and again.json()["results"][0]["replayed"]
        assert again.json()["distill_result"] == first.json()["distill_result"]
        other = httpx.post(
            f"{replica}/v1/feedback", json={**body, "feedback": "Shorter."}, headers=key, timeout=300
        )
        assert other.status_code == 409 and other.json()["field"] == "idempotency_key", other.text
    assert version(trainer, "alice") == before + 1


class DropsFirstStepAnswer(ThreadingHTTPServer):
    """A proxy to the trainer that lets the first distill step through and drops its answer: the
    step is applied and committed, and the gateway sees its connection close without a reply."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.dropped = upstream, 0
        super().__init__(("127.0.0.1", 0), _Proxy)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Proxy(BaseHTTPRequestHandler):
    server: DropsFirstStepAnswer

    def _forward(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
        r = httpx.request(
            self.command, self.server.upstream + self.path, content=body, headers=headers, timeout=300
        )
        if self.path.endswith("/distill") and self.server.dropped == 0:
            self.server.dropped += 1
            self.close_connection = True
            return  # the answer is lost after the trainer committed the step
        self.send_response(r.status_code)
        self.send_header("content-type", r.headers.get("content-type", "application/json"))
        self.send_header("content-length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    do_GET = do_POST = do_PUT = _forward

    def log_message(self, *args: object) -> None:
        pass


def test_a_step_whose_answer_was_lost_is_retried_once_and_applied_once(trainer: live.LiveTrainer) -> None:
    proxy = DropsFirstStepAnswer(trainer.base_url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    files = trainer.storage.parent / "lossy"
    files.mkdir(exist_ok=True)
    (files / "trainer-token").write_text(TRAINER_TOKEN)
    try:
        known = [Adapter("team-a", "alice", "alice", proxy.url)]
        with live_gateway.serving(known, trainer_token_file=files / "trainer-token") as (url, _):
            before = version(trainer, "alice")
            answer = httpx.post(f"{url}/v1/feedback", json={**SINGLE, "feedback": "No lists."}, timeout=300)
            assert answer.status_code == 200, answer.text
        assert proxy.dropped == 1
        # The gateway's own key made its retry safe: one step, and the answer is that step's.
        assert answer.json()["version"] == before + 1 == version(trainer, "alice")
        assert answer.json()["results"][0]["replayed"] is True
    finally:
        proxy.shutdown()
        proxy.server_close()


def counted(gw: Gateway) -> dict[tuple[str, str, str], float]:
    """``lorafleet_gateway_requests_total`` by (route, model, code), read from the gateway's registry."""
    return {
        (s.labels["route"], s.labels["model"], s.labels["code"]): s.value
        for family in gw.metrics.registry.collect()
        if family.name == "lorafleet_gateway_requests"
        for s in family.samples
        if s.name == "lorafleet_gateway_requests_total"
    }


def test_requests_are_counted_by_route_template_and_the_adapter_they_resolved_to(
    trainer: live.LiveTrainer,
) -> None:
    files = trainer.storage.parent / "counted"
    files.mkdir(exist_ok=True)
    token = files / "trainer-token"
    token.write_text(TRAINER_TOKEN)
    known = [
        Adapter("team-a", "alice", "alice", trainer.base_url),
        Adapter("team-a", "bob", "bob-v1", trainer.base_url),
    ]
    # No inference server: a chat resolves its adapter, then is answered 503 at once.
    with live_gateway.serving(known, trainer_token_file=token, latest_wait_seconds=0) as (url, gw):
        assert post(url, SINGLE, token=None).status_code == 200
        # A batch over two adapters counts as its first one's.
        batch = {"requests": [{**SINGLE, "lora_id": "bob-v1"}, SINGLE]}
        assert post(url, batch, token=None).status_code == 200
        assert post(url, {**SINGLE, "feedback": ""}, token=None).status_code == 422
        assert post(url, {**SINGLE, "lora_id": "team-a/nobody"}, token=None).status_code == 404
        chat = {"model": "alice", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).status_code == 503
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200
        assert httpx.get(f"{url}/v1/feedback", timeout=30).status_code == 405
        for scanned in ("/wp-login.php", "/v1/adapters/team-a/alice", "/.env"):
            assert httpx.get(f"{url}{scanned}", timeout=30).status_code == 404
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
        page = httpx.get(f"{url}/metrics", timeout=30).text
        assert counted(gw) == {
            ("/v1/feedback", "team-a/alice", "200"): 1.0,
            ("/v1/feedback", "team-a/bob", "200"): 1.0,
            ("/v1/feedback", "", "422"): 1.0,
            ("/v1/feedback", "", "404"): 1.0,
            ("/v1/chat/completions", "team-a/alice", "503"): 1.0,
            ("/v1/models", "", "200"): 1.0,
            ("/v1/feedback", "", "405"): 1.0,
            ("unmatched", "", "404"): 3.0,
            ("/healthz", "", "200"): 1.0,
            ("/metrics", "", "200"): 1.0,
        }
    # The page a scrape reads carries the same labels (a request is counted once it is answered).
    line = 'lorafleet_gateway_requests_total{code="200",model="team-a/bob",route="/v1/feedback"} 1.0'
    assert line in page.splitlines()
    assert "wp-login" not in page
