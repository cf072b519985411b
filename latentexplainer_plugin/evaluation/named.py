"""Which ground-truth factors a clear explanation names, read from its structured claims.

The offline explainers (and the claim parser for chat answers, ``uncertainty/claims.py``) turn an
answer into claims with an ``attribute`` (``vertical_position``, ``colour``, ...). A clear explanation
names a factor of the shapes data when one claim of its kept answer has that factor's attribute.
"""

from __future__ import annotations

from typing import Any

# Claim attribute -> the shapes factor it describes.
FACTOR_OF_CLAIM = {"horizontal_position": "x_position", "vertical_position": "y_position", "size": "scale",
                   "orientation": "rotation", "colour": "hue", "background_brightness": "background",
                   "background": "background", "shape": "shape"}


def kept_claims(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The claims of the kept answer of an explanation record (results.json's ``examples`` record, or
    a latent entry): empty when it is not clear."""
    if not record.get("clear"):
        return []
    for r in record.get("responses") or []:
        if r.get("text") == record.get("explanation"):
            return list(r.get("claims") or [])
    return []


def named_factors(record: dict[str, Any]) -> set[str]:
    """The shapes factors a clear record's kept answer names (empty when it is not clear)."""
    return {FACTOR_OF_CLAIM[c["attribute"]] for c in kept_claims(record) if c.get("attribute") in FACTOR_OF_CLAIM}
