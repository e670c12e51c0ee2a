"""A procedurally generated, labelled image set: no download, deterministic from a seed.

Each class has its own shape (disc, square, triangle, ring, cross, star...),
its own texture inside the shape (flat, stripes, checks, dots), and its own
hue range; every image draws position, size, rotation, colours, background
gradient and pixel noise from a generator seeded by ``(seed, index)``. The
classes are learnable but not trivial, so k-NN accuracy on a held-out split
measures whether pretraining learned something.
"""
from __future__ import annotations

import colorsys
import math
import random

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "ring", "cross", "star", "diamond", "bar")
TEXTURES = ("flat", "stripes", "checks", "dots")


def _class_spec(label: int):
    return SHAPES[label % len(SHAPES)], TEXTURES[(label // len(SHAPES) + label) % len(TEXTURES)], \
        (label * 0.618034) % 1.0


def _rgb(h: float, s: float, v: float):
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float):
    if shape == "triangle":
        k, radii = 3, [r]
    elif shape == "diamond":
        k, radii = 4, [r]
    elif shape == "star":
        k, radii = 10, [r, r * 0.45]
    elif shape == "square":
        k, radii = 4, [r]
        rot += math.pi / 4
    else:
        raise ValueError(shape)
    return [(cx + radii[i % len(radii)] * math.cos(rot + 2 * math.pi * i / k),
             cy + radii[i % len(radii)] * math.sin(rot + 2 * math.pi * i / k)) for i in range(k)]


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, rot: float) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "disc":
        d.ellipse(box, fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        d.ellipse((cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55), fill=0)
    elif shape == "cross":
        t = r * 0.35
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=255)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=255)
        m = m.rotate(math.degrees(rot), center=(cx, cy))
    elif shape == "bar":
        d.rectangle((cx - r, cy - r * 0.3, cx + r, cy + r * 0.3), fill=255)
        m = m.rotate(math.degrees(rot), center=(cx, cy))
    else:
        d.polygon(_polygon(shape, cx, cy, r, rot), fill=255)
    return m


def _texture(texture: str, size: int, c1, c2, rng: random.Random) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(6, 14)
    angle = rng.uniform(0, math.pi)
    if texture == "flat":
        sel = np.zeros((size, size), dtype=bool)
    elif texture == "stripes":
        sel = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0
    elif texture == "checks":
        sel = ((xx // period).astype(int) + (yy // period).astype(int)) % 2 == 0
    else:  # dots
        sel = (np.sin(xx * 2 * math.pi / period) * np.sin(yy * 2 * math.pi / period)) > 0.5
    out = np.where(sel[..., None], np.array(c2, np.uint8), np.array(c1, np.uint8))
    return Image.fromarray(out.astype(np.uint8), "RGB")


def synthetic_image(index: int, n_classes: int, size: int = 128, seed: int = 0):
    """(PIL RGB image, label) for sample ``index``."""
    label = index % n_classes
    rng = random.Random(seed * 1_000_003 + index)
    shape, texture, hue = _class_spec(label)
    # background: a random-direction gradient between two muted colours
    b1 = np.array(_rgb(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.9)), np.float32)
    b2 = np.array(_rgb(rng.random(), rng.uniform(0.1, 0.4), rng.uniform(0.3, 0.9)), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a = rng.uniform(0, 2 * math.pi)
    t = np.clip((xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a) + 0.5, 0, 1)[..., None]
    bg = b1 * (1 - t) + b2 * t
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    # one to three objects of the class shape
    for _ in range(rng.choice((1, 1, 2, 3))):
        r = rng.uniform(0.15, 0.4) * size
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6), rng.uniform(r * 0.6, size - r * 0.6)
        h = hue + rng.uniform(-0.06, 0.06)
        c1 = _rgb(h, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))
        c2 = _rgb(h + 0.5, rng.uniform(0.3, 0.8), rng.uniform(0.2, 0.7))
        tex = _texture(texture, size, c1, c2, rng)
        img.paste(tex, (0, 0), _shape_mask(shape, size, cx, cy, r, rng.uniform(0, 2 * math.pi)))
    arr = np.asarray(img).astype(np.float32)
    arr += np.random.default_rng(rng.randrange(2 ** 32)).normal(0, 6, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB"), label
