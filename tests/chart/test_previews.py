"""The README's dashboard preview (drawn by scripts/svg_panels.py): well-formed SVG, one drawn panel per
dashboard panel, not packaged."""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

from scripts import svg_panels
from tests.chart import charting

SVG = "{http://www.w3.org/2000/svg}"
PREVIEW = charting.CHART / "dashboards" / "previews" / "trainers.svg"


def titles(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text") if t.get("font-size") == "13"]


def test_drawing_puts_every_panel_and_series_in_place() -> None:
    board = charting.dashboard("trainers.json")
    series = [[svg_panels.Series("a", [(0.0, 1.0), (10.0, 2.0)])] for _ in board["panels"]]
    series[0] = []  # a panel without data says so
    root = ET.fromstring(svg_panels.dashboard_svg(board, series, 0.0, 10.0, "note"))
    assert titles(root) == [p["title"] for p in board["panels"]]
    assert len(list(root.iter(f"{SVG}polyline"))) == len(board["panels"]) - 1
    assert sum(t.text == "no data" for t in root.iter(f"{SVG}text")) == 1


def test_axis_labels_use_the_panel_unit() -> None:
    assert svg_panels.human(0.5, "percentunit") == "50%"
    assert svg_panels.human(3 * 2**20, "bytes") == "3.0 MiB"
    assert svg_panels.human(2048, "Bps") == "2.0 KiB/s"
    assert svg_panels.human(0.25, "s") == "250 ms"


def test_committed_preview_shows_the_current_panels() -> None:
    # Regenerate with `python -m scripts.draw_previews` when the panel list changes.
    root = ET.fromstring(PREVIEW.read_text(encoding="utf-8"))
    assert titles(root) == [p["title"] for p in charting.dashboard("trainers.json")["panels"]]
    assert "Drawn from a real run" in PREVIEW.read_text(encoding="utf-8")


def test_previews_stay_out_of_the_packaged_chart(tmp_path: Path) -> None:
    done = charting.helm("package", str(charting.CHART), "--destination", str(tmp_path))
    assert done.returncode == 0, done.stderr
    (package,) = tmp_path.glob("lorafleet-*.tgz")
    with tarfile.open(package) as archive:
        names = archive.getnames()
    assert "lorafleet/dashboards/trainers.json" in names
    assert not [n for n in names if "previews" in n]
