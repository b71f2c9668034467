"""A small synthetic industrial anomaly data set in the MVTec AD layout, for demos and tests.

Four products that look clearly different from each other, so that a continual learner has to (and can) tell
them apart from the image alone:

- ``weave``    (RGB texture): a plain-woven fabric, threads wobble, small rotation/shift, lighting changes.
- ``granite``  (grayscale texture, saved as mode "L"): speckled stone with dark and bright grains.
- ``washer``   (RGB object): a machined metal ring on a felt background, position/size/highlight jitter.
- ``pcb_chip`` (RGB object): an IC with 2 x 6 pins and a marking on a green board with traces and vias.

Two defect types per product (see `DEMO_DEFECT_TYPES`), of varied size (small to large). A defect image and its
mask come from the same rendering: the image is rendered once without and once with the defect, both go through
the same camera blur and the same sensor noise, and the mask holds exactly the pixels whose value changed by at least
`VISIBLE_THRESHOLD` grey levels (in any channel). Masks are uint8 0/255, mode "L", the size of the image.

Everything is deterministic: each image has its own random stream derived from (seed, category, split, index), so the
same seed gives byte-identical PNGs, and a category's images do not depend on which other categories are written.

Layout written (as MVTec AD)::

    ROOT/<category>/train/good/000.png ...
    ROOT/<category>/test/good/000.png ...
    ROOT/<category>/test/<defect_type>/000.png ...
    ROOT/<category>/ground_truth/<defect_type>/000_mask.png ...
    ROOT/demo_dataset.json          (the parameters, so that a second call with the same ones does nothing)

Command line: ``python -m ucad.demo OUT_DIR [--seed 0] [--image_size 128] [--n_train 24] [--categories a,b]``.
"""
from __future__ import annotations

import argparse
import json
import operator
import shutil
import sys
import time
import zlib
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from ucad.runtime.errors import UcadError
from ucad.persistence.run_folder import atomic_write

DEMO_CATEGORIES = ["weave", "granite", "washer", "pcb_chip"]
# look-alike variants, only written when asked for by name: a routing stress test (VisA's pcb1-4 and macaroni1/2
# are products this close to each other)
LOOKALIKE_CATEGORIES = ["weave_b", "pcb_chip_b"]
ALL_CATEGORIES = DEMO_CATEGORIES + LOOKALIKE_CATEGORIES
DEMO_DEFECT_TYPES = {
    "weave": ["hole", "stain"],
    "granite": ["crack", "contamination"],
    "washer": ["scratch", "broken"],
    "pcb_chip": ["missing_pin", "contamination"],
    "weave_b": ["hole", "stain"],
    "pcb_chip_b": ["missing_pin", "contamination"],
}
GRAYSCALE_CATEGORIES = ("granite",)
MANIFEST_NAME = "demo_dataset.json"
GENERATOR_VERSION = 1
VISIBLE_THRESHOLD = 16  # grey levels (of 255) a defect must change a pixel by for the pixel to be in the mask

_NOISE_SIGMA = 0.011  # sensor noise, in [0, 1] units
_GOLDEN = 0.6180339887498949


# --------------------------------------------------------------------------------------------------------------------
# drawing helpers (all float32 images in [0, 1], pixel centres at integer + 0.5)


class _Canvas:
    def __init__(self, size: int):
        self.size = size
        self.s = size / 128.0  # scale: all sizes below are given for a 128 x 128 image
        centres = np.arange(size, dtype=np.float32) + 0.5
        self.y, self.x = np.meshgrid(centres, centres, indexing="ij")
        self.shape = (size, size)


@lru_cache(maxsize=8)
def _canvas(size: int) -> _Canvas:
    return _Canvas(size)


