"""The traversal frame (\"as z3 increases\"): words every answer about a latent shares, removed before comparing answers."""

from __future__ import annotations

import re

# The traversal frame. Every answer about one latent says "as z3 increases ..." or "increasing z3
# ...": words shared by agreeing and disagreeing answers alike, which inflate the similarity of
# answers that describe different changes (measured: the embed gap between paraphrases and
# different changes doubles when the frame is removed). strip_frame() deletes latent names
# (z3, z_3, z{3}, latent 3, latent dimension 3, dim 3, "the latent") and the increase/decrease
# verbs attached to them; the rest of the sentence, including a verb that describes the change
# itself ("increasing z2 increases the brightness"), is kept. It only affects similarity scores:
# the kept explanation is always the answer's original text.
_LATENT_NOUN = r"latent(?:\s+(?:variable|dimension|unit|code|factor))?"
_LATENT_ID = rf"""(?:
    (?:the\s+|this\s+)?(?:value\s+of\s+(?:the\s+|this\s+)?)?
    (?:
        (?:{_LATENT_NOUN}\s)?z[_\s]?\{{?\d+\}}?
      | {_LATENT_NOUN}\s+\d+
      | dim(?:ension)?[_\s]?\d+
      | {_LATENT_NOUN}
    )
)"""
_TRAVERSE = r"(?:increasing|raising|decreasing|lowering|varying|sweeping|traversing)"
_WHEN = r"(?:as|when|while|if)"
_MOVES = (
    r"(?:increases|is\s+increased|goes\s+up|grows|rises|decreases|is\s+decreased|goes\s+down|falls"
    r"|is\s+varied|varies)"
)
_FRAME_PATTERNS = tuple(
    re.compile(p, re.IGNORECASE | re.VERBOSE | re.UNICODE)
    for p in (
        rf"\b{_WHEN}\s+{_LATENT_ID}\s+{_MOVES}\b",  # "as z3 increases"
        rf"\b{_TRAVERSE}\s+{_LATENT_ID}\b",  # "increasing z3"
        rf"\b{_LATENT_ID}\s+{_MOVES}\b",  # "z3 increases"
        rf"\b{_LATENT_ID}\b",  # a bare latent name
    )
)


def strip_frame(text: str) -> str:
    """``text`` without the traversal frame ("as z3 increases", "increasing z3", latent names)."""
    text = re.sub(r"\s+", " ", text)  # one space between words: keeps the patterns linear-time
    for pattern in _FRAME_PATTERNS:
        text = pattern.sub(" ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return re.sub(r"\s+", " ", text).strip(" ,;:")
