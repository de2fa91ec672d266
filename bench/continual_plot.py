"""A line plot of served mIoU over stream time per configuration, drawn with Pillow (no matplotlib).

One point per clip window (``ServedScore.summary()["windows"]``), segments shaded and named along the
top, and each round's end marked on its configuration's line: a filled triangle for a published
round, a cross for a rejected one, a hollow triangle for one published although the gate said no (the
gate-off baselines); failed and cancelled rounds are not marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

COLORS = {"none": (150, 150, 150), "always": (214, 39, 40), "reset": (255, 127, 14), "cotta": (148, 103, 189),
          "full": (31, 119, 180)}
EXTRA = [(44, 160, 44), (140, 86, 75), (227, 119, 194), (23, 190, 207)]
SHADES = [(245, 245, 245), (228, 232, 240)]


def color(name: str, i: int) -> tuple[int, int, int]:
    return COLORS.get(name, EXTRA[i % len(EXTRA)])


def plot(results: dict[str, dict[str, Any]], path: Path, size: tuple[int, int] = (1200, 520),
         title: str = "served mIoU over stream time") -> Path:
    """Write the PNG to ``path`` (parents created) and return it."""
    width, height = size
    left, right, top, bottom = 60, 150, 56, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    first = next(iter(results.values()))["served"]
    segments = first["segments"]
    t_end = max(s["end_s"] for s in segments) / 60 or 1.0
    values = [w["miou"] for r in results.values() for w in r["served"]["windows"] if w["miou"] is not None]
    lo = 10 * int(min(values, default=0) // 10)
    hi = min(100, 10 * (int(max(values, default=100) // 10) + 1))
    hi = hi if hi > lo else lo + 10

    def xy(minutes: float, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * minutes / t_end
        y = height - bottom - (height - top - bottom) * (value - lo) / (hi - lo)
        return x, y

    for i, seg in enumerate(segments):
        x0, _ = xy(seg["start_s"] / 60, lo)
        x1, _ = xy(seg["end_s"] / 60, lo)
        d.rectangle([x0, top, x1, height - bottom], fill=SHADES[i % 2])
        d.text(((x0 + x1) / 2, top - 4), seg["style"], fill="black", font=small, anchor="md")
    for v in range(lo, hi + 1, 10):
        _, y = xy(0, v)
        d.line([left, y, width - right, y], fill=(210, 210, 210))
        d.text((left - 6, y), str(v), fill="black", font=small, anchor="rm")
    step = 5 if t_end > 10 else 1
    for m in range(0, int(t_end) + 1, step):
        x, _ = xy(m, lo)
        d.line([x, height - bottom, x, height - bottom + 4], fill="black")
        d.text((x, height - bottom + 6), str(m), fill="black", font=small, anchor="ma")
    d.rectangle([left, top, width - right, height - bottom], outline="black")
    d.text((left + (width - left - right) / 2, height - 6), "stream time (minutes)", fill="black", font=font,
           anchor="md")
    d.text((8, 8), title + " (mIoU %, per clip window)", fill="black", font=font)
    for i, (name, res) in enumerate(results.items()):
        c = color(name, i)
        pts = [(xy((w["start_s"] + w["end_s"]) / 120, w["miou"]), w) for w in res["served"]["windows"]
               if w["miou"] is not None]
        if len(pts) > 1:
            d.line([p for p, _ in pts], fill=c, width=6 if name == "none" else 2)  # the base shows under the rest
        for r in (res.get("rounds") or {}).get("list", []):
            if r["ended_s"] is None or r["state"] not in ("published", "rejected"):
                continue
            near = min(pts, key=lambda p: abs((p[1]["start_s"] + p[1]["end_s"]) / 2 - r["ended_s"]), default=None)
            if near is None:
                continue
            x, _ = xy(r["ended_s"] / 60, lo)
            y = near[0][1]
            if r["state"] == "published" and r.get("gate_passed") is False:  # gate off: published anyway
                d.polygon([(x, y - 7), (x - 5, y + 2), (x + 5, y + 2)], fill="white", outline=c, width=2)
            elif r["state"] == "published":
                d.polygon([(x, y - 7), (x - 5, y + 2), (x + 5, y + 2)], fill=c, outline="black")
            else:
                d.line([x - 5, y - 5, x + 5, y + 5], fill=c, width=3)
                d.line([x - 5, y + 5, x + 5, y - 5], fill=c, width=3)
        ly = top + 8 + 20 * i
        d.line([width - right + 12, ly, width - right + 36, ly], fill=c, width=3)
        d.text((width - right + 42, ly), name, fill="black", font=font, anchor="lm")
    ly = top + 8 + 20 * len(results) + 10
    d.polygon([(width - right + 24, ly - 6), (width - right + 19, ly + 3), (width - right + 29, ly + 3)],
              fill="black")
    d.text((width - right + 42, ly), "published", fill="black", font=small, anchor="lm")
    ly += 18
    d.line([width - right + 19, ly - 5, width - right + 29, ly + 5], fill="black", width=3)
    d.line([width - right + 19, ly + 5, width - right + 29, ly - 5], fill="black", width=3)
    d.text((width - right + 42, ly), "rejected", fill="black", font=small, anchor="lm")
    ly += 18
    d.polygon([(width - right + 24, ly - 6), (width - right + 19, ly + 3), (width - right + 29, ly + 3)],
              fill="white", outline="black", width=2)
    d.text((width - right + 42, ly), "published,", fill="black", font=small, anchor="lm")
    d.text((width - right + 42, ly + 13), "gate said no", fill="black", font=small, anchor="lm")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path