def _noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation."""
    field = rng.standard_normal(shape, dtype=np.float32)
    if np.any(np.asarray(sigma) > 0):
        field = ndimage.gaussian_filter(field, sigma, mode="wrap")
    sd = float(field.std())
    return field / sd if sd > 0 else field


def _lighting(cv: _Canvas, rng: np.random.Generator, gradient: float, gain: float) -> np.ndarray:
    """Multiplicative illumination: a random linear gradient and global gain."""
    angle = rng.uniform(0, 2 * np.pi)
    strength = rng.uniform(0.3, 1.0) * gradient
    ramp = (np.cos(angle) * (cv.x / cv.size - 0.5) + np.sin(angle) * (cv.y / cv.size - 0.5)) * 2 * strength
    return ((1.0 + ramp) * rng.uniform(1 - gain, 1 + gain)).astype(np.float32)


def _blob(cv: _Canvas, rng: np.random.Generator, cx: float, cy: float, radius: float,
          rough: float = 0.25, aspect: float = 1.0) -> np.ndarray:
    """Anti-aliased irregular blob: a star-shaped region with a randomly modulated radius."""
    dx, dy = cv.x - cx, cv.y - cy
    if aspect != 1.0:
        a = rng.uniform(0, np.pi)
        ca, sa = np.cos(a), np.sin(a)
        dx, dy = (dx * ca + dy * sa) / aspect, (-dx * sa + dy * ca) * aspect
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)
    rad = np.ones_like(r)
    for k in range(2, 8):
        rad += rough * rng.uniform(0.2, 1.0) / k ** 0.7 * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    return np.clip(radius * np.maximum(rad, 0.2) - r + 0.5, 0.0, 1.0).astype(np.float32)


def _curve(rng: np.random.Generator, x0: float, y0: float, length: float, angle: float,
           wiggle: float, bend: float = 0.0, kinks: float = 0.0, step: float = 0.5) -> np.ndarray:
    """Points (N, 2) of a random curve: heading = angle + constant bend + random-walk wiggle (radians per px)
    + abrupt turns (`kinks` per px, each about +-0.6 rad), as in cracks."""
    n = max(2, int(length / step))
    heading = angle + bend * step * np.arange(n) + np.cumsum(rng.normal(0.0, wiggle * np.sqrt(step), n))
    if kinks > 0:
        jumps = rng.normal(0.0, 0.6, n) * (rng.random(n) < kinks * step)
        heading = heading + np.cumsum(jumps - jumps.mean())
    xs = x0 + np.cumsum(np.cos(heading)) * step
    ys = y0 + np.cumsum(np.sin(heading)) * step
    return np.stack([xs, ys], axis=1)


def _stroke(cv: _Canvas, points: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Anti-aliased stroke along points with per-point width (px)."""
    ix = np.floor(points[:, 0]).astype(np.int64)
    iy = np.floor(points[:, 1]).astype(np.int64)
    keep = (ix >= 0) & (ix < cv.size) & (iy >= 0) & (iy < cv.size)
    alpha = np.zeros(cv.shape, np.float32)
    if not keep.any():
        return alpha
    width_map = np.zeros(cv.shape, np.float32)
    np.maximum.at(width_map, (iy[keep], ix[keep]), widths[keep].astype(np.float32))
    line = width_map > 0
    dist, (ny, nx) = ndimage.distance_transform_edt(~line, return_indices=True)
    alpha = np.clip(width_map[ny, nx] / 2 - dist + 0.5, 0.0, 1.0)
    return alpha.astype(np.float32)


def _taper(n: int, width: float, rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)
    return width * (0.45 + 0.55 * np.sin(np.pi * t) ** 0.5) * rng.uniform(0.85, 1.15, n).clip(0.7, 1.3)


def _box(X: np.ndarray, Y: np.ndarray, x0, x1, y0, y1) -> np.ndarray:
    """Anti-aliased axis-aligned box in (possibly rotated) pixel coordinates."""
    d = np.maximum(np.maximum(x0 - X, X - x1), np.maximum(y0 - Y, Y - y1))
    return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)


def _disc(X, Y, cx, cy, r) -> np.ndarray:
    return np.clip(r - np.hypot(X - cx, Y - cy) + 0.5, 0.0, 1.0).astype(np.float32)


def _over(img: np.ndarray, alpha: np.ndarray, colour) -> np.ndarray:
    """Alpha-composite a colour (scalar, RGB triple or image) over img."""
    a = alpha[..., None] if img.ndim == 3 else alpha
    return img * (1.0 - a) + np.asarray(colour, np.float32) * a


def _size_between(lo: float, hi: float, u: float) -> float:
    return float(lo * (hi / lo) ** u)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# weave: plain-woven fabric (RGB texture)


