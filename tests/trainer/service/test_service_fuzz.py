"""The API fuzzed from its own /openapi.json (schemathesis): no generated request, valid or not,
may get a 5xx, and every answer must match the schema's declared bodies. Deterministic: a fixed
example budget per operation and mode, derandomized generation.

Cases are drawn with each operation's Hypothesis strategy (``as_strategy``) rather than through
schemathesis's pytest plugin, which does not load under pytest 9.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance
from tests.trainer.service import live, payloads
from tests.trainer.service.conftest import TOKEN

EXAMPLES_PER_OPERATION = 20


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[live.LiveTrainer]:
    server = live.start_trainer(tmp_path_factory.mktemp("fuzz"), token=TOKEN, model_cache_dir=model_cache)
    # A real adapter, so generated ids sometimes reach one that exists.
    assert server.client().put("/v1/adapters/a/a", json=payloads.init_body()).status_code == 201
    yield server
    server.stop()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_server_errors(fuzzed: live.LiveTrainer, mode: GenerationMode) -> None:
    api = schemathesis.openapi.from_url(f"{fuzzed.base_url}/openapi.json")
    calls = 0
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10  # probes, openapi-described routes and the v1 API

    for operation in operations:
        if mode is GenerationMode.NEGATIVE and "{" not in operation.path:
            continue  # no parameters and no body: nothing to make invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(
                base_url=fuzzed.base_url,
                headers={"authorization": f"Bearer {TOKEN}"},
                checks=[schemathesis.checks.not_a_server_error, response_schema_conformance],
                timeout=120,
            )

        run()
    assert calls >= EXAMPLES_PER_OPERATION
    assert fuzzed.process.poll() is None, "the fuzzed server died"
