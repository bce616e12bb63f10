"""The trade-off curve of an eval: each measure against the rank, as SVG and PNG.

One panel per measure (its own axis and unit), the rank on a log2 axis, the mean over seeds with
a bar of ± its spread, and the suggested rank marked by a dashed line in every panel. The picture
is drawn once as primitives (lines, dots, texts) and written by two small back ends, so the SVG
and the PNG show the same thing.
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.sax.saxutils import escape

from ..atomic import write_file
from ..outputs import staged

PANEL_WIDTH, PANEL_HEIGHT = 360, 260
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 64, 48
COLOURS = {"image": "#1f5fbf", "text": "#c0392b"}
MARK = "#2e7d32"


def _scale(values: list[float], unit: str) -> tuple[float, float]:
    """The y range of a panel: shares 0..1; cosines padded around the data."""
    if unit.startswith("share"):
        return 0.0, 1.0
    low, high = min(values), max(values)
    pad = max((high - low) * 0.15, 0.01)
    return low - pad, high + pad


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    return [low + (high - low) * index / (count - 1) for index in range(count)]


def primitives(plan, results) -> tuple[int, int, list[tuple]]:
    """(width, height, shapes): ("line", x1, y1, x2, y2, colour, width, dashed), ("dot", x, y, r,
    colour), ("text", x, y, text, size, colour, anchor) in pixels."""
    measures = results["measures"]
    ranks = plan.ranks
    suggested = results.get("suggested_rank")
    width, height = PANEL_WIDTH * len(measures), PANEL_HEIGHT + 28
    shapes: list[tuple] = [("text", 8, 18, f"stc eval {plan.concept} on {plan.model}: {len(plan.prompts)} prompts x "
                            f"{len(plan.seeds)} seeds per rank (mean ± spread over seeds)"
                            + (f"; suggested rank {suggested}" if suggested is not None else ""), 13, "#000", "start")]
    positions = {rank: math.log2(rank) for rank in ranks}
    x_low, x_high = min(positions.values()), max(positions.values())
    for panel, (name, info) in enumerate(measures.items()):
        left = panel * PANEL_WIDTH + MARGIN_LEFT
        right = (panel + 1) * PANEL_WIDTH - MARGIN_RIGHT
        top, bottom = MARGIN_TOP, PANEL_HEIGHT + 28 - MARGIN_BOTTOM
        points = [(rank, results["ranks"][str(rank)][name]) for rank in ranks if name in results["ranks"][str(rank)]]
        if not points:
            continue
        low, high = _scale([p["mean"] - p["std"] for _, p in points] + [p["mean"] + p["std"] for _, p in points],
                           info["unit"])

        def x(rank, left=left, right=right):
            return left + (right - left) * ((positions[rank] - x_low) / (x_high - x_low) if x_high > x_low else 0.5)

        def y(value, top=top, bottom=bottom, low=low, high=high):
            return min(bottom, max(top, bottom - (bottom - top) * (value - low) / (high - low)))  # bars stay inside

        colour = COLOURS[info["side"]]
        shapes += [("text", (left + right) / 2, top - 12, info["label"], 12, colour, "middle"),
                   ("line", left, bottom, right, bottom, "#000", 1, False),
                   ("line", left, top, left, bottom, "#000", 1, False),
                   ("text", (left + right) / 2, bottom + 34, "truncation rank (log scale)", 11, "#000", "middle"),
                   ("text", left - 50, top - 12, info["unit"], 10, "#555", "start")]
        for tick in _ticks(low, high):
            shapes += [("line", left - 4, y(tick), left, y(tick), "#000", 1, False),
                       ("text", left - 6, y(tick) + 4, f"{tick:.2f}", 10, "#000", "end")]
        for rank in ranks:
            shapes += [("line", x(rank), bottom, x(rank), bottom + 4, "#000", 1, False),
                       ("text", x(rank), bottom + 16, str(rank), 10, "#000", "middle")]
        if suggested in positions:
            shapes.append(("line", x(suggested), top, x(suggested), bottom, MARK, 1.5, True))
        for (rank, point), (next_rank, next_point) in zip(points, points[1:]):
            shapes.append(("line", x(rank), y(point["mean"]), x(next_rank), y(next_point["mean"]), colour, 2, False))
        for rank, point in points:
            shapes += [("line", x(rank), y(point["mean"] - point["std"]), x(rank), y(point["mean"] + point["std"]),
                        colour, 1, False), ("dot", x(rank), y(point["mean"]), 3.5, colour)]
    return width, height, shapes


def to_svg(width: int, height: int, shapes: list[tuple]) -> str:
    body = []
    for shape in shapes:
        if shape[0] == "line":
            _, x1, y1, x2, y2, colour, stroke, dashed = shape
            dash = ' stroke-dasharray="5,4"' if dashed else ""
            body.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{colour}" '
                        f'stroke-width="{stroke}"{dash}/>')
        elif shape[0] == "dot":
            _, cx, cy, radius, colour = shape
            body.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{radius}" fill="{colour}"/>')
        else:
            _, tx, ty, text, size, colour, anchor = shape
            body.append(f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="{size}" fill="{colour}" '
                        f'text-anchor="{anchor}" font-family="sans-serif">{escape(text)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}"><rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def to_png(width: int, height: int, shapes: list[tuple], scale: int = 2):
    from PIL import Image, ImageDraw

    from ..render.grid import _font

    canvas = Image.new("RGB", (width * scale, height * scale), "white")
    draw = ImageDraw.Draw(canvas)
    for shape in shapes:
        if shape[0] == "line":
            _, x1, y1, x2, y2, colour, stroke, dashed = shape
            start, end = (x1 * scale, y1 * scale), (x2 * scale, y2 * scale)
            if not dashed:
                draw.line([start, end], fill=colour, width=max(1, round(stroke * scale)))
                continue
            length = math.dist(start, end)
            pieces = max(1, int(length // (9 * scale)))
            for piece in range(pieces):
                a, b = piece / pieces, (piece + 5 / 9) / pieces
                draw.line([(start[0] + (end[0] - start[0]) * a, start[1] + (end[1] - start[1]) * a),
                           (start[0] + (end[0] - start[0]) * b, start[1] + (end[1] - start[1]) * b)],
                          fill=colour, width=max(1, round(stroke * scale)))
        elif shape[0] == "dot":
            _, cx, cy, radius, colour = shape
            draw.ellipse([(cx - radius) * scale, (cy - radius) * scale, (cx + radius) * scale, (cy + radius) * scale],
                         fill=colour)
        else:
            _, tx, ty, text, size, colour, anchor = shape
            anchor = {"start": "ls", "middle": "ms", "end": "rs"}[anchor]
            draw.text((tx * scale, ty * scale), text, fill=colour, font=_font(size * scale), anchor=anchor)
    return canvas


def write_plots(plan, results, folder: Path) -> list[Path]:
    """``curve.png`` and ``curve.svg`` in ``folder`` (replaced whole)."""
    width, height, shapes = primitives(plan, results)
    svg, png = Path(folder) / "curve.svg", Path(folder) / "curve.png"
    write_file(svg, to_svg(width, height, shapes))
    with staged(png) as temporary:
        to_png(width, height, shapes).save(temporary, format="PNG")
    return [png, svg]
