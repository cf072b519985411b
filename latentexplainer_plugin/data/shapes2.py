"""A second procedural dataset ("shapes2"), different from the demo's, for evaluating explanations
on a model that was not tuned with the demo in mind.

Same seven ground-truth factors, in the same order and with the same names as the demo
(:data:`~latentexplainer_plugin.data.shapes.FACTOR_NAMES`), so one set of factor descriptions
serves both; everything else differs:

* shapes: diamond, cross and ring (the demo draws square, ellipse and triangle), area-matched by
  :data:`~latentexplainer_plugin.data.shapes.AREA_MATCH`;
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

import numpy as np

from . import shapes
from .shapes import ShapesSpec

__all__ = ["SHAPES2", "make_dataset", "render"]

SHAPES2 = ShapesSpec(
    shapes=("diamond", "cross", "ring"),
    x_range=(0.28, 0.72),
    y_range=(0.28, 0.72),
    scale_range=(0.09, 0.18),
    rotation_range=(-30.0, 30.0),  # the cross repeats every 90 degrees: keep the range shorter
    hue_range=(0.28, 0.92),  # green .. pink, no wrap-around
    background_range=(0.08, 0.5),
    saturation=0.75,
    value=0.95,
    tint=(1.0, 0.86, 0.68),
    gradient=0.08,
)


def render(factors: np.ndarray, spec: ShapesSpec = SHAPES2, chunk: int = 2048) -> np.ndarray:
    """Render factor rows (columns in ``FACTOR_NAMES`` order) to uint8 images (N, size, size, 3)."""
    return shapes.render(factors, spec, chunk)


def make_dataset(n: int, spec: ShapesSpec = SHAPES2, seed: int = 0) -> dict[str, np.ndarray]:
    """The ``train-vae`` npz layout of the second dataset (see :func:`shapes.make_dataset`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return shapes.make_dataset(n, spec, seed)
