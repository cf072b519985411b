"""How sure are the answers? n sampled explanations -> agreement -> certainty, kept answer, clear or not.

* :mod:`.claims` reads what each answer says changes (attribute, direction);
* :mod:`.similarity` holds the pairwise measures: ``agree`` (default: same attribute and direction,
  with sentence embeddings for answers the parser cannot read), ``embed``, the paper's ``bow`` and the
  project's ``bow-refined``;
* :mod:`.selection` turns a similarity matrix into certainty, medoid and the clear/unclear decision,
  and calibrates thresholds.
"""

from .claims import Claim, parse_claims
from .selection import calibrate_threshold, select_explanation
from .similarity import (
    AGREE_DEFAULT_THRESHOLD,
    BOW_DEFAULT_THRESHOLD,
    BOW_REFINED_DEFAULT_THRESHOLD,
    BOW_STOP_WORDS,
    DEFAULT_SIMILARITY,
    EMBED_DEFAULT_THRESHOLD,
    SIMILARITIES,
    AgreementSimilarity,
    BagOfWordsSimilarity,
    EmbeddingSimilarity,
    RefinedBagOfWordsSimilarity,
    Similarity,
    get_similarity,
    paper_certainty,
    strip_frame,
)

__all__ = [
    "Claim",
    "parse_claims",
    "Similarity",
    "AgreementSimilarity",
    "BagOfWordsSimilarity",
    "RefinedBagOfWordsSimilarity",
    "EmbeddingSimilarity",
    "SIMILARITIES",
    "DEFAULT_SIMILARITY",
    "AGREE_DEFAULT_THRESHOLD",
    "BOW_DEFAULT_THRESHOLD",
    "BOW_REFINED_DEFAULT_THRESHOLD",
    "BOW_STOP_WORDS",
    "EMBED_DEFAULT_THRESHOLD",
    "paper_certainty",
    "strip_frame",
    "get_similarity",
    "select_explanation",
    "calibrate_threshold",
]
