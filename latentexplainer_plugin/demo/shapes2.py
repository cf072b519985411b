"""A second procedural dataset ("shapes2"), different from the demo's, for evaluating explanations
on a model that was not tuned with the demo in mind.

Same seven ground-truth factors, in the same order and with the same names as the demo
(:data:`~latentexplainer_plugin.demo.shapes.FACTOR_NAMES`), so one set of factor descriptions
serves both; everything else differs:

* shapes: diamond, cross and ring (the demo draws square, ellipse and triangle), area-matched by
  :data:`~latentexplainer_plugin.demo.shapes.AREA_MATCH`;
* background: a warm-tinted vertical gradient (brighter at the top) whose overall brightness is
  the ``background`` factor, instead of a uniform grey;
* object colour: saturation 0.75 and value 0.95 (demo: 0.9 and 1.0), hue from green to pink
  (demo: red to blue);
* factor ranges: positions 0.28-0.72, scale 0.09-0.18, rotation -30..30 degrees, background
  brightness 0.08-0.5 (see :data:`SHAPES2`).

``latentexplainer make-data --dataset shapes2 --out FILE.npz`` writes it in the ``train-vae`` npz
layout.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from .shapes import FACTOR_NAMES, ShapesSpec, _inside, sample_factors

__all__ = ["SHAPES2", "Shapes2Spec", "make_dataset", "render"]


@dataclass(frozen=True)
class Shapes2Spec(ShapesSpec):
    """:class:`ShapesSpec` plus the look of the object and of the background.

    The background at height ``y`` (0 top, 1 bottom) is
    ``clip(b * tint + gradient * (0.5 - y))`` per channel, ``b`` the background factor.
    """

    tint: tuple[float, float, float] = (1.0, 0.86, 0.68)
    gradient: float = 0.08
    saturation: float = 0.75
    value: float = 0.95


SHAPES2 = Shapes2Spec(
    shapes=("diamond", "cross", "ring"),
    x_range=(0.28, 0.72),
    y_range=(0.28, 0.72),
    scale_range=(0.09, 0.18),
    rotation_range=(-30.0, 30.0),  # the cross repeats every 90 degrees: keep the range shorter
    hue_range=(0.28, 0.92),  # green .. pink, no wrap-around
    background_range=(0.08, 0.5),
)


def render(factors: np.ndarray, spec: Shapes2Spec = SHAPES2, chunk: int = 2048) -> np.ndarray:
    """Render factor rows (columns in ``FACTOR_NAMES`` order) to uint8 images (N, size, size, 3)."""
    factors = np.asarray(factors, dtype=np.float64)
    if factors.ndim != 2 or factors.shape[1] != len(FACTOR_NAMES):
        raise ValueError(f"factors must have shape (N, {len(FACTOR_NAMES)}), got {factors.shape}")
    size = spec.size
    sub = (np.arange(size * 2) + 0.5) / (size * 2)  # 2x2 supersampling grid in [0,1]
    gy, gx = np.meshgrid(sub, sub, indexing="ij")
    rows = (np.arange(size) + 0.5) / size
    ramp = (spec.gradient * (0.5 - rows)).reshape(1, size, 1, 1)
    tint = np.asarray(spec.tint, dtype=np.float64).reshape(1, 1, 1, 3)
    out = np.empty((len(factors), size, size, 3), dtype=np.uint8)
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
        colour = np.array([colorsys.hsv_to_rgb(h, spec.saturation, spec.value) for h in f[:, 5]]).reshape(n, 1, 1, 3)
        bg = np.clip(f[:, 6].reshape(n, 1, 1, 1) * tint + ramp, 0.0, 1.0)
        img = cover * colour + (1.0 - cover) * bg
        out[start : start + n] = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    return out


def make_dataset(n: int, spec: Shapes2Spec = SHAPES2, seed: int = 0) -> dict[str, np.ndarray]:
    """The ``train-vae`` npz layout: ``images`` (N,H,W,3 uint8), ``factors`` (N,7), ``factor_names``,
    ``shape_names``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    factors = sample_factors(n, spec, seed)
    return {
        "images": render(factors, spec),
        "factors": factors,
        "factor_names": np.array(FACTOR_NAMES),
        "shape_names": np.array(spec.shapes),
    }
