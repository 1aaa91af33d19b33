"""Draws a dashboard's panels as one SVG image from series that a real Prometheus returned.

There is no Grafana server here, so the README's dashboard previews are drawn by this module:
each panel sits where its gridPos puts it (24 columns), with its title, a y axis in the panel's
unit, one line per series and a legend. It draws data; it does not imitate Grafana's styling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

COLUMN, ROW = 50, 30  # pixels per grid column and grid row
PALETTE = ("#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0")


@dataclass(frozen=True)
class Series:
    """One line of a panel: its legend and its (unix time, value) points."""

    legend: str
    points: Sequence[tuple[float, float]]


def human(value: float, unit: str) -> str:
    """A y-axis label in the panel's Grafana unit."""
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    if unit in {"bytes", "Bps"}:
        suffix = "/s" if unit == "Bps" else ""
        for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= size:
                return f"{value / size:.1f} {name}{suffix}"
        return f"{value:.0f} B{suffix}"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if abs(value) < 1 else f"{value:.2f} s"
    if unit == "ops":
        return f"{value:.2g}/s"
    return f"{value:.3g}"


def text(
    x: float, y: float, content: str, size: int = 10, fill: str = "#d8d9da", anchor: str = "start"
) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" fill="{fill}" font-size="{size}" text-anchor="{anchor}">'
        f"{escape(content)}</text>"
    )


def rect(x: float, y: float, width: float, height: float, fill: str, stroke: str = "none") -> str:
    size = f'width="{width:.1f}" height="{height:.1f}"'
    return f'<rect x="{x:.1f}" y="{y:.1f}" {size} fill="{fill}" stroke="{stroke}"/>'


def panel_svg(panel: dict[str, Any], series: Sequence[Series], start: float, end: float) -> str:
    """The SVG fragment of one panel, at its grid position."""
    grid = panel["gridPos"]
    x0, y0, width, height = grid["x"] * COLUMN, grid["y"] * ROW, grid["w"] * COLUMN, grid["h"] * ROW
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    left, top, right, bottom = x0 + 70, y0 + 28, x0 + width - 10, y0 + height - 46
    values = [v for s in series for _, v in s.points if math.isfinite(v)]
    low = min([0.0, *values])
    high = max([*values, low])
    if high - low < 1e-12:
        high = low + 1.0  # a flat line (e.g. GPU memory on a CPU pod) still gets a readable axis
    if unit == "percentunit":
        low, high = 0.0, max(high, 1.0)
    parts = [
        rect(x0 + 2, y0 + 2, width - 4, height - 4, "#181b1f", "#2c3235"),
        text(x0 + 10, y0 + 18, panel["title"], 13),
    ]
    for fraction in (0.0, 0.5, 1.0):
        y = bottom - fraction * (bottom - top)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#2c3235"/>')
        parts.append(
            text(left - 6, y + 4, human(low + fraction * (high - low), unit), fill="#8e8e8e", anchor="end")
        )

    def xy(t: float, v: float) -> str:
        px = left + (t - start) / max(end - start, 1e-9) * (right - left)
        py = bottom - (v - low) / (high - low) * (bottom - top)
        return f"{px:.1f},{py:.1f}"

    for index, line in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        points = [xy(t, v) for t, v in line.points if math.isfinite(v)]
        if len(points) == 1:
            points.append(points[0])
        if points:
            parts.append(
                f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" stroke-width="1.5"/>'
            )
        if index < 6:
            lx, ly = x0 + 10 + (index % 3) * (width - 20) / 3, bottom + 22 + (index // 3) * 14
            parts += [rect(lx, ly - 8, 10, 3, color), text(lx + 14, ly, line.legend)]
    if not values:
        parts.append(text((left + right) / 2, (top + bottom) / 2, "no data", 12, "#8e8e8e", "middle"))
    return "\n".join(parts)


def dashboard_svg(
    board: dict[str, Any], series: Sequence[Sequence[Series]], start: float, end: float, note: str
) -> str:
    """The whole dashboard: its title and note on top, then every panel with its series."""
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"]) * ROW
    width, header = 24 * COLUMN, 44
    body = "\n".join(panel_svg(p, s, start, end) for p, s in zip(board["panels"], series, strict=True))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{bottom + header}" '
        f'font-family="sans-serif" viewBox="0 0 {width} {bottom + header}">\n'
        f'<rect width="100%" height="100%" fill="#111217"/>\n'
        f'<text x="10" y="20" fill="#d8d9da" font-size="16">{escape(board["title"])}</text>\n'
        f'<text x="10" y="36" fill="#8e8e8e" font-size="11">{escape(note)}</text>\n'
        f'<g transform="translate(0 {header})">\n{body}\n</g>\n</svg>\n'
    )
