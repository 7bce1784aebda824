"""Rasterise a scene description into a small RGB image (PIL, 2x supersampled)."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipsift.world.concepts import COLOURS

SUPERSAMPLE = 2
_BG_TONES = [(200, 200, 200), (150, 150, 150), (225, 215, 195), (185, 195, 205), (120, 120, 130)]
_FONT = ImageFont.load_default()


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], offset: float = 0.0) -> list[tuple[float, float]]:
        pts = []
        for i in range(n * len(radii)):
            a = rot + offset + 2 * math.pi * i / (n * len(radii))
            rr = r * radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if kind == "square":
        return ring(4, [1.0], math.pi / 4)
    if kind == "diamond":
        return [(cx + r * math.cos(rot + a) * s, cy + r * math.sin(rot + a) * t)
                for a, s, t in ((0, 0.7, 1), (math.pi / 2, 1, 1.15), (math.pi, 0.7, 1), (3 * math.pi / 2, 1, 1.15))]
    if kind == "triangle":
        return ring(3, [1.0], -math.pi / 2)
    if kind == "hexagon":
        return ring(6, [1.0])
    if kind == "star":
        return ring(5, [1.0, 0.42], -math.pi / 2)
    if kind == "cross":
        w = 0.36
        base = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        return _rotate(base, cx, cy, r, rot)
    if kind == "arrow":
        base = [(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)]
        return _rotate(base, cx, cy, r, rot)
    if kind == "crescent":
        outer = [(math.cos(a), math.sin(a)) for a in np.linspace(0.35 * math.pi, 1.65 * math.pi, 18)]
        inner = [(0.45 + 0.8 * math.cos(a), 0.8 * math.sin(a)) for a in np.linspace(1.55 * math.pi, 0.45 * math.pi, 14)]
        return _rotate(outer + inner, cx, cy, r, rot)
    raise ValueError(f"no polygon for shape {kind!r}")


def _rotate(base, cx, cy, r, rot):
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in base]


def _background(draw: ImageDraw.ImageDraw, kind: str, size: int, tone: tuple[int, int, int], rng: np.random.Generator):
    draw.rectangle([0, 0, size, size], fill=tone)
    dark = tuple(max(0, v - 45) for v in tone)
    step = size // int(rng.integers(4, 7))
    if kind == "striped":
        vertical = rng.random() < 0.5
        for i in range(0, size, 2 * step):
            box = [i, 0, i + step - 1, size] if vertical else [0, i, size, i + step - 1]
            draw.rectangle(box, fill=dark)
    elif kind == "checkered":
        for i in range(0, size, step):
            for j in range(0, size, step):
                if (i // step + j // step) % 2:
                    draw.rectangle([i, j, i + step - 1, j + step - 1], fill=dark)
    elif kind == "dotted":
        for i in range(step // 2, size, step):
            for j in range(step // 2, size, step):
                draw.ellipse([i - 2, j - 2, i + 2, j + 2], fill=dark)
    elif kind == "gradient":
        for y in range(size):
            f = y / size
            draw.line([0, y, size, y], fill=tuple(int(v * (1 - f) + d * f) for v, d in zip(tone, dark)))
    elif kind == "noise":  # only in the distribution-shift task: blocky grey noise
        cell = max(2, size // 8)
        for i in range(0, size, cell):
            for j in range(0, size, cell):
                v = int(rng.integers(70, 210))
                draw.rectangle([i, j, i + cell - 1, j + cell - 1], fill=(v, v, v))


def jitter_colour(rng: np.random.Generator, name: str, amount: int = 25) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in COLOURS[name])


def render(scene: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` (see generate.py for its keys) at size x size pixels."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(img)
    _background(draw, scene["background"], big, _BG_TONES[int(rng.integers(len(_BG_TONES)))], rng)
    family = scene["family"]
    if family == "letter":
        fill = jitter_colour(rng, scene["colour"])
        font = _FONT.font_variant(size=int(big * rng.uniform(0.55, 0.8))) if hasattr(_FONT, "font_variant") else _FONT
        x, y = big * rng.uniform(0.15, 0.4), big * rng.uniform(0.05, 0.3)
        draw.text((x, y), scene["letter"], fill=fill, font=font)
    elif family == "shape":
        fill = jitter_colour(rng, scene["colour"])
        n = scene["count"]
        radius = big * (0.28 if scene["size"] == "large" else 0.16) / (1.0 if n == 1 else 1.45)
        for cx, cy in _centres(scene["position"], n, big, radius, rng):
            _draw_shape(draw, scene["shape"], cx, cy, radius * rng.uniform(0.9, 1.1), fill, scene["style"], rng)
    return img.resize((size, size), Image.BOX)


def _centres(position: str, n: int, big: int, radius: float, rng: np.random.Generator):
    anchor = {"center": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73)}
    ax, ay = anchor[position]
    jitter = 0.05 * big
    if n == 1:
        return [(ax * big + rng.uniform(-jitter, jitter), ay * big + rng.uniform(-jitter, jitter))]
    # Several objects: spread along a random direction around the centre of the frame.
    angle = rng.uniform(0, math.pi)
    gap = 2.3 * radius
    return [(big / 2 + (i - (n - 1) / 2) * gap * math.cos(angle) + rng.uniform(-2, 2),
             big / 2 + (i - (n - 1) / 2) * gap * math.sin(angle) + rng.uniform(-2, 2)) for i in range(n)]


def _draw_shape(draw, kind, cx, cy, r, fill, style, rng):
    width = max(2, int(r * 0.22))
    rot = rng.uniform(-0.25, 0.25) if kind not in ("circle", "ring", "hexagon") else rng.uniform(0, math.pi)
    if kind in ("circle", "ring"):
        box = [cx - r, cy - r, cx + r, cy + r]
        if kind == "ring" or style == "outline":
            draw.ellipse(box, outline=fill, width=width if kind == "circle" else max(3, int(r * 0.35)))
        else:
            draw.ellipse(box, fill=fill)
        return
    pts = _polygon(kind, cx, cy, r, rot)
    if style == "outline":
        draw.line(pts + [pts[0]], fill=fill, width=width, joint="curve")
    else:
        draw.polygon(pts, fill=fill)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
