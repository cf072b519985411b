"""Procedural "shapes" images with ground-truth factors (the demo's data).

Every image is one coloured object on a uniform grey background, rendered analytically with
2x2 supersampling so edges are anti-aliased. Factors are sampled independently and uniformly,
so a model trained on this data has a known set of generative factors to discover.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

SHAPES = ("square", "ellipse", "triangle")
FACTOR_NAMES = ("shape", "x_position", "y_position", "scale", "rotation", "hue", "background")


@dataclass(frozen=True)
class ShapesSpec:
    """Ranges of every factor. A second dataset changes these (see ``evaluation``)."""

    size: int = 64
    shapes: tuple[str, ...] = SHAPES
    x_range: tuple[float, float] = (0.25, 0.75)
    y_range: tuple[float, float] = (0.25, 0.75)
    scale_range: tuple[float, float] = (0.12, 0.22)  # half-extent, as a fraction of the image
    rotation_range: tuple[float, float] = (-40.0, 40.0)  # degrees
    hue_range: tuple[float, float] = (0.0, 0.72)  # red .. blue, no wrap-around
    background_range: tuple[float, float] = (0.0, 0.45)
    ellipse_aspect: float = 0.5
    saturation: float = 0.9  # object colour = HSV(hue, saturation, value)
    value: float = 1.0
    # background at height y (0 top, 1 bottom): clip(b * tint + gradient * (0.5 - y)), b the factor
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gradient: float = 0.0


def sample_factors(n: int, spec: ShapesSpec = ShapesSpec(), seed: int = 0) -> np.ndarray:
    """Sample ``n`` factor rows (columns in ``FACTOR_NAMES`` order), uniformly and independently."""
    rng = np.random.default_rng(seed)
    cols = [
        rng.integers(0, len(spec.shapes), n).astype(np.float32),
        rng.uniform(*spec.x_range, n),
        rng.uniform(*spec.y_range, n),
        rng.uniform(*spec.scale_range, n),
        rng.uniform(*spec.rotation_range, n),
        rng.uniform(*spec.hue_range, n),
        rng.uniform(*spec.background_range, n),
    ]
    return np.stack(cols, axis=1).astype(np.float32)


# Half-extent multipliers that give every shape the same area (2.4 s^2) at the same scale s, so
# that "scale" means size and "shape" changes the outline, not the amount of colour. Area at
# multiplier 1: square 4, ellipse pi/2 (aspect 0.5), triangle 2, diamond 1.25, cross 2.31
# (two 2 x 0.7 bars less their 0.7 x 0.7 overlap), ring 0.6 pi (1 - 0.55^2); the multiplier is
# sqrt(2.4 / area) (tests/test_evaluation_harness.py measures every one within 1 %).
AREA_MATCH = {"square": 0.775, "ellipse": 1.236, "triangle": 1.095, "diamond": 1.386, "cross": 1.019, "ring": 1.351}


def _inside(shape: str, u: np.ndarray, v: np.ndarray, s: np.ndarray, aspect: float) -> np.ndarray:
    """Point-in-shape test in the object's own frame (u right, v down, scale s)."""
    s = s * AREA_MATCH.get(shape, 1.0)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= s
    if shape == "ellipse":
        return (u / s) ** 2 + (v / (s * aspect)) ** 2 <= 1.0
    if shape == "triangle":
        # Isosceles triangle pointing up, so rotation is visible: apex (0,-s), base at v = s.
        return (v <= s) & (2.0 * u - v <= s) & (-2.0 * u - v <= s)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) * 1.6 <= s
    if shape == "cross":
        arm = s * 0.35
        return ((np.abs(u) <= s) & (np.abs(v) <= arm)) | ((np.abs(v) <= s) & (np.abs(u) <= arm))
    if shape == "ring":
        r = np.sqrt(u**2 + (v / 0.6) ** 2)
        return (r <= s) & (r >= 0.55 * s)
    raise ValueError(f"unknown shape {shape!r}; known shapes: square, ellipse, triangle, diamond, cross, ring")


def render(factors: np.ndarray, spec: ShapesSpec = ShapesSpec(), chunk: int = 2048, masks: bool = False):
    """Render factor rows to uint8 images of shape (N, size, size, 3).

    With ``masks=True`` return ``(images, masks)``: masks (N, size, size) bool are the object's
    pixels (at least 2 of a pixel's 4 subsamples inside the object), a ground truth for where it is.
    """
    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim != 2 or factors.shape[1] != len(FACTOR_NAMES):
        raise ValueError(f"factors must have shape (N, {len(FACTOR_NAMES)}), got {factors.shape}")
    size = spec.size
    sub = (np.arange(size * 2) + 0.5) / (size * 2)  # 2x2 supersampling grid in [0,1]
    gy, gx = np.meshgrid(sub, sub, indexing="ij")
    ramp = (spec.gradient * (0.5 - (np.arange(size) + 0.5) / size)).reshape(1, size, 1, 1)
    tint = np.asarray(spec.tint, dtype=np.float64).reshape(1, 1, 1, 3)
    out = np.empty((len(factors), size, size, 3), dtype=np.uint8)
    mask_out = np.empty((len(factors), size, size), dtype=bool) if masks else None
    for start in range(0, len(factors), chunk):
        f = factors[start : start + chunk]
        n = len(f)
        x, y, s, rot = (f[:, i].reshape(n, 1, 1) for i in (1, 2, 3, 4))
        theta = np.deg2rad(rot)
        dx, dy = gx[None] - x, gy[None] - y
        u = np.cos(theta) * dx + np.sin(theta) * dy
        v = -np.sin(theta) * dx + np.cos(theta) * dy
        mask = np.zeros((n, size * 2, size * 2), dtype=bool)
        for k, shape in enumerate(spec.shapes):
            sel = f[:, 0].astype(int) == k
            if sel.any():
                mask[sel] = _inside(shape, u[sel], v[sel], s[sel], spec.ellipse_aspect)
        cover = mask.reshape(n, size, 2, size, 2).mean(axis=(2, 4))[..., None]
        if mask_out is not None:
            mask_out[start : start + n] = cover[..., 0] >= 0.5
        colour = np.array([colorsys.hsv_to_rgb(h, spec.saturation, spec.value) for h in f[:, 5]]).reshape(n, 1, 1, 3)
        bg = np.clip(f[:, 6].reshape(n, 1, 1, 1) * tint + ramp, 0.0, 1.0)
        img = cover * colour + (1.0 - cover) * bg
        out[start : start + n] = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return (out, mask_out) if masks else out


def make_dataset(n: int, spec: ShapesSpec = ShapesSpec(), seed: int = 0, masks: bool = False) -> dict[str, np.ndarray]:
    """Return the ``train-vae`` npz layout: ``images`` (N,H,W,3 uint8), ``factors``, ``factor_names``.

    With ``masks=True`` also ``masks`` (N,H,W bool): each image's object pixels (see :func:`render`).
    """
    factors = sample_factors(n, spec, seed)
    rendered = render(factors, spec, masks=masks)
    extra = {"masks": rendered[1]} if masks else {}
    return {
        "images": rendered[0] if masks else rendered,
        "factors": factors,
        "factor_names": np.array(FACTOR_NAMES),
        "shape_names": np.array(spec.shapes),
    } | extra
