"""The default explainer: measures the traversal images and says the dominant change in words.

No network, no model weights. Response ``k`` is computed from base latent ``k`` of the traversal,
so ``n`` answers need a traversal built with at least ``n`` bases (``samples_from_bases``). The
rows of one base show the same traversal with something else held at different values; a change
counts only as far as every row agrees on it (same sign; the weakest row's size), so a change that
depends on the other latents is weakened or dropped.

Example sets of SAE features (:meth:`OfflineBackend.explain_examples`, the contrastive mode): which
measured property separates the images where a feature fires from those where it does not, by a
rank statistic (Cliff's delta; hue as a circular quantity), with claims in the same vocabulary.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from pydantic import AfterValidator, Field

from ..options import ComponentOptions, NonNegativeFloat, PositiveFloat, validate_options
from ..types import ExampleSet, Prompt, Response, Traversal
from . import measure as M
from .base import Backend, BackendError

# Hue names by upper bound of their hue range in degrees (the last one wraps back to red).
_HUE_NAMES = (
    (15.0, "red"),
    (45.0, "orange"),
    (70.0, "yellow"),
    (160.0, "green"),
    (200.0, "cyan"),
    (265.0, "blue"),
    (290.0, "purple"),
    (345.0, "magenta"),
    (360.0, "red"),
)

# Properties that describe an object; used only when an object is found in most frames.
_OBJECT_PROPERTIES = ("x", "y", "area", "rotation", "hue", "compactness", "background")


def colour_name(hue: float) -> str:
    """Name of a hue given in turns (any real number; taken modulo 1)."""
    deg = (hue % 1.0) * 360.0
    for upper, name in _HUE_NAMES:
        if deg < upper:
            return name
    return "red"


def hue_ends(hues: tuple[float, float] | None) -> tuple[str, str | None]:
    """Names of the start and end colour of a hue change (turns). When both ends have the same
    name, the end is the neighbouring colour the change heads for; None if there is none within 90 degrees."""
    start, end = hues if hues is not None else (0.0, 0.0)
    a, b = colour_name(start), colour_name(end)
    if a != b:
        return a, b
    step = 1.0 if end >= start else -1.0
    for k in range(1, 19):
        b = colour_name(end + step * k * 5.0 / 360.0)
        if b != a:
            return a, b
    return a, None


def _phrase(prop: str, sign: float, first: bool, hues: tuple[float, float] | None = None) -> str:
    """Verb phrase for a change; ``first`` names the object, later phrases say "it"."""
    obj = "the object" if first else "it"
    poss = "the object's" if first else "its"
    up = sign > 0
    if prop == "x":
        return f"moves {obj} from left to right" if up else f"moves {obj} from right to left"
    if prop == "y":
        return f"moves {obj} from top to bottom" if up else f"moves {obj} from bottom to top"
    if prop == "area":
        return f"makes {obj} larger" if up else f"makes {obj} smaller"
    if prop == "rotation":
        return f"rotates {obj} clockwise" if up else f"rotates {obj} counterclockwise"
    if prop == "hue":
        a, b = hue_ends(hues)
        if b is None:
            return f"shifts {poss} {a} colour hue"
        if b != colour_name((hues or (0.0, 0.0))[1]):
            return f"shifts {poss} colour from {a} towards {b}"
        return f"changes {poss} colour from {a} to {b}"
    if prop == "background":
        return "makes the background brighter" if up else "makes the background darker"
    if prop == "compactness":
        if up:
            return f"changes {poss} shape, making it more compact (rounder)"
        return f"changes {poss} shape, making it more elongated (less compact)"
    if prop == "intensity":
        return "makes the whole image brighter" if up else "makes the whole image darker"
    raise ValueError(f"no phrase for property {prop!r}")


# Measured property -> the claim attribute of uncertainty/claims.py, and whether a positive effect
# is the claim's "+" direction (image y grows downwards; claims count "up" as +).
_CLAIM_OF = {
    "x": ("horizontal_position", True),
    "y": ("vertical_position", False),
    "area": ("size", True),
    "rotation": ("orientation", True),
    "background": ("background_brightness", True),
    "compactness": ("shape", True),
    "intensity": ("brightness", True),
}


def structured_claims(parts: list[str], effects: dict[str, float], hues: tuple[float, float] | None) -> list[dict]:
    """The claims an answer makes, as ``uncertainty.claims.Claim.to_json()`` dicts: what the
    certainty measure compares instead of re-reading the sentence."""
    out = []
    for prop in parts:
        if prop == "hue":
            claim = {"attribute": "colour"}
            if hues is not None:
                start, end = hue_ends(hues)
                claim |= {"start": start} | ({"end": end} if end is not None else {})
            out.append(claim)
            continue
        attribute, positive_is_plus = _CLAIM_OF[prop]
        up = effects[prop] > 0
        out.append({"attribute": attribute, "direction": "+" if up == positive_is_plus else "-"})
    return out


def _fraction(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


class OfflineOptions(ComponentOptions):
    """Options of the ``offline`` measurement explainer."""

    min_effect: PositiveFloat = Field(0.15, description="smallest consistent normalised effect that is named (else it abstains)")
    secondary_ratio: Annotated[float, AfterValidator(_fraction)] = Field(0.6, description="a second change is named when at least this fraction (0, 1] of the first")
    min_pixel_change: NonNegativeFloat = Field(0.002, description="mean frame-to-frame change below which a row is static")
    min_contrast: NonNegativeFloat = Field(M.MIN_CONTRAST, description="colour distance from the background an object needs")
    max_angle: PositiveFloat = Field(45.0, description="largest rotation searched, degrees")
    angle_step: PositiveFloat = Field(3.0, description="rotation search step, degrees")
    min_separation: Annotated[float, AfterValidator(_fraction)] = Field(0.7, description="example sets: smallest |Cliff's delta| in (0, 1] between firing and non-firing images that is named (else it abstains)")
    min_examples: int = Field(3, ge=2, description="example sets: fewest firing (per answer) and non-firing images compared (else it abstains)")


class OfflineBackend(Backend):
    """Explains a traversal by measuring its images (see :mod:`latentexplainer_plugin.backends.measure`).

    ``min_effect``: the largest consistent normalised effect must reach this, else the answer
    abstains ("No visible change ..."). 0.15 is e.g. 7.5 % of the image width of travel, a 16 %
    area change, a 13.5-degree turn, 27 degrees of hue or a 0.075 brightness change.
    ``min_pixel_change``: mean absolute difference between consecutive 4x4-pooled frames below
    which a row counts as static whatever the measurements say.
    ``secondary_ratio``: a second change is named when it is at least this fraction of the first.
    ``min_contrast``: colour distance from the background an object needs to be found.
    """

    name = "offline"
    supports_images = True
    supports_n = True
    samples_from_bases = True
    Options = OfflineOptions

    def __init__(
        self,
        min_effect: float = 0.15,
        secondary_ratio: float = 0.6,
        min_pixel_change: float = 0.002,
        min_contrast: float = M.MIN_CONTRAST,
        max_angle: float = 45.0,
        angle_step: float = 3.0,
        min_separation: float = 0.7,
        min_examples: int = 3,
    ) -> None:
        # the declared options check themselves (the same checks the command line runs): written once
        validate_options(OfflineOptions, {"min_effect": min_effect, "secondary_ratio": secondary_ratio,
                                      "min_pixel_change": min_pixel_change, "min_contrast": min_contrast,
                                      "max_angle": max_angle, "angle_step": angle_step,
                                      "min_separation": min_separation, "min_examples": min_examples},
                         "the offline backend")
        self.min_separation = float(min_separation)
        self.min_examples = int(min_examples)
        self.min_effect = float(min_effect)
        self.secondary_ratio = float(secondary_ratio)
        self.min_pixel_change = float(min_pixel_change)
        self.min_contrast = float(min_contrast)
        self.max_angle = float(max_angle)
        self.angle_step = float(angle_step)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "min_effect": self.min_effect,
            "secondary_ratio": self.secondary_ratio,
            "min_pixel_change": self.min_pixel_change,
            "min_contrast": self.min_contrast,
            "max_angle": self.max_angle,
            "angle_step": self.angle_step,
            "min_separation": self.min_separation,
            "min_examples": self.min_examples,
            "scales": dict(M.SCALES),
        }

    # -- measuring ---------------------------------------------------------------------------
    def _row(self, strip: torch.Tensor) -> tuple[dict[str, float], tuple[float, float] | None]:
        meas = M.strip_measurements(strip, self.min_contrast, max_angle=self.max_angle, step=self.angle_step)
        eff = M.strip_effects(strip, meas)
        hue = meas["hue"]
        valid = hue[~torch.isnan(hue)]
        hues = (float(valid[0]), float(valid[-1])) if len(valid) >= 2 else None
        return eff, hues

    @staticmethod
    def _consistent(values: list[float]) -> float:
        """The change every row agrees on: the smallest magnitude when all signs agree, else 0."""
        if not values:
            return 0.0
        if all(v > 0 for v in values):
            return min(values)
        if all(v < 0 for v in values):
            return max(values)
        return 0.0

    def effects(self, rows: torch.Tensor) -> dict[str, Any]:
        """Measure one base: ``rows`` is (R, S, C, H, W). Returns the consistent effects, the
        per-row effects, whether an object was found and the hue endpoints of the first row."""
        per_row, hue_ends = [], []
        for strip in rows:
            eff, hues = self._row(strip)
            per_row.append(eff)
            hue_ends.append(hues)
        keys = list(M.EFFECTS)
        consistent = {k: self._consistent([r[k] for r in per_row]) for k in keys}
        consistent["pixel_change"] = min(r["pixel_change"] for r in per_row)
        obj = min(r["object_fraction"] for r in per_row) >= 0.5
        return {"effects": consistent, "rows": per_row, "object": obj, "hues": next((h for h in hue_ends if h), None)}

    # -- wording -----------------------------------------------------------------------------
    def _answer(self, latent: str, measured: dict[str, Any]) -> tuple[str, bool, list[str]]:
        eff = measured["effects"]
        candidates = _OBJECT_PROPERTIES if measured["object"] else ("intensity",)
        ranked = sorted(((abs(eff[k]), k) for k in candidates), reverse=True)
        top, prop = ranked[0]
        if top < self.min_effect or eff["pixel_change"] < self.min_pixel_change:
            return f"No visible change: the images stay the same as {latent} changes.", True, []
        parts = [prop]
        if len(ranked) > 1:
            second, prop2 = ranked[1]
            if second >= self.min_effect and second >= self.secondary_ratio * top:
                parts.append(prop2)
        if set(parts) == {"x", "y"}:  # one diagonal movement, not two
            down, right = eff["y"] > 0, eff["x"] > 0
            origin = ("top" if down else "bottom") + " " + ("left" if right else "right")
            target = ("bottom" if down else "top") + " " + ("right" if right else "left")
            return f"Increasing {latent} moves the object diagonally from {origin} to {target}.", False, parts
        phrases = [_phrase(p, eff[p], i == 0, measured["hues"]) for i, p in enumerate(parts)]
        return f"Increasing {latent} {' and '.join(phrases)}.", False, parts

    def explain(self, traversal: Traversal, prompt: Prompt | None, n: int) -> list[Response]:
        if n < 0:
            raise BackendError(f"n must be >= 0, got {n}")
        if traversal.n_bases < n:
            raise BackendError(
                f"the offline explainer draws one answer per base latent: got n={n}, but the traversal "
                f"has {traversal.n_bases} bases; build it with at least n bases"
            )
        images = traversal.images
        if images.shape[2] < 2:
            raise BackendError(f"the offline explainer needs at least 2 traversal steps, got {images.shape[2]}")
        out: list[Response] = []
        for k in range(n):
            try:
                measured = self.effects(images[k])
            except (ValueError, TypeError) as exc:
                raise BackendError(f"the offline explainer cannot measure these images: {exc}") from exc
            text, abstained, parts = self._answer(traversal.latent_id, measured)
            meta = {
                "base": k,
                "effects": {key: round(float(v), 4) for key, v in measured["effects"].items()},
                "row_effects": [{key: round(float(v), 4) for key, v in r.items()} for r in measured["rows"]],
                "object": measured["object"],
                "named": parts,
                "claims": structured_claims(parts, measured["effects"], measured["hues"]),
            }
            if measured["hues"] is not None:
                meta["hue_start"], meta["hue_end"] = (round(h % 1.0, 4) for h in measured["hues"])
            out.append(Response(text=text, abstained=abstained, meta=meta))
        return out

    # -- example sets (contrastive mode) -----------------------------------------------------
    def explain_examples(self, examples: ExampleSet, prompt: Prompt | None, n: int) -> list[Response]:
        """Contrastive answers for a feature's example set: which measured property separates the
        firing images from the non-firing ones (module :func:`contrast_properties`).

        Answer ``k`` contrasts the k-th of ``n`` disjoint subsets of the firing images (every n-th by
        activation, so each spans the strong and the weak examples) with all non-firing images, so
        the answers agree only when the property holds across the firing set. An answer abstains
        for a dead feature, with fewer than ``min_examples`` images on either side, or when no
        property reaches ``min_separation``.
        """
        if n < 0:
            raise BackendError(f"n must be >= 0, got {n}")
        if not isinstance(examples, ExampleSet):
            raise BackendError(f"explain_examples needs an ExampleSet, got {type(examples).__name__}")
        lid = examples.latent_id
        k, m = examples.n_active, examples.n_inactive
        if k == 0:
            return [Response(text=f"No visible difference: {lid} never fires on these images (a dead feature).",
                             abstained=True, meta={"named": [], "claims": [], "reason": "dead"}) for _ in range(n)]
        try:
            props_a = self._example_properties(examples.activating)
            props_n = self._example_properties(examples.inactive) if m else None
        except (ValueError, TypeError) as exc:
            raise BackendError(f"the offline explainer cannot measure these example images: {exc}") from exc
        order = torch.argsort(examples.activations.float(), descending=True, stable=True)
        out: list[Response] = []
        for j in range(n):
            subset = order[j::n] if n else order
            meta: dict[str, Any] = {"subset": j, "n_firing": len(subset), "n_not_firing": m}
            if len(subset) < self.min_examples or m < self.min_examples:
                meta |= {"named": [], "claims": [], "reason": "too few examples"}
                out.append(Response(
                    text=(f"No visible difference: too few examples to compare ({len(subset)} firing images in this "
                          f"answer, {m} not firing; at least {self.min_examples} of each are needed)."),
                    abstained=True, meta=meta))
                continue
            sel = {key: v[subset] for key, v in props_a.items()}
            separation = contrast_properties(sel, props_n, self.min_examples)  # type: ignore[arg-type]
            text, abstained, parts = self._contrast_answer(lid, separation)
            meta |= {"separation": {key: round(v["delta"], 4) for key, v in separation.items()},
                     "named": parts, "claims": contrast_claims(parts, separation)}
            if "hue" in separation:
                meta["colour"] = separation["hue"]["colour"]
            out.append(Response(text=text, abstained=abstained, meta=meta))
        return out

    def _example_properties(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        props = M.measure(images, self.min_contrast)
        has = ~torch.isnan(props["x"])
        props["object"] = has.float()
        return props

    def _contrast_answer(self, latent: str, separation: dict[str, dict[str, Any]]) -> tuple[str, bool, list[str]]:
        ranked = sorted(((abs(v["delta"]), key) for key, v in separation.items()), reverse=True)
        if not ranked or ranked[0][0] < self.min_separation:
            best = f" (largest separation {ranked[0][0]:.2f}, by {ranked[0][1]})" if ranked else ""
            return (f"No visible difference: no measured property separates the images where {latent} fires from "
                    f"those where it does not{best}.", True, [])
        top, prop = ranked[0]
        parts = [prop]
        if len(ranked) > 1:
            # a second property must separate nearly perfectly (halfway from min_separation to 1): with a
            # few firing images per answer, chance separations near min_separation are common
            second, prop2 = ranked[1]
            if second >= (1.0 + self.min_separation) / 2 and second >= self.secondary_ratio * top:
                parts.append(prop2)
        phrases = [_contrast_phrase(p, separation[p]) for p in parts]
        return f"{latent} fires {' and '.join(phrases)}.", False, parts


def cliffs_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cliff's delta P(a > b) - P(a < b) over all pairs (= 2 AUC - 1), in [-1, 1]; NaNs are dropped."""
    a, b = a[~torch.isnan(a)].double(), b[~torch.isnan(b)].double()
    if not len(a) or not len(b):
        return 0.0
    diff = a[:, None] - b[None, :]
    return float(((diff > 0).double() - (diff < 0).double()).mean())


