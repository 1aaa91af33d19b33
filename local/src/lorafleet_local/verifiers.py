"""Judging an answer by its behaviour: does it follow a goal, keep its fact, or break down?

A goal suite (``examples/eval/<name>.json``) pairs one piece of feedback with questions to train on,
held-out questions each with the fact its answer should keep, and a programmatic ``verifier`` that
says whether an answer follows the feedback. These functions judge one answer at a time and do no
I/O (only ``Suite.load`` reads a file), so the evaluation runner, the demo and the tests share them.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A letter or digit: what may not sit right outside a matched word or phrase.
_WORD_CHAR = r"[^\W_]"
# Words are runs of letters (accents included) and digits, joined by inner apostrophes, so that
# "l'école" and "don't" are one word each and "7" counts as a word of a short answer.
_WORD = re.compile(rf"{_WORD_CHAR}+(?:'{_WORD_CHAR}+)*")
_APOSTROPHES = str.maketrans({"’": "'", "‘": "'", "ʼ": "'"})
# A list item: a bullet or "<digits>." / "<digits>)" opening a line, then a space (or the end, when
# the answer was cut off right after it). The space keeps "1.5 million" and "*bold*" out.
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])(?:\s|$)", re.MULTILINE)
# Quotes and markdown emphasis a model may put before its first word; they do not change the opening.
_OPENING_NOISE = "\"'*_«“ \t\n"

# Degenerate answers. A word said 4 times in a row is never a sentence ("very very very very" at
# most), while 2 or 3 can be ("bye bye", "no, no, no"); the early-step collapse repeats one word.
SAME_WORD_RUN = 4
# A phrase of 2..6 words said again right after itself ("le monde de l'école, le monde de l'école")
# is a loop when the looping stretch is most of the answer; a longer period is left to the
# distinct-word share below, since an ordinary two-sentence answer can repeat a 7-word frame.
LOOP_PERIODS = range(2, 7)
LOOP_SHARE = 0.5
# Ordinary English keeps well over half of 12+ words distinct (function words repeat, content words
# do not); under 40% only a loop or a list of one repeated pattern gets there. Fewer than 12 words
# are too few for a share to mean anything.
MIN_DISTINCT_SHARE = 0.4
DISTINCT_MIN_WORDS = 12
# Replies about the assistant itself instead of an answer: the teacher fell into these when it did
# not read the feedback as an instruction (issue 24).
META_OPENINGS = (
    "i'm a helpful ai",
    "i am a helpful ai",
    "as an ai",
    "as a helpful ai",
    "i'm an ai",
    "i am an ai",
    "i'm here to help you",
    "i am here to help you",
)
# A lead-in that stops before the answer it announces ("The answer to this question is:").
_BARE_LEAD_IN = re.compile(
    r"^(?:the answer(?: to (?:this|the|your) question)? is|here(?:'s| is) (?:the|my) answer)\W*$"
)

CAPABILITY_FILE = "capability.json"


def words(text: str) -> list[str]:
    """The lowercase words of ``text``: letters (accented too) and digits, with inner apostrophes."""
    return _WORD.findall(text.translate(_APOSTROPHES).lower())


def _occurrences(text: str, phrase: str) -> int:
    """How often ``phrase`` occurs in lowercase ``text``, as whole words where it starts or ends in one
    ("ye" is not found in "yes"; "!" is found anywhere)."""
    phrase = phrase.translate(_APOSTROPHES).lower()
    before = rf"(?<!{_WORD_CHAR})" if re.match(_WORD_CHAR, phrase) else ""
    after = rf"(?!{_WORD_CHAR})" if re.search(rf"{_WORD_CHAR}$", phrase) else ""
    return len(re.findall(before + re.escape(phrase) + after, text.translate(_APOSTROPHES).lower()))


# ---- verifiers: one function per kind, each (answer, verifier) -> bool --------------------------


def _marker_words(answer: str, verifier: Mapping[str, Any]) -> bool:
    markers = set(verifier["words"])
    said = words(answer)
    # An elided French article counts by its prefix: "l'océan" is a marker through "l'".
    hits = sum(1 for w in said if w in markers or ("'" in w and w.split("'")[0] + "'" in markers))
    return bool(said) and hits / len(said) >= verifier["min_share"]


def _contains_any(answer: str, verifier: Mapping[str, Any]) -> bool:
    return bool(sum(_occurrences(answer, w) for w in verifier["words"]) >= verifier["min_count"])


def _starts_with(answer: str, verifier: Mapping[str, Any]) -> bool:
    opening = answer.translate(_APOSTROPHES).lower().lstrip(_OPENING_NOISE)
    return any(opening.startswith(p.lower()) for p in verifier["phrases"])


def _max_words(answer: str, verifier: Mapping[str, Any]) -> bool:
    return bool(len(words(answer)) <= verifier["max"])


def _no_list(answer: str, verifier: Mapping[str, Any]) -> bool:
    return _LIST_ITEM.search(answer) is None


def _all_of(answer: str, verifier: Mapping[str, Any]) -> bool:
    return all(follows(answer, check) for check in verifier["checks"])


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def _share(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _checks(value: Any) -> bool:
    # Each sub-check is validated by check_verifier itself; here only that there is a list of them.
    return isinstance(value, list) and bool(value)


# kind -> (judge, {field: (is it valid, what it must be)}): one table for judging and validating.
_Field = tuple[Callable[[Any], bool], str]
_KINDS: dict[str, tuple[Callable[[str, Mapping[str, Any]], bool], dict[str, _Field]]] = {
    "marker_words": (
        _marker_words,
        {"words": (_strings, "a list of words"), "min_share": (_share, "a number in (0, 1]")},
    ),
    "contains_any": (
        _contains_any,
        {"words": (_strings, "a list of words or phrases"), "min_count": (_count, "an integer >= 1")},
    ),
    "starts_with": (_starts_with, {"phrases": (_strings, "a list of phrases")}),
    "max_words": (_max_words, {"max": (_count, "an integer >= 1")}),
    "no_list": (_no_list, {}),
    "all_of": (_all_of, {"checks": (_checks, "a non-empty list of verifiers")}),
}
KINDS = tuple(_KINDS)


def check_verifier(verifier: Any, where: str = "verifier") -> None:
    """Raise ValueError naming the field (``where`` is its path) when ``verifier`` is not valid."""
    if not isinstance(verifier, Mapping):
        raise ValueError(f"{where} must be an object with a 'kind'")
    kind = verifier.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{where}.kind: unknown verifier kind {kind!r}; known: {', '.join(KINDS)}")
    fields = _KINDS[kind][1]
    for name, (valid, what) in fields.items():
        if name not in verifier:
            raise ValueError(f"{where}.{name}: missing ({kind} needs {what})")
        if not valid(verifier[name]):
            raise ValueError(f"{where}.{name}: must be {what}, got {verifier[name]!r}")
    extra = sorted(set(verifier) - {"kind", *fields})
    if extra:
        raise ValueError(f"{where}: unknown field {extra[0]!r} for kind {kind!r}")
    if kind == "all_of":
        for i, check in enumerate(verifier["checks"]):
            check_verifier(check, f"{where}.checks[{i}]")


def follows(answer: str, verifier: Mapping[str, Any]) -> bool:
    """Whether ``answer`` follows the goal ``verifier`` describes (ValueError if it is not valid)."""
    check_verifier(verifier)
    return _KINDS[verifier["kind"]][0](answer, verifier)


def keeps_fact(answer: str, fact: Sequence[str]) -> bool:
    """Whether any alternative of ``fact`` ("pacific", "pacifique") is in the answer, as whole words."""
    return any(_occurrences(answer, alternative) for alternative in fact)


# ---- degenerate answers ------------------------------------------------------------------------


def _longest_loop(said: list[str], period: int) -> int:
    """The most words in one stretch that repeats itself every ``period`` words (0 if none does)."""
    longest = run = 0
    for i in range(len(said) - period):
        run = run + 1 if said[i] == said[i + period] else 0
        # A stretch of `run` matches spans run + period words; it loops only once a whole period
        # came back (run >= period), not when two sentences merely share a word.
        if run >= period:
            longest = max(longest, run + period)
    return longest


def degenerate(answer: str) -> str | None:
    """Why ``answer`` is no answer at all: "empty", "repetition" or "meta"; None for a real answer."""
    said = words(answer)
    if not said:
        return "empty"
    if len(said) >= 2 and len(set(said)) == 1:
        return "repetition"  # one word said again and again: "Konklek, konklek."
    if max(len(list(run)) for _, run in itertools.groupby(said)) >= SAME_WORD_RUN:
        return "repetition"
    if any(_longest_loop(said, p) >= LOOP_SHARE * len(said) for p in LOOP_PERIODS):
        return "repetition"
    if len(said) >= DISTINCT_MIN_WORDS and len(set(said)) < MIN_DISTINCT_SHARE * len(said):
        return "repetition"
    opening = answer.translate(_APOSTROPHES).strip().lower()
    if opening.startswith(META_OPENINGS) or _BARE_LEAD_IN.match(opening):
        return "meta"
    return None


# ---- goal suites -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    question: str
    fact: tuple[str, ...]  # lowercase alternatives; any one in the answer keeps the fact


@dataclass(frozen=True)
class Examples:
    """Two hand-written answers the suite's verifier must tell apart (a check of the verifier)."""

    follows: str
    not_: str


