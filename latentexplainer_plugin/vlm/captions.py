"""Captions from the procedural shapes' ground-truth factors, and back.

Every caption has twelve words, always in the same order::

    a {size} {colour} {shape} near the {vertical} {horizontal} on a {background} background

e.g. "a small red triangle near the top left on a dark background". Each slot is a word from a
fixed list (:data:`ATTRIBUTES`), chosen from one factor of ``data.shapes``:

* ``size``: ``scale`` in thirds of its range (small, medium, large);
* ``colour``: ``hue`` to the nearest named hue (red 0, orange 1/12, yellow 1/6, green 1/3,
  cyan 1/2, blue 2/3 of the colour wheel; the range stops at 0.72, so blue is the last word);
* ``shape``: the shape's name;
* ``vertical`` / ``horizontal``: ``y_position`` / ``x_position`` in thirds of their range;
* ``background``: ``background`` below or above the middle of its range (dark, grey).

``rotation`` is not named (a tilt word would be invisible on symmetric shapes at some angles).
:func:`parse_caption` reads any text back into one word per attribute (None where the text names
no word of that attribute, or several different ones), so generated captions can be scored
against the factors that rendered the image.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..data.shapes import FACTOR_NAMES, ShapesSpec
from ..errors import CaptionError  # noqa: F401 (re-exported)

__all__ = [
    "ATTRIBUTES",
    "CAPTION_WORDS",
    "CaptionError",
    "HUE_NAMES",
    "caption_from_factors",
    "caption_from_words",
    "factor_words",
    "parse_caption",
]


#: Attribute -> its words, in level order (the index of a word is its level).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": ("small", "medium", "large"),
    "colour": ("red", "orange", "yellow", "green", "cyan", "blue"),
    "shape": ("square", "ellipse", "triangle"),
    "vertical": ("top", "middle", "bottom"),
    "horizontal": ("left", "centre", "right"),
    "background": ("dark", "grey"),
}

#: Named hues on HSV's colour wheel (0..1); a hue takes the name of the nearest one.
HUE_NAMES: tuple[tuple[str, float], ...] = (
    ("red", 0.0), ("orange", 1 / 12), ("yellow", 1 / 6), ("green", 1 / 3), ("cyan", 1 / 2), ("blue", 2 / 3),
)

_TEMPLATE = "a {size} {colour} {shape} near the {vertical} {horizontal} on a {background} background"
#: Every word a caption can contain (the template's fixed words first).
CAPTION_WORDS: tuple[str, ...] = ("a", "near", "the", "on", "background") + tuple(
    w for words in ATTRIBUTES.values() for w in words)
_WORD_TO_ATTRIBUTE = {w: a for a, words in ATTRIBUTES.items() for w in words}
_TOKEN = re.compile(r"[a-z]+")


def _thirds(value: np.ndarray, lo_hi: tuple[float, float], parts: int = 3) -> np.ndarray:
    lo, hi = lo_hi
    return np.clip(np.floor((value - lo) / (hi - lo) * parts), 0, parts - 1).astype(int)


def _hue_levels(hue: np.ndarray) -> np.ndarray:
    centres = np.array([c for _, c in HUE_NAMES])
    # distance on the colour wheel (hue 0.95 is nearer red than blue)
    d = np.abs(hue[:, None] % 1.0 - centres[None, :])
    return np.argmin(np.minimum(d, 1.0 - d), axis=1)


def factor_words(factors: np.ndarray, spec: ShapesSpec = ShapesSpec()) -> list[dict[str, str]]:
    """One ``{attribute: word}`` dict per factor row (columns in ``data.shapes.FACTOR_NAMES`` order)."""
    f = np.asarray(factors, dtype=np.float64)
    if f.ndim == 1:
        f = f[None]
    if f.ndim != 2 or f.shape[1] != len(FACTOR_NAMES):
        raise CaptionError(f"factors must have shape (N, {len(FACTOR_NAMES)}) with columns {', '.join(FACTOR_NAMES)}; "
                           f"got {np.asarray(factors).shape}")
    shape_index = f[:, 0].astype(int)
    bad = sorted({int(i) for i in shape_index if not 0 <= i < len(spec.shapes)})
    if bad:
        raise CaptionError(f"shape index {bad[0]} is not one of 0..{len(spec.shapes) - 1} ({', '.join(spec.shapes)})")
    unknown = sorted(set(spec.shapes) - set(ATTRIBUTES["shape"]))
    if unknown:
        raise CaptionError(f"shape(s) {unknown} have no caption word; captions know {', '.join(ATTRIBUTES['shape'])}")
    levels = {
        "size": _thirds(f[:, 3], spec.scale_range),
        "colour": _hue_levels(f[:, 5]),
        "vertical": _thirds(f[:, 2], spec.y_range),
        "horizontal": _thirds(f[:, 1], spec.x_range),
        "background": _thirds(f[:, 6], spec.background_range, parts=2),
    }
    out = []
    for i in range(len(f)):
        words = {a: ATTRIBUTES[a][int(levels[a][i])] for a in levels}
        words["shape"] = spec.shapes[shape_index[i]]
        out.append({a: words[a] for a in ATTRIBUTES})
    return out


def caption_from_words(words: Mapping[str, str]) -> str:
    """The caption for one ``{attribute: word}`` dict (every attribute of :data:`ATTRIBUTES`)."""
    for attribute, allowed in ATTRIBUTES.items():
        if words.get(attribute) not in allowed:
            raise CaptionError(f"{attribute} must be one of {', '.join(allowed)}; got {words.get(attribute)!r}")
    return _TEMPLATE.format(**words)


def caption_from_factors(factors: np.ndarray, spec: ShapesSpec = ShapesSpec()) -> list[str]:
    """One caption per factor row."""
    return [caption_from_words(w) for w in factor_words(factors, spec)]


def parse_caption(text: Any) -> dict[str, str | None]:
    """``{attribute: word or None}`` read from free text: an attribute gets a word when the text
    names exactly one distinct word of it (none, or two different ones, give None)."""
    found: dict[str, set[str]] = {a: set() for a in ATTRIBUTES}
    for token in _TOKEN.findall(str(text).lower()):
        attribute = _WORD_TO_ATTRIBUTE.get(token)
        if attribute is not None:
            found[attribute].add(token)
    return {a: (next(iter(words)) if len(words) == 1 else None) for a, words in found.items()}