def _render_weave(cv: _Canvas, rng: np.random.Generator, period: float = 8.0,
                  warp_colour=(0.60, 0.47, 0.33), weft_colour=(0.80, 0.70, 0.52)):
    s, n = cv.s, cv.size
    theta = np.deg2rad(rng.uniform(-4.0, 4.0))
    period = period * s * rng.uniform(0.97, 1.03)
    u0, v0 = rng.uniform(0, 4 * period, 2)
    wob_u = 0.45 * s * _noise(rng, cv.shape, 6 * s)
    wob_v = 0.45 * s * _noise(rng, cv.shape, 6 * s)
    fibre_warp = _noise(rng, cv.shape, (3.0 * s, 0.5 * s))
    fibre_weft = _noise(rng, cv.shape, (0.5 * s, 3.0 * s))
    tint = rng.uniform(0.96, 1.04, 3)
    warp = np.array(warp_colour) * tint
    weft = np.array(weft_colour) * tint
    light = _lighting(cv, rng, 0.08, 0.06)

    dx, dy = cv.x - n / 2, cv.y - n / 2
    u = (dx * np.cos(theta) + dy * np.sin(theta) + u0 + wob_u) / period
    v = (-dx * np.sin(theta) + dy * np.cos(theta) + v0 + wob_v) / period
    i, j = np.floor(u), np.floor(v)
    su, sv = np.sin(np.pi * (u - i)), np.sin(np.pi * (v - j))
    sign = np.where((i + j) % 2 == 0, 1.0, -1.0)
    h_warp = su * (1.0 + 0.5 * sign * sv)  # warp goes over the weft in "even" cells, under it in odd ones
    h_weft = sv * (1.0 - 0.5 * sign * su)
    warp_on_top = h_warp >= h_weft
    height = np.maximum(h_warp, h_weft)
    shade = 0.22 + 0.78 * np.clip(height / 1.5, 0.0, 1.0) ** 0.7
    fibre = np.where(warp_on_top, fibre_warp, fibre_weft)
    colour = np.where(warp_on_top[..., None], warp, weft) * (1.0 + 0.07 * fibre)[..., None]
    img = (colour * (shade * light)[..., None]).astype(np.float32)
    return img, {}


def _defect_weave(cv, rng, img, state, defect, u):
    s, n = cv.s, cv.size
    cx, cy = rng.uniform(0.12 * n, 0.88 * n, 2)
    if defect == "hole":
        radius = _size_between(2.5 * s, 13.0 * s, u)
        alpha = _blob(cv, rng, cx, cy, radius, rough=0.4, aspect=rng.uniform(1.0, 1.6))
        backing = np.array([0.07, 0.06, 0.05]) * (1.0 + 0.3 * _noise(rng, cv.shape, 1.0 * s))[..., None]
        return _over(img, alpha, backing)
    if defect == "stain":
        radius = _size_between(3.0 * s, 17.0 * s, u)
        palette = [(0.45, 0.18, 0.10), (0.18, 0.16, 0.13), (0.16, 0.22, 0.55), (0.40, 0.42, 0.12)]
        colour = np.array(palette[rng.integers(len(palette))], np.float32)
        blob = _blob(cv, rng, cx, cy, radius, rough=0.35, aspect=rng.uniform(1.0, 1.8))
        blob = ndimage.gaussian_filter(blob, 0.8 * s)
        alpha = blob * rng.uniform(0.6, 0.85) * (1.0 + 0.12 * _noise(rng, cv.shape, 2.0 * s))
        alpha = np.clip(alpha, 0.0, 1.0)
        lum = img.mean(axis=2, keepdims=True)
        textured = colour * (0.5 + 0.5 * lum / max(float(lum.mean()), 1e-3))  # the weave shows through the stain
        return _over(img, alpha, textured)
    raise AssertionError(defect)


# --------------------------------------------------------------------------------------------------------------------
# granite: speckled stone (grayscale texture)


def _render_granite(cv: _Canvas, rng: np.random.Generator):
    s = cv.s
    img = 0.50 + 0.05 * _noise(rng, cv.shape, 14 * s) + 0.035 * _noise(rng, cv.shape, 4 * s)
    fine = _noise(rng, cv.shape, 0.6 * s)
    dark = np.clip((_noise(rng, cv.shape, 1.1 * s) - 1.25) / 0.25, 0.0, 1.0)
    bright = np.clip((_noise(rng, cv.shape, 1.5 * s) - 1.15) / 0.25, 0.0, 1.0)
    img = img + 0.04 * fine
    img = img * (1 - bright) + (0.82 + 0.04 * fine) * bright
    img = img * (1 - dark) + (0.14 + 0.03 * fine) * dark
    img = img * _lighting(cv, rng, 0.07, 0.06)
    return img.astype(np.float32), {}


