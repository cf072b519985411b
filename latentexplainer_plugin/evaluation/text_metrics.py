"""Reference metrics of explanations: each hypothesis (one explanation per item) is scored
against that item's reference sentences (one or more per item, the count may vary).

Scales: BLEU 0-100 (sacrebleu), ROUGE-L 0-1, CIDEr-D 0-10 per n-gram order (so 0-10 overall),
METEOR 0-1, SPICE 0-1, BERTScore F1 roughly 0-1.

Metrics whose requirements are missing (METEOR: NLTK's WordNet data present locally; SPICE: Java
and the SPICE 1.0 jar with its Stanford CoreNLP libraries; BERTScore: the ``bert_score`` package
and a model directory on disk) are returned as :class:`MetricUnavailable`, never as 0. Nothing is
ever downloaded by this module.

Inputs are validated: ``hypotheses`` and ``references`` must have the same length, every item
needs at least one non-empty reference, and a ``None`` hypothesis is rejected -- callers drop
items whose explanation was "no clear explanation" before scoring.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MetricUnavailable",
    "bertscore",
    "bleu",
    "cider",
    "cider_item_scores",
    "meteor",
    "reference_metrics",
    "rouge_l",
    "spice",
    "tokenize",
]


@dataclass(frozen=True)
class MetricUnavailable:
    """A metric that could not be computed here, and why (e.g. missing package, data or model)."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: unavailable ({self.reason})"


# ------------------------------------------------------------------------------------- validation


def _validate(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise TypeError("hypotheses must be a list of strings (one per item)")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise TypeError("references must be a list (one entry per item) of lists of reference strings")
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} reference sets")
    if len(hypotheses) == 0:
        raise ValueError("no items to score")
    hyps: list[str] = []
    for i, h in enumerate(hypotheses):
        if h is None:
            raise ValueError(
                f"hypothesis {i} is None: drop items with no clear explanation before computing reference metrics"
            )
        if not isinstance(h, str):
            raise TypeError(f"hypothesis {i} must be a string, got {type(h).__name__}")
        hyps.append(h)
    refs: list[list[str]] = []
    for i, item in enumerate(references):
        if isinstance(item, str) or not isinstance(item, Sequence):
            raise TypeError(f"references[{i}] must be a list of reference strings, got {type(item).__name__}")
        if len(item) == 0:
            raise ValueError(f"item {i} has no reference sentences (at least one is needed)")
        for j, r in enumerate(item):
            if not isinstance(r, str):
                raise TypeError(f"reference {j} of item {i} must be a string, got {type(r).__name__}")
            if not r.strip():
                raise ValueError(f"reference {j} of item {i} is empty")
        refs.append(list(item))
    return hyps, refs


_TOKEN = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits and underscores; punctuation dropped)."""
    return _TOKEN.findall(text.lower())


# ------------------------------------------------------------------------------------------- BLEU


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], lowercase: bool = False) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenisation, exponential smoothing).

    sacrebleu takes references as *streams*: stream ``j`` holds the ``j``-th reference of every
    item. Items with fewer references are padded with ``None``, which sacrebleu drops per segment
    (an empty string would instead count as a real, empty reference).
    """
    import sacrebleu

    hyps, refs = _validate(hypotheses, references)
    width = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
    return float(sacrebleu.corpus_bleu(hyps, streams, lowercase=lowercase).score)


