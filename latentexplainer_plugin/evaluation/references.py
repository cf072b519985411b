"""Words for ground-truth factors: descriptions the factor judge compares explanations with, and
reference sentences the reference metrics (BLEU, ROUGE-L, CIDEr-D, ...) score explanations against.

Both are written for the factors of the procedural shapes datasets (``data.shapes`` and
``data.shapes2``: shape, x_position, y_position, scale, rotation, hue, background). A factor
name without an entry falls back to its name as text (``"light_angle"`` -> ``"the light angle
changes"``), so any ``factors``/``factor_names`` npz can be evaluated, with a weaker judge.

The two sets are kept apart on purpose. Descriptions name a factor in many ways (the judge must
recognise "the square slides right" as well as "the horizontal position changes"); references are
plain explanation sentences of the kind a good answer gives, with the traversal frame ("as z3
increases") left out: explanations are frame-stripped (``uncertainty.strip_frame``) before they
are scored against them.
"""

from __future__ import annotations

__all__ = [
    "FACTOR_DESCRIPTIONS",
    "FACTOR_REFERENCES",
    "NO_CHANGE",
    "NO_CHANGE_DESCRIPTIONS",
    "factor_descriptions",
    "factor_references",
    "factor_text",
]

NO_CHANGE = "no_change"
"""The judge's class for an explanation that says nothing changes (or that it cannot tell)."""

FACTOR_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "shape": (
        "the shape of the object changes",
        "the object turns into a different shape",
        "a square turns into a circle or a triangle",
        "the outline of the object changes from angular to round",
        "the object becomes more compact and rounder",
        "the object becomes more elongated, less compact",
        "the object morphs into another geometric form",
        "a diamond turns into a cross or a ring",
    ),
    "x_position": (
        "the object moves horizontally from left to right",
        "the object moves from right to left",
        "the shape slides sideways across the image",
        "the horizontal position of the object changes",
        "the object shifts towards the right edge",
        "the object shifts towards the left",
        "the object moves diagonally from top left to bottom right",
        "the object moves diagonally from bottom left to top right",
    ),
    "y_position": (
        "the object moves vertically from top to bottom",
        "the object moves from bottom to top",
        "the shape moves up or down the image",
        "the vertical position of the object changes",
        "the object rises towards the top edge",
        "the object drops towards the bottom",
        "the object moves diagonally from top left to bottom right",
        "the object moves diagonally from bottom left to top right",
    ),
    "scale": (
        "the object gets larger",
        "the object gets smaller",
        "the size of the object changes",
        "the shape grows or shrinks",
        "the object is scaled up or down",
        "the object becomes bigger and takes up more of the image",
    ),
    "rotation": (
        "the object rotates clockwise",
        "the object rotates counterclockwise",
        "the object turns around its centre",
        "the orientation angle of the object changes",
        "the shape spins or tilts",
        "the object tilts to one side",
        "the object turns by a few degrees",
    ),
    "hue": (
        "the colour of the object changes",
        "the object changes colour from red to green",
        "the hue of the shape shifts from blue to purple",
        "the object turns from yellow to orange",
        "the object's colour shifts towards magenta or cyan",
    ),
    "background": (
        "the background becomes brighter",
        "the background becomes darker",
        "the brightness of the background changes",
        "the backdrop behind the object gets lighter or darker",
        "the background turns from black to grey",
        "the whole image gets brighter or darker",
    ),
}

NO_CHANGE_DESCRIPTIONS: tuple[str, ...] = (
    "nothing visible changes",
    "no visible change",
    "the images stay the same",
    "there is no difference between the images",
    "I cannot tell what changes",
    "the change is unclear",
)

FACTOR_REFERENCES: dict[str, tuple[str, ...]] = {
    "shape": (
        "The object changes its shape.",
        "The shape of the object changes, for example from a square to a circle.",
        "The object turns into a different shape.",
        "The outline of the object changes.",
    ),
    "x_position": (
        "The object moves from left to right.",
        "The object moves horizontally across the image.",
        "The horizontal position of the object changes.",
        "The object shifts sideways.",
    ),
    "y_position": (
        "The object moves from top to bottom.",
        "The object moves vertically across the image.",
        "The vertical position of the object changes.",
        "The object moves up or down.",
    ),
    "scale": (
        "The object becomes larger.",
        "The size of the object changes.",
        "The object grows or shrinks.",
        "The object gets bigger.",
    ),
    "rotation": (
        "The object rotates.",
        "The object rotates clockwise.",
        "The orientation of the object changes.",
        "The object turns around its centre.",
    ),
    "hue": (
        "The colour of the object changes.",
        "The object changes colour.",
        "The hue of the object shifts.",
        "The object's colour changes from one colour to another.",
    ),
    "background": (
        "The background becomes brighter.",
        "The brightness of the background changes.",
        "The background gets lighter or darker.",
        "The background colour changes.",
    ),
}


def factor_text(name: str) -> str:
    """A factor name as words: ``"x_position"`` -> ``"x position"``."""
    return " ".join(str(name).replace("_", " ").replace("-", " ").split())


def factor_descriptions(name: str) -> tuple[str, ...]:
    """The judge's descriptions of factor ``name``; an unknown name falls back to its words."""
    if name in FACTOR_DESCRIPTIONS:
        return FACTOR_DESCRIPTIONS[name]
    words = factor_text(name)
    return (words, f"the {words} changes")


def factor_references(name: str) -> tuple[str, ...]:
    """Reference sentences for factor ``name``; an unknown name falls back to its words."""
    if name in FACTOR_REFERENCES:
        return FACTOR_REFERENCES[name]
    words = factor_text(name)
    return (f"The {words} changes.",)