def _defect_granite(cv, rng, img, state, defect, u):
    s, n = cv.s, cv.size
    if defect == "crack":
        length = _size_between(18.0 * s, 75.0 * s, u)
        x0, y0 = rng.uniform(0.15 * n, 0.85 * n, 2)
        points = _curve(rng, x0, y0, length, rng.uniform(0, 2 * np.pi), wiggle=0.1 / s ** 0.5,
                        kinks=0.12 / s)
        width = rng.uniform(1.5, 2.2) * s
        alpha = _stroke(cv, points, _taper(len(points), width, rng))
        for _ in range(rng.integers(0, 3) if length > 25 * s else 0):  # branches
            start = points[rng.integers(len(points) // 4, len(points))]
            branch = _curve(rng, start[0], start[1], length * rng.uniform(0.2, 0.45),
                            rng.uniform(0, 2 * np.pi), wiggle=0.1 / s ** 0.5, kinks=0.12 / s)
            alpha = np.maximum(alpha, _stroke(cv, branch, _taper(len(branch), 0.8 * width, rng)))
        return _over(img, alpha, 0.04)
    if defect == "contamination":
        radius = _size_between(2.5 * s, 11.0 * s, u)
        cx, cy = rng.uniform(0.12 * n, 0.88 * n, 2)
        alpha = _blob(cv, rng, cx, cy, radius, rough=0.3, aspect=rng.uniform(1.0, 1.5))
        value = 0.97 if rng.uniform() < 0.5 else 0.04
        shading = value + 0.03 * ((cv.x - cx) - (cv.y - cy)) / max(radius, 1.0) * (1 if value < 0.5 else -1)
        return _over(img, alpha, np.clip(shading, 0.0, 1.0))
    raise AssertionError(defect)


# --------------------------------------------------------------------------------------------------------------------
# washer: a machined metal ring on felt (RGB object)


def _render_washer(cv: _Canvas, rng: np.random.Generator):
    s, n = cv.s, cv.size
    cx, cy = n / 2 + rng.uniform(-3.0, 3.0, 2) * s
    r_out = 0.36 * n * rng.uniform(0.98, 1.02)
    r_in = 0.165 * n * rng.uniform(0.97, 1.03)
    light_dir = np.deg2rad(-45.0 + rng.uniform(-20.0, 20.0))
    groove_phase = rng.uniform(0, 2 * np.pi)

    felt = 1.0 + 0.04 * _noise(rng, cv.shape, 10 * s) + 0.05 * _noise(rng, cv.shape, 0.7 * s)
    background = np.array([0.16, 0.20, 0.29], np.float32) * felt[..., None]

    dx, dy = cv.x - cx, cv.y - cy
    r, phi = np.hypot(dx, dy), np.arctan2(dy, dx)
    ring = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)
    shadow = ndimage.gaussian_filter(np.roll(ring, (int(round(2.5 * s)), int(round(2.0 * s))), axis=(0, 1)), 2.5 * s)
    background = background * (1.0 - 0.5 * shadow)[..., None]

    t = np.clip((r - r_in) / (r_out - r_in), 0.0, 1.0)
    edge = np.minimum(r - r_in, r_out - r) / (1.6 * s)
    bevel = np.clip(edge, 0.0, 1.0)
    highlight = np.cos(phi - light_dir) ** 2 * np.exp(-((t - 0.45) / 0.35) ** 2)
    grooves = np.sin(2 * np.pi * r / (2.3 * s) + groove_phase)
    brightness = (0.48 + 0.12 * np.sin(np.pi * t) + 0.30 * highlight + 0.025 * grooves) * (0.65 + 0.35 * bevel)
    brightness = brightness * rng.uniform(0.94, 1.06) + 0.02 * _noise(rng, cv.shape, 0.8 * s)
    metal = np.array([0.80, 0.82, 0.86], np.float32) * brightness[..., None]
    light = _lighting(cv, rng, 0.05, 0.0)[..., None]
    img = _over(background, ring, metal) * light
    state = dict(cx=cx, cy=cy, r_in=r_in, r_out=r_out, ring=ring, background=background * light, metal=metal * light)
    return img.astype(np.float32), state


def _defect_washer(cv, rng, img, state, defect, u):
    s = cv.s
    cx, cy, r_in, r_out = state["cx"], state["cy"], state["r_in"], state["r_out"]
    if defect == "scratch":
        rad = rng.uniform(r_in + 3 * s, r_out - 3 * s)
        ang = rng.uniform(0, 2 * np.pi)
        length = _size_between(10.0 * s, 45.0 * s, u)
        points = _curve(rng, cx + rad * np.cos(ang), cy + rad * np.sin(ang), length, rng.uniform(0, 2 * np.pi),
                        wiggle=0.05 / s ** 0.5, bend=rng.uniform(-0.02, 0.02) / s)
        alpha = _stroke(cv, points, _taper(len(points), rng.uniform(0.9, 1.8) * s, rng)) * state["ring"]
        colour = np.array([0.20, 0.20, 0.22]) if rng.uniform() < 0.6 else np.array([1.0, 1.0, 1.0])
        return _over(img, alpha, colour)
    if defect == "broken":
        on_outer = rng.uniform() < 0.7
        edge = r_out if on_outer else r_in
        ang = rng.uniform(0, 2 * np.pi)
        radius = _size_between(3.0 * s, 13.0 * s, u) * (1.0 if on_outer else 0.7)
        chunk = _blob(cv, rng, cx + edge * np.cos(ang), cy + edge * np.sin(ang), radius, rough=0.45,
                      aspect=rng.uniform(1.0, 1.5))
        ring = state["ring"] * (1.0 - chunk)
        return _over(state["background"], ring, state["metal"])
    raise AssertionError(defect)


# --------------------------------------------------------------------------------------------------------------------
# pcb_chip: an IC on a board (RGB object)

_PINS_PER_SIDE = 6


PCB_LAYOUT_SEED = 20240101


@lru_cache(maxsize=2)
def _pcb_layout(layout_seed: int = PCB_LAYOUT_SEED):
    """The fixed board design (traces, vias, marking glyphs): the same product in every image."""
    rng = np.random.default_rng(layout_seed)
    glyphs = rng.random((2, 4, 5, 3)) < 0.55
    text = np.zeros((2 * 6 - 1, 4 * 4 - 1), bool)
    for row in range(2):
        for col in range(4):
            text[row * 6: row * 6 + 5, col * 4: col * 4 + 3] = glyphs[row, col]
    traces = []  # (x0, x1, y0, y1) in units of the image size, board frame centred on the chip
    for side in (-1, 1):
        for k in range(_PINS_PER_SIDE):
            yk = -0.25 + (k + 0.5) * 0.5 / _PINS_PER_SIDE
            end = 0.36 + 0.12 * rng.random()
            x0, x1 = sorted((side * 0.30, side * end))
            traces.append((x0, x1, yk - 0.009, yk + 0.009))
    for y in (-0.40, -0.35, 0.36, 0.43):
        x0 = -0.55 + 0.3 * rng.random()
        traces.append((x0, x0 + 0.5 + 0.4 * rng.random(), y - 0.008, y + 0.008))
    for x in (-0.08, 0.05, 0.12):
        traces.append((x - 0.008, x + 0.008, -0.55, -0.33))
    vias = [(side * (0.36 + 0.12 * rng.random()), -0.25 + (k + 0.5) * 0.5 / _PINS_PER_SIDE)
            for side in (-1, 1) for k in range(0, _PINS_PER_SIDE, 2)]
    vias += [(-0.08, -0.33), (0.12, -0.33), (0.40, 0.36), (-0.30, 0.43)]
    return text, traces, vias


def _pcb_scene(cv: _Canvas, rng: np.random.Generator):
    s, n = cv.s, cv.size
    theta = np.deg2rad(rng.uniform(-3.0, 3.0))
    cx, cy = n / 2 + rng.uniform(-3.0, 3.0, 2) * s
    dx, dy = cv.x - cx, cv.y - cy
    X = dx * np.cos(theta) + dy * np.sin(theta)
    Y = -dx * np.sin(theta) + dy * np.cos(theta)
    board_tex = 1.0 + 0.04 * _noise(rng, cv.shape, 6 * s) + 0.03 * _noise(rng, cv.shape, 0.6 * s)
    body_tex = 0.012 * _noise(rng, cv.shape, 0.7 * s)
    board_tint = rng.uniform(0.95, 1.05, 3)
    light = _lighting(cv, rng, 0.06, 0.06)
    return dict(X=X, Y=Y, cx=cx, cy=cy, theta=theta, board_tex=board_tex, body_tex=body_tex,
                board_tint=board_tint, light=light)


def _render_pcb(cv: _Canvas, scene: dict, missing=()) -> np.ndarray:
    n, s = cv.size, cv.s
    X, Y = scene["X"], scene["Y"]
    text, traces, vias = _pcb_layout(scene.get("layout_seed", PCB_LAYOUT_SEED))
    img = (np.array(scene.get("board_colour", (0.07, 0.36, 0.17))) * scene["board_tint"]) * scene["board_tex"][..., None]
    img = img.astype(np.float32)
    trace_alpha = np.zeros(cv.shape, np.float32)
    for x0, x1, y0, y1 in traces:
        trace_alpha = np.maximum(trace_alpha, _box(X, Y, x0 * n, x1 * n, y0 * n, y1 * n))
    img = _over(img, trace_alpha, np.array([0.14, 0.52, 0.24]) * scene["board_tex"][..., None])
    silk = _box(X, Y, -0.335 * n, 0.335 * n, -0.315 * n, 0.315 * n) * (
        1.0 - _box(X, Y, -0.325 * n, 0.325 * n, -0.305 * n, 0.305 * n))
    img = _over(img, silk, (0.88, 0.88, 0.82))
    for vx, vy in vias:
        ring = _disc(X, Y, vx * n, vy * n, 0.022 * n)
        img = _over(img, ring, (0.78, 0.64, 0.30))
        img = _over(img, _disc(X, Y, vx * n, vy * n, 0.009 * n), (0.05, 0.05, 0.04))

    pitch = 0.5 * n / _PINS_PER_SIDE
    k = np.clip(np.floor((Y + 0.25 * n) / pitch), 0, _PINS_PER_SIDE - 1)
    yk = -0.25 * n + (k + 0.5) * pitch
    for side in (-1, 1):
        Xs = side * X
        pad = _box(Xs, Y - yk, 0.245 * n, 0.31 * n, -0.03 * n, 0.03 * n)
        img = _over(img, pad, (0.80, 0.68, 0.40))
        pin = _box(Xs, Y - yk, 0.19 * n, 0.29 * n, -0.021 * n, 0.021 * n)
        for side_m, k_m in missing:
            if side_m == side:
                pin = pin * (k != k_m)
        along = np.clip((Xs - 0.19 * n) / (0.10 * n), 0.0, 1.0)
        shade = 0.62 + 0.3 * np.exp(-((along - 0.45) / 0.2) ** 2) + 0.1 * np.cos(np.pi * (Y - yk) / (0.05 * n))
        img = _over(img, pin, np.array([0.80, 0.80, 0.83]) * shade[..., None])

    body = _box(X, Y, -0.2 * n, 0.2 * n, -0.25 * n, 0.25 * n)
    rim = np.clip(np.minimum(0.2 * n - np.abs(X), 0.25 * n - np.abs(Y)) / (1.5 * s), 0.0, 1.0)
    body_colour = (0.13 + scene["body_tex"] + 0.08 * (1.0 - rim))[..., None] * np.array([1.0, 1.0, 1.07])
    img = _over(img, body, body_colour)
    img = _over(img, _disc(X, Y, -0.13 * n, -0.18 * n, 0.024 * n), (0.23, 0.23, 0.25))
    bit = 0.018 * n
    ti = np.floor((Y + 0.02 * n) / bit).astype(np.int64)
    tj = np.floor((X + 0.135 * n) / bit).astype(np.int64)
    inside = (ti >= 0) & (ti < text.shape[0]) & (tj >= 0) & (tj < text.shape[1])
    marking = np.zeros(cv.shape, np.float32)
    marking[inside] = text[ti[inside], tj[inside]]
    marking = ndimage.gaussian_filter(marking, 0.35 * s) * body
    img = _over(img, marking * 0.85, (0.78, 0.78, 0.74))
    return (img * scene["light"][..., None]).astype(np.float32)


def _render_pcb_chip(cv: _Canvas, rng: np.random.Generator, layout_seed: int = PCB_LAYOUT_SEED,
                     board_colour=(0.07, 0.36, 0.17)):
    scene = _pcb_scene(cv, rng)
    scene.update(layout_seed=layout_seed, board_colour=board_colour)
    return _render_pcb(cv, scene), scene


def _defect_pcb_chip(cv, rng, img, scene, defect, u):
    s, n = cv.s, cv.size
    if defect == "missing_pin":
        side = int(rng.choice([-1, 1]))
        count = 1 if u < 0.6 else 2
        first = int(rng.integers(0, _PINS_PER_SIDE - count + 1))
        return _render_pcb(cv, scene, missing=[(side, first + i) for i in range(count)])
    if defect == "contamination":
        # a point on the part or right next to it, in the board frame, then back to image coordinates
        bx, by = rng.uniform(-0.3 * n, 0.3 * n), rng.uniform(-0.29 * n, 0.29 * n)
        ct, st = np.cos(scene["theta"]), np.sin(scene["theta"])
        cx, cy = scene["cx"] + bx * ct - by * st, scene["cy"] + bx * st + by * ct
        radius = _size_between(1.8 * s, 9.0 * s, u)
        alpha = _blob(cv, rng, cx, cy, radius, rough=0.3, aspect=rng.uniform(1.0, 1.6))
        if rng.uniform() < 0.5:  # solder splash: shiny grey with a highlight
            hx, hy = cx - 0.3 * radius, cy - 0.3 * radius
            gloss = np.exp(-((cv.x - hx) ** 2 + (cv.y - hy) ** 2) / (0.5 * radius + 0.5) ** 2)
            colour = np.array([0.62, 0.62, 0.66]) * (0.8 + 0.6 * gloss)[..., None]
        else:  # flux residue: translucent brown
            colour = np.array([0.55, 0.36, 0.10])
            alpha = alpha * 0.8
        return _over(img, alpha, np.clip(colour, 0.0, 1.0))
    raise AssertionError(defect)


_RENDERERS = {
    "weave": (_render_weave, _defect_weave),
    "granite": (_render_granite, _defect_granite),
    "washer": (_render_washer, _defect_washer),
    "pcb_chip": (_render_pcb_chip, _defect_pcb_chip),
    # the same weave 10 % finer with slightly other yarn colours; the same chip on a board of another layout
    "weave_b": (partial(_render_weave, period=7.2, warp_colour=(0.56, 0.47, 0.36), weft_colour=(0.78, 0.71, 0.56)),
                _defect_weave),
    "pcb_chip_b": (partial(_render_pcb_chip, layout_seed=20240102, board_colour=(0.06, 0.33, 0.20)),
                   _defect_pcb_chip),
}


# --------------------------------------------------------------------------------------------------------------------
# one image


def _image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index])


