"""n answers -> certainty, the kept answer, clear or not; and calibrated thresholds."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..types import Explanation, Response
from .claims import Claim, parse_claims
from .similarity import DEFAULT_SIMILARITY, Similarity, _check_threshold, _has_words, get_similarity

ONE_ANSWER_NOTE = "certainty cannot be measured from one answer: ask for 2 or more samples (5 is the default)"


def _medoid(sim: np.ndarray, include_diagonal: bool = False) -> int:
    """Index of the row with the highest mean similarity to the others (ties -> earliest).

    ``include_diagonal``: average over the whole row, diagonal included (the paper's rule; it
    differs only where a text's self-similarity is 0, i.e. a text without tokens under ``bow``).
    """
    k = sim.shape[0]
    if k == 1:
        return 0
    if include_diagonal:
        return int(np.argmax(sim.mean(axis=1)))  # exactly the paper's rule: no tolerance on ties
    else:
        scores = (sim.sum(axis=1) - np.diag(sim)) / (k - 1)
    best = scores.max()
    return int(np.flatnonzero(scores >= best - 1e-9)[0])


def answer_claims(response: Response) -> list[Claim]:
    """The claims of one answer: the backend's structured ``meta["claims"]`` when it gave valid
    ones, else parsed from the text. Recorded in ``meta["claims"]`` and ``meta["attribute"]``."""
    given = response.meta.get("claims")
    claims: list[Claim] | None = None
    if isinstance(given, list) and given:
        try:
            claims = [c if isinstance(c, Claim) else Claim.from_json(c) for c in given]
        except (ValueError, AttributeError, TypeError):
            claims = None
    if claims is None:
        claims = parse_claims(response.text or "")
    response.meta["claims"] = [c.to_json() for c in claims]
    response.meta["attribute"] = ", ".join(c.label() for c in claims) or None
    return claims


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
    * One ok answer (m == 1) has no agreement to measure: certainty None, never clear
      (``note`` says why).
    * The kept explanation is the medoid of the k texts (ties -> earliest). The result is clear
      when ``certainty >= threshold`` and more than half of the ok answers explain something;
      otherwise ``explanation`` is None.
    * Every ok answer's claims (what it says changes) are recorded in ``meta["claims"]``.
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

    explaining_responses = [r for r in ok if not r.abstained and _has_words(r.text)]  # type: ignore[arg-type]
    claims = [answer_claims(r) for r in explaining_responses]
    explaining = [r.text for r in explaining_responses]
    m, k = len(ok), len(explaining)
    abstentions = m - k

    explanation: str | None = None
    if k == 0:
        certainty = 0.0
    else:
        if k == 1:
            agreement, best = 1.0, 0
        else:
            if getattr(sim_measure, "uses_claims", False):
                sim = sim_measure.matrix(explaining, claims=claims)  # type: ignore[call-arg]
            else:
                sim = sim_measure.matrix(explaining)
            sim = np.asarray(sim, dtype=np.float64)
            if sim.shape != (k, k):
                raise ValueError(f"similarity {sim_measure.name!r} returned shape {sim.shape} for {k} texts")
            off = sim[~np.eye(k, dtype=bool)]
            agreement = float(np.mean(off))
            if not math.isfinite(agreement):
                agreement = 0.0
            best = _medoid(np.nan_to_num(sim, nan=0.0), getattr(sim_measure, "medoid_includes_diagonal", False))
        certainty = (k / m) * agreement
        explanation = explaining[best]
    certainty = float(min(1.0, max(0.0, certainty)))

    clear = bool(certainty >= threshold and k > m / 2 and m > 1)
    return Explanation(
        explanation=explanation if clear else None,
        certainty=certainty if m > 1 else None,
        note=ONE_ANSWER_NOTE if m == 1 else None,
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
