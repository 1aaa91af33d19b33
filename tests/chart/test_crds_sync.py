"""The chart's crds/ is a byte-for-byte copy of the project's crds/ (`make sync-crds`)."""

from __future__ import annotations

from tests.chart import charting


def test_chart_crds_match_the_source() -> None:
    source = {p.name: p.read_bytes() for p in (charting.ROOT / "crds").glob("*.yaml")}
    copy = {p.name: p.read_bytes() for p in (charting.CHART / "crds").glob("*.yaml")}
    assert source, "crds/ holds no CRD"
    assert sorted(copy) == sorted(source), "run `make sync-crds`: the chart's CRD files differ in name"
    stale = [name for name in source if copy[name] != source[name]]
    assert not stale, f"run `make sync-crds`: the chart's copy of {stale} is out of date"