def _camera(img: np.ndarray, noise: np.ndarray, blur: float) -> np.ndarray:
    sigma = (blur, blur, 0.0)[: img.ndim]
    return _to_uint8(ndimage.gaussian_filter(img, sigma) + noise)


def render_sample(category: str, seed: int, split: str, index: int, image_size: int = 128,
                  defect: str | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Render one image: returns (image, mask or None, the same image without the defect), all uint8.

    `split` names the random stream ("train", "test_good" or the defect type); images are (H, W, 3), or (H, W) for
    grayscale categories; the mask is bool, exactly the pixels the defect changed by >= VISIBLE_THRESHOLD.
    """
    cv = _canvas(image_size)
    rng = _image_rng(seed, category, split, index)
    render, apply_defect = _RENDERERS[category]
    clean, state = render(cv, rng)
    if category in GRAYSCALE_CATEGORIES:
        clean = clean if clean.ndim == 2 else clean.mean(axis=2)
    noise = rng.normal(0.0, _NOISE_SIGMA, clean.shape).astype(np.float32)
    blur = 0.4 * cv.s
    good = _camera(clean, noise, blur)
    if defect is None:
        return good, None, good
    size_u = (index * _GOLDEN + 0.1 * rng.uniform()) % 1.0  # spreads defect sizes over small..large
    min_pixels = max(4, int(0.0003 * image_size * image_size))
    for _ in range(50):
        bad = _camera(apply_defect(cv, rng, clean, state, defect, size_u), noise, blur)
        diff = np.abs(bad.astype(np.int16) - good.astype(np.int16))
        if diff.ndim == 3:
            diff = diff.max(axis=2)
        mask = diff >= VISIBLE_THRESHOLD
        if min_pixels <= int(mask.sum()) <= image_size * image_size // 2:
            return bad, mask, good
    raise RuntimeError(f"could not place a visible {defect} defect on {category} image {index}")  # not expected


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


# --------------------------------------------------------------------------------------------------------------------
# the data set


def _expected_files(category: str, n_train: int, n_test_good: int, n_test_defect: int) -> list[Path]:
    files = [Path(category, "train", "good", f"{i:03d}.png") for i in range(n_train)]
    files += [Path(category, "test", "good", f"{i:03d}.png") for i in range(n_test_good)]
    for defect in DEMO_DEFECT_TYPES[category]:
        for i in range(n_test_defect):
            files.append(Path(category, "test", defect, f"{i:03d}.png"))
            files.append(Path(category, "ground_truth", defect, f"{i:03d}_mask.png"))
    return files


def _write_category(root: Path, category: str, seed: int, image_size: int, n_train: int, n_test_good: int,
                    n_test_defect: int) -> None:
    folder = root / category
    jobs = [("train", "train/good", n_train, None), ("test_good", "test/good", n_test_good, None)]
    jobs += [(d, f"test/{d}", n_test_defect, d) for d in DEMO_DEFECT_TYPES[category]]
    for split, sub, count, defect in jobs:
        out = folder / sub
        out.mkdir(parents=True, exist_ok=True)
        if defect is not None:
            (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, mask, _ = render_sample(category, seed, split, i, image_size, defect)
            _save_png(image, out / f"{i:03d}.png")
            if mask is not None:
                _save_png(np.where(mask, 255, 0).astype(np.uint8), folder / "ground_truth" / defect / f"{i:03d}_mask.png")


def _resolve_categories(categories) -> list[str]:
    if categories is None:
        return list(DEMO_CATEGORIES)
    if isinstance(categories, str):
        categories = [c for c in categories.split(",") if c.strip()]
    names = []
    for c in categories:
        c = str(c).strip()
        if c not in ALL_CATEGORIES:
            raise UcadError(f"unknown demo category '{c}': the known ones are {', '.join(ALL_CATEGORIES)}")
        if c not in names:
            names.append(c)
    if not names:
        raise UcadError(f"no demo category given: choose from {', '.join(DEMO_CATEGORIES)}")
    return names


def _check_int(name: str, value, minimum: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise UcadError(f"{name} must be a whole number, got {value!r}") from None
    if value < minimum:
        raise UcadError(f"{name} must be at least {minimum}, got {value}")
    return value


def _read_manifest(root: Path):
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == "ucad.demo_data" else None


def _write_manifest(root: Path, params: dict, done: list[str]) -> None:
    done = sorted(set(done), key=ALL_CATEGORIES.index)
    data = {
        "generator": "ucad.demo_data",
        "parameters": params,
        "categories": done,
        "defect_types": {c: DEMO_DEFECT_TYPES[c] for c in done},
        "grayscale": [c for c in done if c in GRAYSCALE_CATEGORIES],
        "layout": "MVTec AD",
    }
    with atomic_write(root / MANIFEST_NAME) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _generate(root, categories, seed, image_size, n_train, n_test_good, n_test_defect, overwrite):
    names = _resolve_categories(categories)
    params = {
        "version": GENERATOR_VERSION,
        "seed": _check_int("seed", seed, 0),
        "image_size": _check_int("image_size", image_size, 32),
        "n_train": _check_int("n_train", n_train, 1),
        "n_test_good": _check_int("n_test_good", n_test_good, 1),
        "n_test_defect": _check_int("n_test_defect", n_test_defect, 1),
    }
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UcadError(f"demo data path '{root}' exists and is not a folder: choose a folder path")
    manifest = _read_manifest(root)
    done: list[str] = []
    if manifest is not None:
        listed = [c for c in manifest.get("categories", []) if c in ALL_CATEGORIES]
        if manifest.get("parameters") == params and not overwrite:
            done = listed
        else:  # a demo set of ours with other parameters (or overwrite asked): replace it
            for c in listed:
                shutil.rmtree(root / c, ignore_errors=True)
    elif root.exists() and any(root.iterdir()) and not overwrite:
        raise UcadError(
            f"'{root}' is not empty and holds no demo data set ({MANIFEST_NAME} missing): choose an empty or new "
            "folder, or pass overwrite=True (--overwrite) to write the demo categories into it"
        )
    root.mkdir(parents=True, exist_ok=True)
    counts = (params["n_train"], params["n_test_good"], params["n_test_defect"])
    written = []
    for c in names:
        if c in done and all((root / f).is_file() for f in _expected_files(c, *counts)):
            continue
        shutil.rmtree(root / c, ignore_errors=True)
        done = [d for d in done if d != c]
        _write_manifest(root, params, done)
        _write_category(root, c, params["seed"], params["image_size"], *counts)
        done.append(c)
        _write_manifest(root, params, done)
        written.append(c)
    if not written and manifest is None:
        _write_manifest(root, params, done)
    return names, written


def generate_demo_dataset(root, categories=None, seed: int = 0, image_size: int = 128, n_train: int = 24,
                          n_test_good: int = 8, n_test_defect: int = 8, overwrite: bool = False) -> list[str]:
    """Write the synthetic demo data set under `root` in the MVTec AD layout; return the category names.

    `categories`: names from `ALL_CATEGORIES` (a list, or a comma-separated string), None for the four main ones; an unknown name
    raises `UcadError`. `n_test_defect` is per defect type. Categories already present with the same parameters
    (recorded in ROOT/demo_dataset.json) are not written again; a demo set written with other parameters is
    replaced. A non-empty folder without that file is refused unless `overwrite` is true (then the requested
    category folders are replaced, nothing else is touched).
    """
    names, _ = _generate(root, categories, seed, image_size, n_train, n_test_good, n_test_defect, overwrite)
    return names


# --------------------------------------------------------------------------------------------------------------------
# command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ucad.demo",
        description="Write a small synthetic industrial anomaly data set (MVTec AD layout) for demos and tests. "
                    f"Categories: {', '.join(DEMO_CATEGORIES)}; look-alike variants for routing tests: "
                    f"{', '.join(LOOKALIKE_CATEGORIES)}.",
    )
    parser.add_argument("out_dir", help="folder to write the data set into (the DATA_PATH of `dataset mvtec`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", "--image-size", type=int, default=128)
    parser.add_argument("--n_train", "--n-train", type=int, default=24, help="normal training images per category")
    parser.add_argument("--n_test_good", "--n-test-good", type=int, default=8, help="normal test images per category")
    parser.add_argument("--n_test_defect", "--n-test-defect", type=int, default=8,
                        help="test images per defect type (2 defect types per category)")
    parser.add_argument("--categories", default=None, help="comma-separated subset, in task order (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that is no demo set")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        names, written = _generate(args.out_dir, args.categories, args.seed, args.image_size, args.n_train,
                                   args.n_test_good, args.n_test_defect, args.overwrite)
    except UcadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    root = Path(args.out_dir)
    for c in names:
        kind = "grayscale" if c in GRAYSCALE_CATEGORIES else "RGB"
        state = "written" if c in written else "already there, kept"
        print(f"{root / c}: {args.n_train} train/good, {args.n_test_good} test/good, "
              f"{args.n_test_defect} each of test/{{{','.join(DEMO_DEFECT_TYPES[c])}}} with masks "
              f"({kind} {args.image_size}x{args.image_size}; {state})")
    print(f"demo data set in {root} ({len(written)} of {len(names)} categories written in "
          f"{time.perf_counter() - start:.1f} s); use it as: dataset {' '.join('-d ' + c for c in names)} mvtec {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
