"""A log-log line plot as a PNG with Pillow (already in the environment through torchvision; no matplotlib)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def loglog_png(path: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
               size=(720, 480), margin=70) -> None:
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    lx0, lx1 = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    ly0, ly1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def at(x, y):
        px = margin + (math.log10(x) - lx0) / (lx1 - lx0) * (width - 2 * margin)
        py = height - margin - (math.log10(y) - ly0) / (ly1 - ly0) * (height - 2 * margin)
        return px, py

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for e in range(lx0, lx1 + 1):  # decade grid lines and labels
        px, _ = at(10 ** e, 10 ** ly0)
        draw.line([px, margin, px, height - margin], fill="#dddddd")
        draw.text((px - 12, height - margin + 6), f"1e{e}", fill="black")
    for e in range(ly0, ly1 + 1):
        _, py = at(10 ** lx0, 10 ** e)
        draw.line([margin, py, width - margin, py], fill="#dddddd")
        draw.text((margin - 40, py - 6), f"1e{e}", fill="black")
    draw.text((width // 2 - 60, height - margin + 28), xlabel, fill="black")
    draw.text((8, margin - 30), ylabel, fill="black")
    for n, (name, pts) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        points = [at(x, y) for x, y in sorted(pts)]
        draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((margin + 10, margin + 8 + 14 * n), name, fill=color)
    image.save(path)
