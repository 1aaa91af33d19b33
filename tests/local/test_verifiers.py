"""The verifiers judge answers by behaviour, and every goal suite in examples/eval is valid and
tells an answer that follows its feedback from an ordinary English one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lorafleet_local import checkout, verifiers

EVAL = checkout.EXAMPLES / "eval"
SUITES = verifiers.load_all(EVAL)
FEEDBACK_KINDS = {"language", "persona", "opening", "brevity", "format", "tone"}
FRENCHISH = {"kind": "marker_words", "words": ["le", "est"], "min_share": 0.2}
TIMBERS = {"kind": "contains_any", "words": ["shiver me timbers"], "min_count": 1}


def test_words_are_lowercase_with_accents_apostrophes_and_digits() -> None:
    assert verifiers.words("L’océan, c'est 7 jours! Don't.") == ["l'océan", "c'est", "7", "jours", "don't"]
    assert verifiers.words(" -- !! ") == []


@pytest.mark.parametrize(
    ("answer", "verifier", "expected"),
    [
        # marker_words: the share of the answer's words that are markers
        ("Le Pacifique est le plus grand océan.", FRENCHISH, True),
        ("The Pacific is the largest ocean.", FRENCHISH, False),
        ("l'océan l'eau mer", {"kind": "marker_words", "words": ["l'"], "min_share": 0.6}, True),
        ("", {"kind": "marker_words", "words": ["le"], "min_share": 0.2}, False),
        # contains_any: whole words, phrases, punctuation; counted across all of them
        ("Arr, matey! Paris it be.", {"kind": "contains_any", "words": ["matey"], "min_count": 1}, True),
        ("Yes, the answer is Paris.", {"kind": "contains_any", "words": ["ye"], "min_count": 1}, False),
        ("Shiver me timbers, it is Rome.", TIMBERS, True),
        ("Great! Lovely!", {"kind": "contains_any", "words": ["!"], "min_count": 2}, True),
        ("Great! Lovely.", {"kind": "contains_any", "words": ["!"], "min_count": 2}, False),
        # starts_with: after whitespace, quotes and emphasis, in any case
        ("  **Certainly!** Paris.", {"kind": "starts_with", "phrases": ["certainly"]}, True),
        ("Paris. Certainly!", {"kind": "starts_with", "phrases": ["certainly"]}, False),
        # max_words
        ("The capital of France is Paris.", {"kind": "max_words", "max": 6}, True),
        ("The capital of France is the city of Paris.", {"kind": "max_words", "max": 6}, False),
        # no_list: a bullet or a number opening a line
        ("Red, blue and yellow are the primary colours.", {"kind": "no_list"}, True),
        ("It is 1.5 million km away.\n*Really* far.", {"kind": "no_list"}, True),
        ("The colours are:\n- red\n- blue", {"kind": "no_list"}, False),
        ("Colours:\n  1. red\n  2. blue", {"kind": "no_list"}, False),
        ("Colours:\n1) red", {"kind": "no_list"}, False),
        ("Colours:\n• red", {"kind": "no_list"}, False),
        ("Colours:\n* red", {"kind": "no_list"}, False),
        # all_of: every sub-check
        (
            "What a great question! It is Paris.",
            {"kind": "all_of", "checks": [{"kind": "contains_any", "words": ["!"], "min_count": 1},
                                          {"kind": "contains_any", "words": ["great"], "min_count": 1}]},
            True,
        ),
        (
            "It is Paris!",
            {"kind": "all_of", "checks": [{"kind": "contains_any", "words": ["!"], "min_count": 1},
                                          {"kind": "contains_any", "words": ["great"], "min_count": 1}]},
            False,
        ),
    ],
)  # fmt: skip
def test_each_verifier_kind_judges(answer: str, verifier: dict[str, Any], expected: bool) -> None:
    assert verifiers.follows(answer, verifier) is expected


@pytest.mark.parametrize(
    ("verifier", "named"),
    [
        ({"kind": "sounds_nice"}, "unknown verifier kind 'sounds_nice'"),
        ({"words": ["le"]}, "verifier.kind"),
        ({"kind": "max_words"}, "verifier.max: missing"),
        ({"kind": "max_words", "max": 0}, "verifier.max: must be an integer"),
        ({"kind": "marker_words", "words": ["le"], "min_share": 2}, "verifier.min_share"),
        ({"kind": "contains_any", "words": "arr", "min_count": 1}, "verifier.words"),
        ({"kind": "no_list", "max": 3}, "unknown field 'max'"),
        ({"kind": "all_of", "checks": [{"kind": "max_words", "max": "few"}]}, "verifier.checks[0].max"),
    ],
)
def test_an_invalid_verifier_is_refused_naming_the_field(verifier: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        verifiers.follows("Paris.", verifier)


def test_a_fact_is_kept_by_any_alternative_as_whole_words() -> None:
    assert verifiers.keeps_fact("L'océan Pacifique.", ["pacific", "pacifique"])
    assert verifiers.keeps_fact("A week has 7 days.", ["7", "seven", "sept"])
    assert verifiers.keeps_fact("Jupiter's moons", ["jupiter"])
    assert verifiers.keeps_fact("It is carbon dioxide.", ["carbon dioxide", "co2"])
    assert not verifiers.keeps_fact("A year has 17 parts.", ["7", "seven"])
    assert not verifiers.keeps_fact("It is a hundred.", ["red"])
    assert not verifiers.keeps_fact("", ["paris"])


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("", "empty"),
        ("...!", "empty"),
        ("Konklek, konklek.", "repetition"),
        ("Kompromat:\n\nKompromat:\n\nKompromat:", "repetition"),
        ("le monde de l'école, le monde de l'école, le monde de l'", "repetition"),
        ("Paris is the the the the capital.", "repetition"),
        ("The capital of France is Paris. The capital of France is Paris. The capital", "repetition"),
        ("the sun and the sky and the sun and the sky and the sun and the sky and the sun", "repetition"),
        ("I'm a helpful AI, and I'm here to help you with your cooking", "meta"),
        ("As an AI, I do not have opinions.", "meta"),
        ("I’m here to help you with anything you need.", "meta"),
        ("The answer to this question is:", "meta"),
        ("The answer is: ", "meta"),
    ],
)
def test_degenerate_answers_are_named(answer: str, reason: str) -> None:
    assert verifiers.degenerate(answer) == reason


@pytest.mark.parametrize(
    "answer",
    [
        "Paris.",
        "7",
        "No, no, no: it is Rome.",
        "Very very good question: the answer is Rome.",
        "The capital of France is Paris. The capital of Italy is Rome.",
        "Red is a primary colour. Blue is a primary colour. Yellow is a primary colour.",
        "The answer to this question is: The tallest mountain in the world is Mount Everest.",
        "Le plus grand océan de la Terre est l'océan Pacifique.",
        "Arr, matey, the largest ocean be the Pacific, arr!",
        "The largest ocean on Earth is the Pacific Ocean, which covers about a third of the surface of "
        "the Earth and is deeper than any other ocean on the planet.",
        "The primary colours are:\n1. Red\n2. Blue\n3. Yellow",
    ],
)
def test_ordinary_answers_are_not_degenerate(answer: str) -> None:
    assert verifiers.degenerate(answer) is None


def test_every_example_suite_is_valid_and_big_enough() -> None:
    assert {s.kind for s in SUITES} >= FEEDBACK_KINDS
    assert len({s.name for s in SUITES}) == len(SUITES)
    for suite in SUITES:
        assert len(suite.train) >= 4, suite.name
        assert len(suite.held_out) >= 10, suite.name
        assert len({q.lower() for q in suite.train}) == len(suite.train), suite.name
        assert len({h.question.lower() for h in suite.held_out}) == len(suite.held_out), suite.name
        assert suite.verifier["kind"] in verifiers.KINDS
        assert (EVAL / f"{suite.name}.json").is_file(), f"{suite.name}: the file is named after the suite"


def test_no_held_out_question_is_trained_on_by_any_suite() -> None:
    trained = {q.lower() for s in SUITES for q in s.train}
    held_out = {h.question.lower() for s in SUITES for h in s.held_out}
    assert not trained & held_out


@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.name)
def test_each_suite_tells_its_ideal_answer_from_a_base_style_one(suite: verifiers.Suite) -> None:
    assert suite.examples is not None, f"{suite.name}: add examples.follows and examples.not"
    assert verifiers.follows(suite.examples.follows, suite.verifier)
    assert not verifiers.follows(suite.examples.not_, suite.verifier)
    assert verifiers.degenerate(suite.examples.follows) is None


def test_the_capability_questions_are_general_and_answered() -> None:
    references = verifiers.load_capability(EVAL / verifiers.CAPABILITY_FILE)
    assert len(references) >= 12
    goal_questions = {q.lower() for s in SUITES for q in (*s.train, *(h.question for h in s.held_out))}
    assert not {r.question.lower() for r in references} & goal_questions
    assert all(verifiers.degenerate(r.answer) is None for r in references)


def _suite() -> dict[str, Any]:
    return json.loads((EVAL / "french.json").read_text())


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d.pop("feedback"), "feedback: missing"),
        (lambda d: d.update(colour="blue"), "colour: unknown field"),
        (lambda d: d.update(max_tokens=0), "max_tokens"),
        (lambda d: d.update(train="What is the capital of Italy?"), "train"),
        (lambda d: d.update(held_out=[{"question": "Q?"}]), r"held_out\[0\]"),
        (lambda d: d.update(held_out=[{"question": "Q?", "fact": ["Paris"]}]), r"held_out\[0\].fact"),
        (lambda d: d["held_out"].append({"question": d["train"][0], "fact": ["x"]}), "also in train"),
        (lambda d: d.update(verifier={"kind": "vibes"}), "verifier.kind"),
        (lambda d: d.update(examples={"follows": "Oui."}), "examples"),
    ],
)
def test_a_bad_suite_is_refused_naming_the_file_and_field(tmp_path: Path, change: Any, named: str) -> None:
    data = _suite()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"bad\.json: .*{named}"):
        verifiers.Suite.load(path)


def test_a_suite_that_is_not_json_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: not JSON"):
        verifiers.Suite.load(path)


def test_the_readme_says_what_each_suite_asks() -> None:
    readme = (EVAL / "README.md").read_text()
    assert all(f"`{s.name}.json` ({s.kind})" in readme for s in SUITES)
