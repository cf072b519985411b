"""What does an answer say changes? Free text -> claims (visual attribute, direction).

Two answers agree when they name the same visual attribute and, for a monotone attribute, the
same direction: "moves up" and "rises" agree, "moves up" and "sinks" contradict, "moves up" and
"gets bigger" describe different changes. Sentence embeddings cannot see this (antonyms embed
close together), so :func:`parse_claims` reads the attribute and its direction with a small,
explicit lexicon and :func:`claim_agreement` compares two answers' claims.

The lexicon covers what traversals of image generators show: position (horizontal, vertical),
size, orientation, colour (hue names with from/to), brightness, background (brightness or colour),
saturation, contrast, sharpness, texture, shape, thickness, count, and a few face attributes (age,
smile, glasses, hair). An answer the lexicon cannot read gets no claims; the agreement measure
then falls back to sentence embeddings for that pair (see ``similarity.AgreementSimilarity``).

Text is read clause by clause (split at , ; . and "while", "whereas", "but"), so "the background
darkens while the object grows" gives two claims, and a negated clause ("its colour stays the
same", "does not move") gives none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Claim", "parse_claims", "claim_agreement", "ATTRIBUTE_FAMILIES", "HUES"]


@dataclass(frozen=True)
class Claim:
    """One change an answer describes.

    ``attribute``: a canonical name (see :data:`ATTRIBUTE_FAMILIES`). ``direction``: ``"+"`` or
    ``"-"`` for monotone attributes (right, up, larger, clockwise, brighter, ...), None when the
    answer names no direction. Colour claims carry hue names in ``start``/``end`` instead.
    """

    attribute: str
    direction: str | None = None
    start: str | None = None
    end: str | None = None

    def label(self) -> str:
        """A short human-readable form, e.g. ``size +`` or ``colour blue->red``."""
        if self.start or self.end:
            return f"{self.attribute} {self.start or '?'}->{self.end or '?'}"
        return f"{self.attribute} {self.direction}" if self.direction else self.attribute

    def to_json(self) -> dict[str, str]:
        out = {"attribute": self.attribute}
        for key in ("direction", "start", "end"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Claim":
        attribute = data.get("attribute")
        if not isinstance(attribute, str) or not attribute:
            raise ValueError(f"a claim needs a non-empty 'attribute' string, got {data!r}")
        direction = data.get("direction")
        if direction not in (None, "+", "-"):
            raise ValueError(f"a claim's direction must be '+', '-' or absent, got {direction!r}")
        return cls(attribute, direction, data.get("start"), data.get("end"))


# Attributes in one family describe related changes: naming the family member differently is half
# an agreement ("moves" vs "moves right"), never a contradiction.
ATTRIBUTE_FAMILIES: dict[str, str] = {
    "horizontal_position": "position",
    "vertical_position": "position",
    "position": "position",
    "size": "size",
    "orientation": "orientation",
    "colour": "colour",
    "brightness": "brightness",
    "background": "background",
    "background_brightness": "background",
    "background_colour": "background",
    "saturation": "colour",
    "contrast": "brightness",
    "sharpness": "sharpness",
    "texture": "texture",
    "shape": "shape",
    "thickness": "shape",
    "count": "count",
    "age": "age",
    "smile": "smile",
    "glasses": "glasses",
    "hair": "hair",
}

# Hue names -> degrees on the colour wheel; None: achromatic.
HUES: dict[str, float | None] = {
    "red": 0.0, "crimson": 350.0, "scarlet": 5.0, "orange": 30.0, "amber": 45.0, "yellow": 60.0,
    "gold": 50.0, "lime": 90.0, "green": 120.0, "teal": 170.0, "cyan": 180.0, "turquoise": 175.0,
    "aqua": 180.0, "blue": 240.0, "navy": 240.0, "indigo": 260.0, "violet": 275.0, "purple": 280.0,
    "magenta": 300.0, "pink": 320.0, "brown": 25.0,
    "white": None, "black": None, "grey": None, "gray": None,
}
_HUE_ALIASES = {"reddish": "red", "redder": "red", "bluish": "blue", "bluer": "blue", "greenish": "green",
                "greener": "green", "yellowish": "yellow", "yellower": "yellow", "purplish": "purple",
                "pinkish": "pink", "orangish": "orange"}
_COLOUR_WORD = r"(?:" + "|".join(sorted(list(HUES) + list(_HUE_ALIASES), key=len, reverse=True)) + r")"

_NEGATION = re.compile(
    r"\b(?:not|no|never|nor|without|unchanged|constant|unaffected)\b|n't\b"
    r"|\b(?:stays?|remains?|keeps?)\s+(?:\w+\s+){0,3}?(?:same|fixed|constant|unchanged|still|put)\b", re.I)
_CLAUSE_SPLIT = re.compile(r"[;,.!?]|\b(?:while|whereas|but|although|though|meanwhile)\b", re.I)

_SHAPE_NOUN = r"(?:circle|square|triangle|star|heart|ellipse|oval|rectangle|diamond|cross|ring|hexagon|pentagon)"

# Rules: (attribute, direction, pattern). Patterns run on one lower-cased clause. Order matters
# only within an attribute: the first rule that gives a direction wins.
_R = re.compile


def _rules() -> list[tuple[str, str | None, re.Pattern[str]]]:
    left_right = r"(?:left|right)"
    top_bottom = r"(?:top|bottom|upper|lower)"
    spot = rf"(?:(?:the\s+)?(?:{top_bottom}[\s-]*)?{left_right}?(?:\s+(?:side|edge|corner|part|half))?)"
    return [
        # -- horizontal position
        ("horizontal_position", "+", _R(rf"\bfrom\s+{spot}\s+to(?:wards?)?\s+(?:the\s+)?(?:{top_bottom}[\s-]*)?right\b")),
        ("horizontal_position", "-", _R(rf"\bfrom\s+{spot}\s+to(?:wards?)?\s+(?:the\s+)?(?:{top_bottom}[\s-]*)?left\b")),
        ("horizontal_position", "+", _R(r"\bstarts?\s+(?:\w+\s+){0,3}?left\b.*\bends?\s+(?:\w+\s+){0,3}?right\b")),
        ("horizontal_position", "-", _R(r"\bstarts?\s+(?:\w+\s+){0,3}?right\b.*\bends?\s+(?:\w+\s+){0,3}?left\b")),
        ("horizontal_position", "+", _R(r"\b(?:to(?:wards?)?|toward)\s+the\s+right\b|\brightwards?\b|\b(?:moves?|shifts?|slides?|drifts?|travels?|goes|translates?)\s+(?:\w+\s+){0,3}?right\b")),
        ("horizontal_position", "-", _R(r"\b(?:to(?:wards?)?|toward)\s+the\s+left\b|\bleftwards?\b|\b(?:moves?|shifts?|slides?|drifts?|travels?|goes|translates?)\s+(?:\w+\s+){0,3}?left\b")),
        ("horizontal_position", None, _R(r"\bhorizontal(?:ly)?\b|\bx[\s-]position\b|\bleft\b|\bright\b")),
        # -- vertical position (image up is +)
        ("vertical_position", "+", _R(rf"\bfrom\s+(?:the\s+)?(?:bottom|lower)(?:[\s-]*{left_right})?(?:\s+(?:side|edge|corner|part|half))?\s+to(?:wards?)?\s+(?:the\s+)?(?:top|upper)\b")),
        ("vertical_position", "-", _R(rf"\bfrom\s+(?:the\s+)?(?:top|upper)(?:[\s-]*{left_right})?(?:\s+(?:side|edge|corner|part|half))?\s+to(?:wards?)?\s+(?:the\s+)?(?:bottom|lower)\b")),
        ("vertical_position", "+", _R(r"\bupwards?\b|\b(?:to(?:wards?)?|toward)\s+the\s+top\b|\b(?:moves?|shifts?|slides?|drifts?|travels?|goes|translates?)\s+(?:\w+\s+){0,2}?(?:up|higher)\b|\brises\b|\bascends?\b|\bclimbs?\b")),
        ("vertical_position", "-", _R(r"\bdownwards?\b|\b(?:to(?:wards?)?|toward)\s+the\s+bottom\b|\b(?:moves?|shifts?|slides?|drifts?|travels?|goes|translates?)\s+(?:\w+\s+){0,2}?(?:down|lower)\b|\bsinks?\b|\bdescends?\b|\bfalls\b|\bdrops\b")),
        ("vertical_position", None, _R(r"\bvertical(?:ly)?\b|\by[\s-]position\b|\bheight\s+in\s+the\s+image\b")),
        ("position", None, _R(r"\bposition\b|\blocation\b|\bmoves?\b|\bshifts?\s+(?:its\s+)?(?:place|location)|\btranslat\w*|\bdiagonal(?:ly)?\b")),
        # -- size
        ("size", "+", _R(r"\b(?:larger|bigger|grows?|growing|enlarges?|expands?|swells?|zooms?\s+in|scales?\s+(?:\w+\s+){0,2}?up|increases?\s+(?:in\s+)?(?:the\s+)?size|size\s+(?:increases|grows|goes\s+up))\b")),
        ("size", "-", _R(r"\b(?:smaller|tinier|shrinks?|shrinking|contracts?|zooms?\s+out|scales?\s+(?:\w+\s+){0,2}?down|decreases?\s+(?:in\s+)?(?:the\s+)?size|reduces?\s+(?:in\s+)?(?:the\s+)?size|size\s+(?:decreases|shrinks|goes\s+down))\b")),
        ("size", None, _R(r"\bsize\b|\bscale\b|\barea\b")),
        # -- orientation
        ("orientation", "-", _R(r"\b(?:counter[\s-]?clockwise|anti[\s-]?clockwise)\b")),
        ("orientation", "+", _R(r"\bclockwise\b")),
        ("orientation", None, _R(r"\brotat\w*|\bspins?\b|\btilts?\b|\borientation\b|\bangle\b")),
        # -- brightness (the subject decides background_brightness, see parse_claims)
        ("brightness", "+", _R(r"\b(?:brighter|lighter|brightens?|lightens?|more\s+(?:bright|luminous)|brightness\s+(?:increases|goes\s+up|rises))\b|\bincreases?\s+(?:the\s+)?brightness\b")),
        ("brightness", "-", _R(r"\b(?:darker|dimmer|darkens?|dims?|less\s+bright|brightness\s+(?:decreases|goes\s+down|falls|drops))\b|\b(?:decreases?|reduces?)\s+(?:the\s+)?brightness\b")),
        ("brightness", None, _R(r"\bbrightness\b|\bluminance\b|\blightness\b|\bintensity\b|\bexposure\b")),
        # -- saturation / contrast / sharpness
        ("saturation", "+", _R(r"\bmore\s+(?:saturated|vivid|colou?rful|intense)\b|\bsaturat(?:es|ion\s+increases)\b")),
        ("saturation", "-", _R(r"\b(?:desaturat\w*|paler|duller|washed[\s-]out|faded|fades|less\s+(?:saturated|vivid|colou?rful))\b")),
        ("saturation", None, _R(r"\bsaturation\b|\bvividness\b")),
        ("contrast", "+", _R(r"\bmore\s+contrast\b|\bhigher\s+contrast\b|\bcontrast\s+increases\b|\bincreases?\s+(?:the\s+)?contrast\b")),
        ("contrast", "-", _R(r"\bless\s+contrast\b|\blower\s+contrast\b|\bcontrast\s+decreases\b|\b(?:decreases?|reduces?)\s+(?:the\s+)?contrast\b")),
        ("contrast", None, _R(r"\bcontrast\b")),
        ("sharpness", "+", _R(r"\bsharper\b|\bsharpens?\b|\bmore\s+(?:detailed|focused|in\s+focus)\b|\bless\s+blurr?y\b")),
        ("sharpness", "-", _R(r"\bblurr(?:ier|ed|s)\b|\bblurs?\b|\bmore\s+blurr?y\b|\bsofter\b|\bless\s+sharp\b")),
        ("texture", None, _R(r"\btexture\w*|\bpattern\w*|\bnoise\b|\bnoisy\b|\bgrain\w*|\bstripe\w*|\bspeckle\w*")),
        # -- shape
        ("thickness", "+", _R(r"\bthicker\b|\bbolder\b|\bthickens?\b")),
        ("thickness", "-", _R(r"\bthinner\b|\bthins\b|\bslimmer\b")),
        ("thickness", None, _R(r"\bthickness\b|\bstroke\s+width\b")),
        ("shape", "+", _R(r"\b(?:rounder|more\s+(?:round|rounded|circular|compact))\b")),
        ("shape", "-", _R(r"\b(?:more\s+(?:elongated|angular|stretched|pointed)|less\s+(?:round|compact|circular)|elongat\w*)\b")),
        ("shape", None, _R(rf"\bchang\w*\s+(?:\w+\s+){{0,2}}?(?:shape|form)\b|(?<!of\sthe\s)(?<!of\sits\s)\b(?:shape|form)\s+(?:changes|morphs|varies|is\s+altered)\b|\bmorph\w*|\b(?:becomes?|turns?\s+into|into|to)\s+an?\s+{_SHAPE_NOUN}\b")),
        ("count", "+", _R(r"\bmore\s+(?:objects|shapes|items|copies)\b|\bobjects?\s+(?:appear|multiply)\b")),
        ("count", "-", _R(r"\bfewer\s+(?:objects|shapes|items|copies)\b|\bobjects?\s+disappear\b")),
        # -- faces
        ("age", "+", _R(r"\bolder\b|\bages\b|\baging\b|\bageing\b")),
        ("age", "-", _R(r"\byounger\b|\byouthful\b")),
        ("smile", "+", _R(r"\bsmil\w*|\bgrin\w*|\bhappier\b")),
        ("smile", "-", _R(r"\bfrown\w*|\bsadder\b|\bserious\b")),
        ("glasses", None, _R(r"\b(?:eye)?glasses\b|\bspectacles\b|\bsunglasses\b")),
        ("hair", None, _R(r"\bhair\w*|\bbald\w*|\bbeard\w*")),
    ]


_RULES = _rules()
_ROTATION = re.compile(r"\brotat\w*|\bspins?\b|\bclockwise\b|\btilts?\b|\bturns?\s+(?:to\s+the\s+)?(?:left|right)\b")
_BACKGROUND = re.compile(r"\bbackground\b|\bbackdrop\b|\bsurroundings\b")
_WHOLE_IMAGE = re.compile(r"\bwhole\s+(?:image|picture|scene)\b|\bentire\s+(?:image|picture|scene)\b|\boverall\b")
_COLOUR_FROM_TO = re.compile(rf"\bfrom\s+(?:a\s+|an\s+|the\s+)?(?:(?:light|dark|bright|pale|deep)\s+)?({_COLOUR_WORD})\b(?:\s+\w+){{0,2}}?\s+(?:to(?:wards?)?|into)\s+(?:a\s+|an\s+|the\s+)?(?:(?:light|dark|bright|pale|deep)\s+)?({_COLOUR_WORD})\b")
_COLOUR_TO = re.compile(rf"\b(?:turns?|becomes?|goes|changes?\s+(?:\w+\s+){{0,3}}?to|shifts?\s+(?:\w+\s+){{0,3}}?(?:to|towards?)|more|into|towards?)\s+(?:a\s+|an\s+|the\s+)?(?:(?:light|dark|bright|pale|deep)\s+)?({_COLOUR_WORD})\b|\b(redder|bluer|greener|yellower)\b")
_COLOUR_NOUN = re.compile(rf"\bcolou?r\w*|\bhue\b|\btint\w*|\b{_COLOUR_WORD}\b")


def _hue(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.lower()
    return _HUE_ALIASES.get(name, name)


def _colour_claim(clause: str) -> Claim | None:
    m = _COLOUR_FROM_TO.search(clause)
    if m:
        return Claim("colour", None, _hue(m.group(1)), _hue(m.group(2)))
    m = _COLOUR_TO.search(clause)
    if m:
        return Claim("colour", None, None, _hue(m.group(1) or m.group(2)))
    if _COLOUR_NOUN.search(clause):
        return Claim("colour")
    return None


def _clause_claims(clause: str) -> list[Claim]:
    if _NEGATION.search(clause):
        return []
    found: dict[str, Claim] = {}
    rotation = bool(_ROTATION.search(clause))
    for attribute, direction, pattern in _RULES:
        if rotation and attribute == "horizontal_position":
            continue  # "turns to the right" is a rotation here, not a move
        if attribute in found and (found[attribute].direction is not None or direction is None):
            continue
        if pattern.search(clause):
            found[attribute] = Claim(attribute, direction)
    colour = _colour_claim(clause)
    # "turns red" must not read as a rotation; a colour clause names no orientation by "turns"
    if colour is not None:
        found["colour"] = colour
    if any(k in found for k in ("horizontal_position", "vertical_position")) or re.search(
            r"\b(?:colou?r|hue|tint)\s+(?:moves|shifts)\b", clause):
        found.pop("position", None)  # the axis says more; "the colour moves to red" is no move
    if found.get("horizontal_position") and found["horizontal_position"].direction is None and "position" not in found \
            and not re.search(r"\b(?:move|moves|shift|shifts|slide|slides|horizontal\w*|position)\b", clause):
        found.pop("horizontal_position")  # a bare "left"/"right" with no movement names nothing
    if found.get("colour") and found["colour"].start is None and found["colour"].end is None and len(found) > 1 \
            and not re.search(r"\bcolou?r\b|\bhue\b|\btint\b", clause):
        found.pop("colour")  # a colour word used as a name ("the red square grows") is not a change
    if _BACKGROUND.search(clause):
        brightness, colour = found.pop("brightness", None), found.pop("colour", None)
        if brightness is not None:
            found["background_brightness"] = Claim("background_brightness", brightness.direction)
        if colour is not None:
            found["background_colour"] = Claim("background_colour", None, colour.start, colour.end)
        if brightness is None and colour is None:
            found["background"] = Claim("background")
    return list(found.values())


def parse_claims(text: str) -> list[Claim]:
    """The changes ``text`` describes, one claim per attribute (first direction found wins)."""
    from .frame import strip_frame  # the frame "as z3 increases" is not a change

    text = strip_frame(text).lower().replace("’", "'")
    text = re.sub(r"\bleft[\s-]to[\s-]right\b", "from left to right", text)
    text = re.sub(r"\bright[\s-]to[\s-]left\b", "from right to left", text)
    out: dict[str, Claim] = {}
    for clause in _CLAUSE_SPLIT.split(text):
        for claim in _clause_claims(clause):
            old = out.get(claim.attribute)
            if old is None or (old.direction is None and old.end is None):
                out[claim.attribute] = claim
    if _WHOLE_IMAGE.search(text) and "brightness" not in out and "background_brightness" in out:
        out["brightness"] = Claim("brightness", out.pop("background_brightness").direction)
    return list(out.values())


# ----------------------------------------------------------------------------------------------
# Comparing two answers

CONTRADICTION = -1.0


def _hue_step(start: str | None, end: str | None) -> float | None:
    """Signed shortest rotation (degrees) from start to end hue; None when unknown or ambiguous."""
    a, b = HUES.get(start or ""), HUES.get(end or "")
    if a is None or b is None:
        return None
    step = (b - a + 180.0) % 360.0 - 180.0
    return None if abs(step) >= 150.0 or step == 0.0 else step


def _colour_score(a: Claim, b: Claim) -> float:
    if a.end is None or b.end is None:  # "the colour changes": agrees, but with less detail
        return 1.0 if a.end is None and b.end is None else 0.75
    if a.start is not None and b.start is not None and a.start == b.end and a.end == b.start and a.start != a.end:
        return CONTRADICTION
    if a.end == b.end:
        return 1.0
    ha, hb = HUES.get(a.end), HUES.get(b.end)
    if ha is not None and hb is not None and abs((ha - hb + 180.0) % 360.0 - 180.0) <= 45.0:
        return 0.5  # neighbouring end colours (red vs orange): probably one change, named differently
    sa, sb = _hue_step(a.start, a.end), _hue_step(b.start, b.end)
    if sa is not None and sb is not None:
        return 0.75 if (sa > 0) == (sb > 0) else CONTRADICTION
    return 0.25  # different colours named, no order to compare


def _score(a: Claim, b: Claim) -> float:
    """Agreement of two claims: 1 same change, 0.75 same attribute with one direction unknown,
    0.5 same family, 0.25 same attribute with different values, 0 unrelated, CONTRADICTION opposite."""
    if a.attribute == b.attribute:
        if a.attribute in ("colour", "background_colour"):
            return _colour_score(a, b)
        if a.direction is None or b.direction is None:
            return 1.0 if a.direction == b.direction else 0.75
        return 1.0 if a.direction == b.direction else CONTRADICTION
    fa, fb = ATTRIBUTE_FAMILIES.get(a.attribute, a.attribute), ATTRIBUTE_FAMILIES.get(b.attribute, b.attribute)
    return 0.5 if fa == fb else 0.0


def claim_agreement(a: list[Claim], b: list[Claim]) -> float | None:
    """How much two answers agree on what changes, in [0, 1]; None when either names nothing.

    Each claim is matched with its best counterpart in the other answer; the score is the
    Dice-style mean of the best matches of both sides, so an answer naming two changes agrees half
    with one naming only one of them. Any shared attribute with opposite directions makes the pair
    a contradiction: 0, whatever else they share.
    """
    if not a or not b:
        return None
    scores = [[_score(x, y) for y in b] for x in a]
    if any(s == CONTRADICTION for row in scores for s in row):
        return 0.0
    best_a = sum(max(row) for row in scores)
    best_b = sum(max(scores[i][j] for i in range(len(a))) for j in range(len(b)))
    return float((best_a + best_b) / (len(a) + len(b)))