def _hue_distance(h: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Circular distance in turns, [0, 0.5]."""
    d = (h - centre).abs() % 1.0
    return torch.minimum(d, 1.0 - d)


def _circular_mean(h: torch.Tensor) -> tuple[float, float]:
    """Mean direction (turns) and resultant length (0: no preferred hue, 1: all equal)."""
    ang = 2.0 * math.pi * h.double()
    c, s = float(ang.cos().mean()), float(ang.sin().mean())
    return (math.atan2(s, c) / (2.0 * math.pi)) % 1.0, math.hypot(c, s)


def contrast_properties(firing: dict[str, torch.Tensor], not_firing: dict[str, torch.Tensor],
                        min_examples: int = 3) -> dict[str, dict[str, Any]]:
    """How well each measured property separates firing from non-firing images: Cliff's delta
    (positive: larger where the feature fires), for properties measured on at least
    ``min_examples`` images of each side.

    Object properties (x, y, area, compactness, hue) count only when most images of both sides
    show an object; else whole-image ``intensity`` does. ``background`` always counts. Hue is
    circular: each image's distance to the firing images' mean hue (for a firing image, the mean
    of the *other* firing images, so a set is not closer to itself by construction) is compared,
    and the delta is positive when firing images sit closer; ``colour`` names that mean hue.
    """
    out: dict[str, dict[str, Any]] = {}
    objects = bool(firing["object"].mean() >= 0.5 and not_firing["object"].mean() >= 0.5)
    keys = ["x", "y", "area", "compactness", "background"] if objects else ["background", "intensity"]
    for key in keys:
        a, b = firing[key], not_firing[key]
        if int((~torch.isnan(a)).sum()) < min_examples or int((~torch.isnan(b)).sum()) < min_examples:
            continue
        out[key] = {"delta": cliffs_delta(a, b)}
    if objects:
        ha, hb = firing["hue"], not_firing["hue"]
        ha, hb = ha[~torch.isnan(ha)], hb[~torch.isnan(hb)]
        if len(ha) >= min_examples and len(hb) >= min_examples:
            centre, _ = _circular_mean(ha)
            ang = 2.0 * math.pi * ha.double()
            cs, sn = ang.cos(), ang.sin()
            loo = torch.atan2(sn.sum() - sn, cs.sum() - cs) / (2.0 * math.pi) % 1.0  # mean of the others
            d_a = _hue_distance(ha.double(), loo)
            d_b = _hue_distance(hb.double(), torch.tensor(centre, dtype=torch.float64))
            out["hue"] = {"delta": cliffs_delta(d_b, d_a), "colour": colour_name(centre), "hue": round(centre, 4)}
    return out


def _contrast_phrase(prop: str, sep: dict[str, Any]) -> str:
    up = sep["delta"] > 0
    if prop == "x":
        return "when the object is on the right" if up else "when the object is on the left"
    if prop == "y":
        return "when the object is near the bottom" if up else "when the object is near the top"
    if prop == "area":
        return "on large objects" if up else "on small objects"
    if prop == "compactness":
        return "on compact (round) objects" if up else "on elongated objects"
    if prop == "background":
        return "where the background is bright" if up else "where the background is dark"
    if prop == "intensity":
        return "on bright images" if up else "on dark images"
    if prop == "hue":
        return f"on {sep['colour']} objects"
    raise ValueError(f"no phrase for property {prop!r}")


def contrast_claims(parts: list[str], separation: dict[str, dict[str, Any]]) -> list[dict]:
    """The claims of a contrastive answer, in the vocabulary of the steering answers: the feature
    rising goes with the property rising (``+``) or falling (``-``); a colour is the hue it prefers."""
    out = []
    for prop in parts:
        if prop == "hue":
            out.append({"attribute": "colour", "end": separation["hue"]["colour"]})
            continue
        attribute, positive_is_plus = _CLAIM_OF[prop]
        up = separation[prop]["delta"] > 0
        out.append({"attribute": attribute, "direction": "+" if up == positive_is_plus else "-"})
    return out


__all__ = ["OfflineBackend", "cliffs_delta", "colour_name", "contrast_claims", "contrast_properties"]