_SUITE_FIELDS = {"name", "kind", "feedback", "system_prompt", "max_tokens", "train", "held_out", "verifier"}
_OPTIONAL_FIELDS = {"examples"}


@dataclass(frozen=True)
class Suite:
    name: str
    kind: str  # the kind of feedback: language, persona, opening, brevity, format, tone, ...
    feedback: str
    system_prompt: str
    max_tokens: int
    train: tuple[str, ...]
    held_out: tuple[HeldOut, ...]
    verifier: Mapping[str, Any]
    examples: Examples | None = None

    @classmethod
    def load(cls, path: Path) -> Suite:
        """Read and validate one suite file; ValueError naming the file and the field when invalid."""
        try:
            return cls.parse(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON: {e}") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def parse(cls, data: Any) -> Suite:
        """Validate one suite's decoded JSON; ValueError naming the field when invalid."""
        if not isinstance(data, dict):
            raise ValueError("a suite must be a JSON object")
        missing = sorted(_SUITE_FIELDS - set(data))
        if missing:
            raise ValueError(f"{missing[0]}: missing")
        extra = sorted(set(data) - _SUITE_FIELDS - _OPTIONAL_FIELDS)
        if extra:
            raise ValueError(f"{extra[0]}: unknown field")
        for name in ("name", "kind", "feedback"):
            if not isinstance(data[name], str) or not data[name].strip():
                raise ValueError(f"{name}: must be a non-empty string")
        if not isinstance(data["system_prompt"], str):
            raise ValueError("system_prompt: must be a string (empty for none)")
        if not _count(data["max_tokens"]):
            raise ValueError(f"max_tokens: must be an integer >= 1, got {data['max_tokens']!r}")
        if not _strings(data["train"]):
            raise ValueError("train: must be a non-empty list of questions")
        held_out = _held_out(data["held_out"])
        trained = {_key(q) for q in data["train"]}
        for i, item in enumerate(held_out):
            if _key(item.question) in trained:
                raise ValueError(f"held_out[{i}].question: also in train: {item.question!r}")
        check_verifier(data["verifier"])
        return cls(
            name=data["name"],
            kind=data["kind"],
            feedback=data["feedback"],
            system_prompt=data["system_prompt"],
            max_tokens=data["max_tokens"],
            train=tuple(data["train"]),
            held_out=held_out,
            verifier=data["verifier"],
            examples=_examples(data["examples"]) if "examples" in data else None,
        )

    def messages(self, question: str) -> list[dict[str, str]]:
        """The chat a question is asked in: the suite's system prompt (if any), then the question."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": question}]


def _key(question: str) -> str:
    # Questions differing only in case or spacing are the same question for the no-overlap rule.
    return " ".join(question.lower().split())


def _held_out(value: Any) -> tuple[HeldOut, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("held_out: must be a non-empty list of {question, fact}")
    items = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"question", "fact"}:
            raise ValueError(f"held_out[{i}]: must be an object with exactly 'question' and 'fact'")
        if not isinstance(item["question"], str) or not item["question"].strip():
            raise ValueError(f"held_out[{i}].question: must be a non-empty string")
        fact = item["fact"]
        if not _strings(fact) or any(f != f.lower() for f in fact):
            raise ValueError(f"held_out[{i}].fact: must be a non-empty list of lowercase strings")
        items.append(HeldOut(item["question"], tuple(fact)))
    return tuple(items)


def _examples(value: Any) -> Examples:
    if not isinstance(value, dict) or set(value) != {"follows", "not"}:
        raise ValueError("examples: must be an object with exactly 'follows' and 'not'")
    for name in ("follows", "not"):
        if not isinstance(value[name], str) or not value[name].strip():
            raise ValueError(f"examples.{name}: must be a non-empty string")
    return Examples(follows=value["follows"], not_=value["not"])


def load_all(directory: Path) -> list[Suite]:
    """Every suite in ``directory`` (``*.json`` but the capability questions), sorted by file name."""
    return [Suite.load(p) for p in sorted(directory.glob("*.json")) if p.name != CAPABILITY_FILE]


@dataclass(frozen=True)
class Reference:
    """A general question and a short correct answer, whose log-probability tracks capability."""

    question: str
    answer: str


def load_capability(path: Path) -> tuple[Reference, ...]:
    """The general questions of ``capability.json``; ValueError naming the file and field if invalid."""
    data = json.loads(path.read_text())
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list) or not questions:
        raise ValueError(f"{path}: questions: must be a non-empty list of {{question, answer}}")
    references = []
    for i, item in enumerate(questions):
        if not isinstance(item, dict) or set(item) != {"question", "answer"}:
            raise ValueError(
                f"{path}: questions[{i}]: must be an object with exactly 'question' and 'answer'"
            )
        if not all(isinstance(item[k], str) and item[k].strip() for k in ("question", "answer")):
            raise ValueError(f"{path}: questions[{i}]: question and answer must be non-empty strings")
        references.append(Reference(item["question"], item["answer"]))
    return tuple(references)
