"""A third procedural dataset ("shapes3") that no training default was chosen on.

``train-vae``'s defaults were chosen before this data existed; it checks that they generalise.
Same seven ground-truth factors, in the same order and with the same names as the demo
(:data:`~latentexplainer_plugin.data.shapes.FACTOR_NAMES`), rendered by the demo renderer from
the spec below; everything else differs from both ``shapes`` and ``shapes2``:

* shapes: ellipse, cross and triangle (a mix neither other dataset draws), area-matched by
  :data:`~latentexplainer_plugin.data.shapes.AREA_MATCH`;
* background: a cool blue tint and a vertical gradient that is darker at the top (shapes2: warm,
  brighter at the top; demo: flat grey);
* object colour: pastel, saturation 0.6 and value 0.85, hue from orange to blue;
* factor ranges: positions 0.22-0.78 (wider), scale 0.10-0.24 (from smaller than the demo's
  smallest to larger than its largest), rotation -45..45 degrees, background brightness 0.1-0.5.

``latentexplainer make-data --dataset shapes3 --out FILE.npz`` writes it in the ``train-vae`` npz
layout.
"""

from __future__ import annotations

import numpy as np

from . import shapes
from .shapes import ShapesSpec

__all__ = ["SHAPES3", "make_dataset", "render"]

SHAPES3 = ShapesSpec(
    shapes=("ellipse", "cross", "triangle"),
    x_range=(0.22, 0.78),
    y_range=(0.22, 0.78),
    scale_range=(0.10, 0.24),
    rotation_range=(-45.0, 45.0),  # the cross repeats every 90 degrees: one full period, no more
    hue_range=(0.08, 0.62),  # orange .. blue, no wrap-around
    background_range=(0.1, 0.5),
    saturation=0.6,
    value=0.85,
    tint=(0.72, 0.86, 1.0),
    gradient=-0.16,  # darker at the top
)


def render(factors: np.ndarray, spec: ShapesSpec = SHAPES3, chunk: int = 2048) -> np.ndarray:
    """Render factor rows (columns in ``FACTOR_NAMES`` order) to uint8 images (N, size, size, 3)."""
    return shapes.render(factors, spec, chunk)


def make_dataset(n: int, spec: ShapesSpec = SHAPES3, seed: int = 0) -> dict[str, np.ndarray]:
    """The ``train-vae`` npz layout of the third dataset (see :func:`shapes.make_dataset`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return shapes.make_dataset(n, spec, seed)
