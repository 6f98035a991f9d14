"""PNG charts for reports: per-tensor SQNR bars, and top-1 drop against speed for a sweep.

Drawn with matplotlib when it is installed, otherwise with Pillow (always installed) as plain charts: axes, ticks,
bars or points, labels. Both paths take the same data and write one PNG atomically.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from quantize.core.artifacts import atomic_path

log = logging.getLogger(__name__)

try:  # optional: nicer charts when available
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # pragma: no cover - depends on the environment
    plt = None

WIDTH, HEIGHT = 1000, 520
MARGIN = dict(left=70, right=20, top=40, bottom=60)
RED, BLUE, GREY, BLACK = (200, 50, 50), (60, 110, 190), (190, 190, 190), (0, 0, 0)


def _nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    return ticks


class _Canvas:
    """A Pillow chart area mapping data coordinates to pixels."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim: tuple[float, float], ylim: tuple[float, float]):
        from PIL import Image, ImageDraw, ImageFont

        self.image = Image.new("RGB", (WIDTH, HEIGHT), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font = ImageFont.load_default()
        self.x0, self.x1 = MARGIN["left"], WIDTH - MARGIN["right"]
        self.y0, self.y1 = HEIGHT - MARGIN["bottom"], MARGIN["top"]
        self.xlim, self.ylim = xlim, ylim
        self.draw.text((self.x0, 10), title, fill=BLACK, font=self.font)
        self.draw.text(((self.x0 + self.x1) // 2 - 3 * len(xlabel), HEIGHT - 22), xlabel, fill=BLACK, font=self.font)
        self.draw.text((5, self.y1 - 25), ylabel, fill=BLACK, font=self.font)
        self.draw.line([(self.x0, self.y0), (self.x1, self.y0)], fill=BLACK)
        self.draw.line([(self.x0, self.y0), (self.x0, self.y1)], fill=BLACK)

    def px(self, x: float, y: float) -> tuple[float, float]:
        (xa, xb), (ya, yb) = self.xlim, self.ylim
        return (self.x0 + (x - xa) / ((xb - xa) or 1) * (self.x1 - self.x0),
                self.y0 - (y - ya) / ((yb - ya) or 1) * (self.y0 - self.y1))

    def yticks(self, ticks: Sequence[float]) -> None:
        for t in ticks:
            if self.ylim[0] <= t <= self.ylim[1]:
                _, y = self.px(self.xlim[0], t)
                self.draw.line([(self.x0 - 4, y), (self.x1, y)], fill=(235, 235, 235))
                self.draw.line([(self.x0 - 4, y), (self.x0, y)], fill=BLACK)
                self.draw.text((8, y - 6), f"{t:g}", fill=BLACK, font=self.font)

    def xticks(self, ticks: Sequence[float]) -> None:
        for t in ticks:
            if self.xlim[0] <= t <= self.xlim[1]:
                x, _ = self.px(t, self.ylim[0])
                self.draw.line([(x, self.y0), (x, self.y0 + 4)], fill=BLACK)
                self.draw.text((x - 10, self.y0 + 8), f"{t:g}", fill=BLACK, font=self.font)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            self.image.save(tmp, format="PNG")


def sqnr_bars(path: Path, labels: Sequence[str], sqnr_db: Sequence[float], title: str,
              highlight: int = 10) -> Path:
    """One bar per quantized tensor in graph order (height: SQNR in dB); the ``highlight`` worst in red and named."""
    finite = [v for v in sqnr_db if math.isfinite(v)]
    top = max(finite, default=1.0)
    values = [min(v, top) if math.isfinite(v) else top for v in sqnr_db]
    worst = set(sorted(range(len(values)), key=lambda i: values[i])[:highlight])
    if plt is not None:
        fig, ax = plt.subplots(figsize=(WIDTH / 100, HEIGHT / 100), dpi=100)
        ax.bar(range(len(values)), values, color=["tab:red" if i in worst else "tab:blue" for i in range(len(values))])
        for i in sorted(worst):
            ax.annotate(labels[i], (i, values[i]), rotation=90, fontsize=6, va="bottom", ha="center")
        ax.set(title=title, xlabel="quantized activation (graph order)", ylabel="SQNR vs fp32 (dB)")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return path
    canvas = _Canvas(title, "quantized activation (graph order; red: the worst, numbered by rank)",
                     "SQNR dB", (-0.5, max(len(values), 1) - 0.5), (0.0, top * 1.08))
    canvas.yticks(_nice_ticks(0.0, top * 1.08))
    step = (canvas.x1 - canvas.x0) / max(len(values), 1)
    ranks = {i: r for r, i in enumerate(sorted(worst, key=lambda i: values[i]), 1)}
    for i, v in enumerate(values):
        x, y = canvas.px(i, v)
        canvas.draw.rectangle([x - step * 0.4, y, x + step * 0.4, canvas.y0], fill=RED if i in worst else BLUE)
        if i in worst:
            canvas.draw.text((x - 3, y - 12), str(ranks[i]), fill=RED, font=canvas.font)
    canvas.save(path)
    return path


def drop_vs_speed(path: Path, points: Sequence[tuple[str, float, float]], title: str,
                  goal: tuple[float, float] | None = None) -> Path:
    """Scatter of (label, speedup int8/fp32, top-1 drop in points); ``goal`` = (min speedup, max drop) shaded."""
    points = [p for p in points if p[1] is not None and p[2] is not None]
    xs = [p[1] for p in points] or [1.0]
    ys = [p[2] for p in points] or [0.0]
    xlim = (min(min(xs), goal[0] if goal else min(xs)) - 0.1, max(xs) + 0.1)
    ylim = (min(min(ys), 0.0) - 0.25, max(max(ys), goal[1] if goal else 0.0) + 0.25)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(WIDTH / 100, HEIGHT / 100), dpi=100)
        if goal:
            ax.axvspan(goal[0], xlim[1], ymin=0, ymax=(goal[1] - ylim[0]) / (ylim[1] - ylim[0]), color="0.9")
        ax.scatter(xs, ys, color="tab:blue")
        for label, x, y in points:
            ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=title, xlabel="int8 speedup over fp32 (x)", ylabel="top-1 drop (points)", xlim=xlim, ylim=ylim)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return path
    canvas = _Canvas(title, "int8 speedup over fp32 (x)" + (" -- grey: the goal" if goal else ""),
                     "top-1 drop", xlim, ylim)
    if goal:
        gx, gy = canvas.px(goal[0], goal[1])
        canvas.draw.rectangle([gx, gy, canvas.x1, canvas.y0], fill=(232, 240, 232))
    canvas.yticks(_nice_ticks(*ylim))
    canvas.xticks(_nice_ticks(*xlim))
    placed: list[tuple[float, float, float, float]] = []
    for label, x, y in points:
        cx, cy = canvas.px(x, y)
        canvas.draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=BLUE)
        placed.append((cx - 4, cy - 4, cx + 4, cy + 4))
    for label, x, y in sorted(points, key=lambda p: (p[2], p[1])):
        cx, cy = canvas.px(x, y)
        box = _place_label(canvas, label, cx, cy, placed)
        placed.append(box)
        canvas.draw.text(box[:2], label, fill=BLACK, font=canvas.font)
    canvas.save(path)
    return path


def _place_label(canvas: _Canvas, label: str, cx: float, cy: float,
                 placed: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    """A spot for ``label`` near the point (cx, cy) inside the plot that overlaps no label placed before (the first
    of a few candidate offsets that fits; the least crowded one otherwise)."""
    left, top, right, bottom = canvas.draw.textbbox((0, 0), label, font=canvas.font)
    w, h = right - left + 2, bottom - top + 2
    candidates = [(dx, dy) for dy in (-h / 2, -h - 4, 4, -2 * h - 6, h + 6, -3 * h - 8, 2 * h + 8)
                  for dx in (7, -w - 7)]

    def overlaps(box):
        return sum(not (box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]) for b in placed)

    best, best_count = None, None
    for dx, dy in candidates:
        box = (cx + dx, cy + dy, cx + dx + w, cy + dy + h)
        if box[0] < canvas.x0 or box[2] > canvas.x1 + 15 or box[1] < canvas.y1 - 25 or box[3] > canvas.y0:
            continue
        count = overlaps(box)
        if count == 0:
            return box
        if best_count is None or count < best_count:
            best, best_count = box, count
    return best or (cx + 7, cy - h / 2, cx + 7 + w, cy + h / 2)
