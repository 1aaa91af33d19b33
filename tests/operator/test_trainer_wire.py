"""The operator reads a real trainer's answers through the wire models both import.

``lorafleet_api.wire`` is the one definition of every trainer route's body: the trainer serves it,
the operator's client parses into it, and the handler tests' fake trainer answers with it. Here the
operator's own ``TrainerClient`` drives a real ``lorafleet-trainer serve`` (builtin:tiny) through
an adapter's whole life, and an answer that lacks or renames a field the model requires is an error
the client raises, never a value it guesses.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from tests.chart.operator_side import OperatorSide
from tests.operator.harness import adapter_state
from tests.trainer.service import live, payloads

from lorafleet_api import adapters, wire
from lorafleet_operator.trainers import TrainerAnswerInvalid, TrainerClient, TrainerError

pytest.importorskip("lorafleet_trainer")

NS, NAME = "team-a", "alice"


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[live.LiveTrainer]:
    running = live.start_trainer(tmp_path_factory.mktemp("wire"), args=["--threads", "1"])
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def side() -> Iterator[OperatorSide]:
    operator = OperatorSide(token=None)
    try:
        yield operator
    finally:
        operator.close()


def test_the_operators_client_reads_every_answer_of_a_real_trainer(
    trainer: live.LiveTrainer, side: OperatorSide
) -> None:
    client, base = side.client, trainer.base_url
    spec = adapters.parse_spec({"spec": {"pool": "p", "lora": {"rank": 4}, "serving": {"name": "alice-1"}}})
    assert side.run(client.init(base, NS, NAME, wire.init_request(spec, 1, NAME))) == 201
    state = side.run(client.state(base, NS, NAME))
    assert state is not None
    assert (state.version, state.epoch, state.cached, state.lora.rank) == (0, 1, False, 4)
    assert state.served_name == "alice-1" and state.served == []  # published, to no server yet
    serving = wire.ServingRequest(
        servers=[],
        adapters=[wire.OwnedAdapter(namespace=NS, name=NAME, served_name="alice-1")],
        adapter_root="/mnt/adapters",
    )
    told = side.run(client.set_serving(base, serving))
    assert told.servers == [] and told.adapter_root == "/mnt/adapters"

    step = trainer.client().post(f"/v1/adapters/{NS}/{NAME}/distill", json=payloads.distill_body())
    assert step.status_code == 200, step.text
    state = side.run(client.state(base, NS, NAME))
    assert state is not None and (state.version, state.cached) == (1, True)
    assert state.artifact == wire.DistillResponse.model_validate(step.json()).artifact
    cache = side.run(client.cache(base))
    assert [e.adapter for e in cache.entries] == [f"{NS}/{NAME}"] and cache.used_bytes > 0

    assert side.run(client.evict(base, NS, NAME)) is True
    assert side.run(client.unpublish(base, NS, NAME)) == {}  # no server ever loaded it
    assert side.run(client.delete(base, NS, NAME)) is True
    assert side.run(client.state(base, NS, NAME)) is None


def test_a_refusal_names_its_field_in_the_error_model(trainer: live.LiveTrainer, side: OperatorSide) -> None:
    base = trainer.base_url
    first = adapters.parse_spec({"spec": {"pool": "p", "lora": {"rank": 4}}})
    side.run(side.client.init(base, NS, "bob", wire.init_request(first, 2)))
    with pytest.raises(TrainerError) as refused:
        side.run(side.client.init(base, NS, "bob", wire.init_request(first, 1)))
    assert (refused.value.status, refused.value.field) == (409, "epoch")


@pytest.mark.parametrize(("old", "new"), [("version", None), ("served_name", "published_as")])
def test_an_answer_without_a_required_field_is_refused(old: str, new: str | None) -> None:
    """A trainer that leaves out, or names otherwise, a field the model requires: the client raises
    rather than read the field as absent (which would drop ``status.version``, or switch off the
    Served condition, in silence)."""
    real = adapter_state(3, cached=True, served_name="alice").model_dump(mode="json")
    value = real.pop(old)
    if new is not None:
        real[new] = value
    request = httpx.Request("GET", f"http://127.0.0.1/v1/adapters/{NS}/{NAME}")
    answer = httpx.Response(200, content=json.dumps(real).encode(), request=request)
    with pytest.raises(TrainerAnswerInvalid, match=old):
        TrainerClient._answer(wire.AdapterState, answer)