# ---------------------------------------------------------------------------------------- ROUGE-L


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]], use_stemmer: bool = True) -> float:
    """ROUGE-L F-measure (0-1) from ``rouge_score``: per item the best over its references, then
    the mean over items. ``rouge_score`` lower-cases and keeps only alphanumeric tokens."""
    from rouge_score import rouge_scorer

    hyps, refs = _validate(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    per_item = [max(scorer.score(r, h)["rougeL"].fmeasure for r in rs) for h, rs in zip(hyps, refs)]
    return float(sum(per_item) / len(per_item))


# ---------------------------------------------------------------------------------------- CIDEr-D


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def cider_item_scores(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    df_corpus: Sequence[Sequence[str]] | None = None,
    n: int = 4,
    sigma: float = 6.0,
) -> list[float]:
    """CIDEr-D of each item (Vedantam, Zitnick, Parikh, "CIDEr: Consensus-based Image Description
    Evaluation", CVPR 2015, Sec. 3 and the CIDEr-D variant of Sec. 5).

    What is implemented, per n-gram order ``k = 1..n``:

    * ``g_k(s)`` is a tf-idf vector over the k-grams of sentence ``s``; tf is the raw count of the
      k-gram in ``s`` and idf is ``log(|I| / max(1, df(w)))`` where ``df(w)`` is the number of
      documents of ``df_corpus`` (one document = the reference set of one item) in which any
      reference contains ``w``, and ``|I|`` the number of documents. ``df_corpus`` defaults to
      ``references``. k-grams never seen in the corpus get the largest idf, ``log |I|``, so they
      lengthen the candidate vector (and lower the score) without ever matching.
    * CIDEr-D_k(c, S) = 10 / m * sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2)) *
      <min(g_k(c), g_k(s_j)), g_k(s_j)> / (||g_k(c)|| ||g_k(s_j)||), with ``m = |S|``, ``l`` the
      length in tokens and ``sigma = 6``: the gaussian length penalty, the clipping of candidate
      counts by reference counts (the element-wise min; with shared idf it is count clipping) and
      the x10 scaling of CIDEr-D. A zero vector (e.g. a sentence shorter than ``k``) gives 0.
    * CIDEr-D(c, S) = mean over k of CIDEr-D_k (uniform weights ``1 / n``).

    Deviations from the paper: tf is the raw count rather than the count divided by the number of
    k-grams in the sentence (the normalisation would cancel in the cosine of plain CIDEr but not
    under CIDEr-D's clipping; raw counts make the min a count clip, as the paper's text describes);
    tokens are lower-cased ``\\w+`` runs without stemming (the paper stems words first).

    Note: idf needs a corpus. With a single item and the default ``df_corpus`` every reference
    k-gram has ``df = |I| = 1`` and idf 0, so every score is 0; pass a larger ``df_corpus``.
    """
    hyps, refs = _validate(hypotheses, references)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if df_corpus is None:
        corpus = refs
    else:
        if isinstance(df_corpus, str) or len(df_corpus) == 0:
            raise ValueError("df_corpus must be a non-empty list of reference sets (lists of strings)")
        corpus = []
        for i, doc in enumerate(df_corpus):
            if isinstance(doc, str) or not all(isinstance(s, str) for s in doc):
                raise TypeError(f"df_corpus[{i}] must be a list of strings")
            corpus.append(list(doc))

    df: Counter = Counter()
    for doc in corpus:
        seen: set[tuple[str, ...]] = set()
        for sent in doc:
            toks = tokenize(sent)
            for k in range(1, n + 1):
                seen.update(_ngrams(toks, k))
        df.update(seen)
    log_docs = math.log(float(len(corpus)))

    def vectors(tokens: list[str]) -> list[tuple[dict, float]]:
        out = []
        for k in range(1, n + 1):
            vec = {g: c * (log_docs - math.log(max(1.0, float(df[g])))) for g, c in _ngrams(tokens, k).items()}
            out.append((vec, math.sqrt(sum(v * v for v in vec.values()))))
        return out

    scores = []
    for h, rs in zip(hyps, refs):
        ht = tokenize(h)
        hv = vectors(ht)
        total = 0.0
        for r in rs:
            rt = tokenize(r)
            rv = vectors(rt)
            penalty = math.exp(-((len(ht) - len(rt)) ** 2) / (2.0 * sigma**2))
            for (vc, nc), (vr, nr) in zip(hv, rv):
                if nc == 0.0 or nr == 0.0:
                    continue
                dot = sum(min(v, vr[g]) * vr[g] for g, v in vc.items() if g in vr)
                total += penalty * dot / (nc * nr)
        scores.append(10.0 * total / (len(rs) * n))
    return scores


def cider(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    df_corpus: Sequence[Sequence[str]] | None = None,
    n: int = 4,
    sigma: float = 6.0,
) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_item_scores` over items (see there)."""
    scores = cider_item_scores(hypotheses, references, df_corpus, n, sigma)
    return float(sum(scores) / len(scores))


# ----------------------------------------------------------------------- optional-requirement metrics


def _wordnet_unavailable_reason() -> str | None:
    if importlib.util.find_spec("nltk") is None:
        return "the nltk package is not installed"
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except LookupError:
        return "NLTK's WordNet data is not available locally (this module never downloads it)"
    except Exception as exc:  # a corrupt or partial data directory
        return f"NLTK's WordNet data could not be loaded: {type(exc).__name__}: {exc}"
    return None


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float | MetricUnavailable:
    """Mean sentence METEOR (NLTK's ``meteor_score`` with several references per item) on
    :func:`tokenize`'d text; :class:`MetricUnavailable` when NLTK or its WordNet data is missing."""
    hyps, refs = _validate(hypotheses, references)
    reason = _wordnet_unavailable_reason()
    if reason is not None:
        return MetricUnavailable("meteor", reason)
    from nltk.translate.meteor_score import meteor_score

    try:
        per_item = [meteor_score([tokenize(r) for r in rs], tokenize(h)) for h, rs in zip(hyps, refs)]
    except LookupError as exc:  # other NLTK data (e.g. omw) missing
        return MetricUnavailable("meteor", f"NLTK data missing: {str(exc).strip().splitlines()[0]}")
    return float(sum(per_item) / len(per_item))


SPICE_JAR_ENV = "LATENTEXPLAINER_SPICE_JAR"


def spice(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    spice_jar: str | os.PathLike | None = None,
    timeout_s: float = 600.0,
) -> float | MetricUnavailable:
    """SPICE (Anderson et al., ECCV 2016) through the SPICE 1.0 jar: mean over items of the "All"
    F-score. Needs ``java`` on the PATH and the jar (``spice_jar`` or the environment variable
    ``LATENTEXPLAINER_SPICE_JAR``) with its Stanford CoreNLP libraries beside it; otherwise, or
    when the jar fails, :class:`MetricUnavailable`. Not exercised against a real jar here."""
    hyps, refs = _validate(hypotheses, references)
    jar = spice_jar if spice_jar is not None else os.environ.get(SPICE_JAR_ENV)
    java = shutil.which("java")
    if java is None:
        return MetricUnavailable("spice", "no java executable on the PATH")
    if not jar:
        return MetricUnavailable("spice", f"no SPICE jar given (pass spice_jar or set {SPICE_JAR_ENV})")
    if not os.path.isfile(jar):
        return MetricUnavailable("spice", f"SPICE jar not found at {jar}")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(src, "w") as fh:
            json.dump([{"image_id": i, "test": h, "refs": rs} for i, (h, rs) in enumerate(zip(hyps, refs))], fh)
        cmd = [java, "-jar", "-Xmx8G", os.fspath(jar), src, "-out", dst, "-subset", "-silent"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return MetricUnavailable("spice", f"the SPICE jar ran past {timeout_s} s")
        if proc.returncode != 0 or not os.path.isfile(dst):
            tail = (proc.stderr or proc.stdout or "").strip()[-300:]
            return MetricUnavailable("spice", f"the SPICE jar failed (exit {proc.returncode}): {tail}")
        with open(dst) as fh:
            results = json.load(fh)
    try:
        per_item = [float(r["scores"]["All"]["f"]) for r in results]
    except (KeyError, TypeError, ValueError) as exc:
        return MetricUnavailable("spice", f"unexpected SPICE output: {exc!r}")
    if len(per_item) != len(hyps) or any(math.isnan(v) for v in per_item):
        return MetricUnavailable("spice", "SPICE output does not cover every item")
    return float(sum(per_item) / len(per_item))


BERTSCORE_MODEL_ENV = "LATENTEXPLAINER_BERTSCORE_MODEL"


def bertscore(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    model_dir: str | os.PathLike | None = None,
    num_layers: int | None = None,
) -> float | MetricUnavailable:
    """Mean BERTScore F1 (Zhang et al., ICLR 2020) via the ``bert_score`` package, with several
    references per item (``bert_score`` keeps the best). Needs the package and a model directory
    on disk (``model_dir`` or ``LATENTEXPLAINER_BERTSCORE_MODEL``; ``num_layers`` is required by
    ``bert_score`` for models it does not know); a hub name is never resolved, so nothing is
    downloaded. Otherwise :class:`MetricUnavailable`. Not exercised against a real model here."""
    hyps, refs = _validate(hypotheses, references)
    if importlib.util.find_spec("bert_score") is None:
        return MetricUnavailable("bertscore", "the bert_score package is not installed")
    path = model_dir if model_dir is not None else os.environ.get(BERTSCORE_MODEL_ENV)
    if not path:
        return MetricUnavailable(
            "bertscore", f"no local model directory given (pass model_dir or set {BERTSCORE_MODEL_ENV})"
        )
    if not os.path.isdir(path):
        return MetricUnavailable("bertscore", f"model directory not found: {path}")
    import bert_score

    try:
        _, _, f1 = bert_score.score(hyps, refs, model_type=os.fspath(path), num_layers=num_layers, verbose=False)
    except Exception as exc:  # the package raises many kinds for an unusable model
        return MetricUnavailable("bertscore", f"bert_score failed: {type(exc).__name__}: {exc}")
    return float(f1.mean())


# ---------------------------------------------------------------------------------------- combined


def reference_metrics(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    df_corpus: Sequence[Sequence[str]] | None = None,
    spice_jar: str | os.PathLike | None = None,
    bertscore_model: str | os.PathLike | None = None,
    bertscore_num_layers: int | None = None,
) -> dict[str, float | MetricUnavailable]:
    """All reference metrics: keys ``bleu``, ``rouge_l``, ``cider``, ``meteor``, ``spice``,
    ``bertscore``; the last three may be :class:`MetricUnavailable`."""
    _validate(hypotheses, references)
    return {
        "bleu": bleu(hypotheses, references),
        "rouge_l": rouge_l(hypotheses, references),
        "cider": cider(hypotheses, references, df_corpus),
        "meteor": meteor(hypotheses, references),
        "spice": spice(hypotheses, references, spice_jar),
        "bertscore": bertscore(hypotheses, references, bertscore_model, bertscore_num_layers),
    }
