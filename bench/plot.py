"""The e2e PNG, drawn with Pillow only (matplotlib is not a dependency): two line charts side by side,
decode tok/s by batch size and prefill time by prompt length, one line per system, log y axis when the
values span more than a decade."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = {"gemma3n_fast": (214, 39, 40), "hf": (31, 119, 180), "hf-compile": (44, 160, 44),
          "reference": (127, 127, 127), "gemma3n_fast-int4": (255, 127, 14), "gemma3n_fast-int8": (140, 86, 75)}
W, H = 1200, 520


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable default font
    except TypeError:
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    step = 10 ** math.floor(math.log10(max(hi - lo, 1e-12)))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= 6:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2)]


def _label(v: float) -> str:
    return f"{v:.0f}" if v >= 10 or v == int(v) else f"{v:.2g}"


def chart(draw: ImageDraw.ImageDraw, box, title: str, xlabel: str, ylabel: str, xcats: list[str],
          series: dict[str, list]):
    x0, y0, x1, y1 = box
    f, fs = _font(16), _font(12)
    draw.text(((x0 + x1) // 2, y0), title, fill="black", font=f, anchor="mt")
    left, top, right, bottom = x0 + 70, y0 + 30, x1 - 10, y1 - 50  # plot area
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) // 2, y1 - 18), xlabel, fill="black", font=fs, anchor="mm")
    draw.text((x0 + 4, (top + bottom) // 2), ylabel, fill="black", font=fs, anchor="lm")
    vals = [v for ys in series.values() for v in ys if v]
    if not vals or not xcats:
        draw.text(((left + right) // 2, (top + bottom) // 2), "no data", fill="gray", font=f, anchor="mm")
        return
    lo, hi = min(vals), max(vals)
    log = hi / lo > 10
    if log:
        ticks = _nice_ticks(lo, hi, True)
        tlo, thi = math.log10(ticks[0]), math.log10(ticks[-1])
        ypix = lambda v: bottom - (math.log10(v) - tlo) / max(thi - tlo, 1e-9) * (bottom - top)  # noqa: E731
    else:
        ticks = _nice_ticks(0.0, hi, False)
        tlo, thi = ticks[0], ticks[-1]
        ypix = lambda v: bottom - (v - tlo) / max(thi - tlo, 1e-9) * (bottom - top)  # noqa: E731
    for t in ticks:
        y = ypix(t)
        draw.line([left, y, right, y], fill=(225, 225, 225))
        draw.text((left - 4, y), _label(t), fill="black", font=fs, anchor="rm")
    xpix = lambda i: left + (i + 0.5) * (right - left) / len(xcats)  # noqa: E731
    for i, c in enumerate(xcats):
        draw.text((xpix(i), bottom + 6), c, fill="black", font=fs, anchor="mt")
    for k, (name, ys) in enumerate(series.items()):
        color = COLORS.get(name, (148, 103, 189))
        pts = [(xpix(i), ypix(v)) for i, v in enumerate(ys) if v]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=3)
        for x, y in pts:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        ly = top + 8 + 18 * k  # legend, top left inside the plot
        draw.line([left + 10, ly + 6, left + 30, ly + 6], fill=color, width=3)
        draw.text((left + 36, ly), name, fill="black", font=fs)


def draw(result: dict, path: Path):
    """One row of two charts per model that has measured text rows (E2B, then E4B)."""
    ok = [r for r in result["rows"] if r["status"] == "ok" and r["workload"] == "text"]
    models = list(dict.fromkeys(r["model"] for r in ok)) or ["?"]
    img = Image.new("RGB", (W, H * len(models)), "white")
    d = ImageDraw.Draw(img)
    for k, model in enumerate(models):
        rows = [r for r in ok if r["model"] == model]
        systems = list(dict.fromkeys(r["system"] for r in rows))
        top = k * H + 10
        # Decode tok/s by batch, each batch at its shortest prompt.
        batches = sorted({r["batch"] for r in rows})
        short = {b: min(r["prompt_tokens"] for r in rows if r["batch"] == b) for b in batches}
        dec = {s: [next((r["decode_tok_s"] for r in rows if r["system"] == s and r["batch"] == b
                         and r["prompt_tokens"] == short[b]), None) for b in batches] for s in systems}
        title = f"{model.upper()} decode throughput (prompt {min(short.values(), default=0)})"
        chart(d, (0, top, W // 2, top + H - 10), title, "batch size", "tok/s", [str(b) for b in batches], dec)
        # Prefill time (TTFT) by prompt length at batch 1.
        prompts = sorted({r["prompt_tokens"] for r in rows if r["batch"] == 1})
        pre = {s: [next((r["ttft_s"] * 1e3 for r in rows if r["system"] == s and r["batch"] == 1
                         and r["prompt_tokens"] == p and r["ttft_s"]), None) for p in prompts] for s in systems}
        chart(d, (W // 2, top, W, top + H - 10), f"{model.upper()} time to first token (batch 1)", "prompt tokens",
              "ms", [str(p) for p in prompts], pre)
    d.text((W - 8, img.height - 4), f"{result['meta']['device']}, {result['meta']['dtype']}", fill="gray",
           font=_font(11), anchor="rd")
    img.save(path)
