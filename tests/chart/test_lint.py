"""`helm lint --strict` on the chart with its default values and with every ci/*.yaml value set."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.chart import charting


@pytest.mark.parametrize(
    "values", [None, *charting.ci_value_files()], ids=lambda p: p.name if p else "defaults"
)
def test_helm_lint_passes(values: Path | None) -> None:
    args = ["lint", "--strict", str(charting.CHART), "--kube-version", charting.KUBE_VERSION]
    if values is not None:
        args += ["--values", str(values)]
    done = charting.helm(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


def test_ci_value_sets_exist() -> None:
    # The lint and render tests are only as wide as these sets; losing them would pass silently.
    assert len(charting.ci_value_files()) >= 3


def test_every_value_is_documented() -> None:
    # helm-docs style: every key, or a key above it, has a `# --` comment block right above it.
    lines = (charting.CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    ancestors: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    comment_block: list[str] = []
    undocumented = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment_block.append(stripped)
            continue
        if not stripped or stripped.startswith("-") or ":" not in stripped:
            comment_block = [] if not stripped else comment_block
            continue
        indent = len(line) - len(line.lstrip())
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        documented = bool(comment_block) and comment_block[0].startswith("# --")
        comment_block = []
        if not (documented or any(flag for _, flag in ancestors)) and stripped.partition(":")[2].strip():
            undocumented.append(f"line {number}: {stripped.partition(':')[0]}")
        ancestors.append((indent, documented))
    assert not undocumented, "values without a `# --` comment: " + ", ".join(undocumented)
