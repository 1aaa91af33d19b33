"""The completion record: found by id and by the answer's text, bounded in bytes and by age."""

from __future__ import annotations

from lorafleet_gateway.records import Completion, Records


def completion(n: int, text: str | None = None, tokens: int = 10) -> Completion:
    return Completion(
        completion_id=f"c{n}",
        namespace="team-a",
        name="alice",
        version=n,
        prompt_token_ids=list(range(tokens)),
        response_token_ids=list(range(tokens)),
        response_logprobs=[-0.5] * tokens,
        text=text if text is not None else f"answer {n}",
    )


def test_found_by_id_and_by_text_and_the_text_must_be_exact() -> None:
    records = Records(max_bytes=10**6, ttl_seconds=60)
    records.add(completion(1, "Paris is the capital."))
    assert records.find(completion_id="c1") == completion(1, "Paris is the capital.")
    assert records.find(text="Paris is the capital.") == completion(1, "Paris is the capital.")
    assert records.find(text="Paris is the capital") is None
    assert records.find(completion_id="c2") is None


def test_the_least_recently_used_go_first_past_the_byte_bound() -> None:
    size = completion(0).size
    records = Records(max_bytes=3 * size, ttl_seconds=60)
    for n in range(3):
        records.add(completion(n))
    assert records.find(completion_id="c0") is not None  # used: now the most recent
    records.add(completion(3))
    assert [records.find(completion_id=f"c{n}") is not None for n in range(4)] == [True, False, True, True]
    assert records.bytes <= 3 * size and len(records) == 3
    assert records.find(text="answer 1") is None  # its text key went with it


def test_an_old_completion_is_not_found() -> None:
    now = [0.0]
    records = Records(max_bytes=10**6, ttl_seconds=10, clock=lambda: now[0])
    records.add(completion(1))
    now[0] = 9.0
    assert records.find(completion_id="c1") is not None
    now[0] = 20.0
    assert records.find(text="answer 1") is None and len(records) == 0


def test_one_text_answered_twice_is_found_at_its_latest_completion() -> None:
    records = Records(max_bytes=10**6, ttl_seconds=60)
    records.add(completion(1, "same"))
    records.add(completion(2, "same"))
    found = records.find(text="same")
    assert found is not None and found.version == 2
