"""Disentanglement metrics of a code against ground-truth factors: MIG, DCI and SAP.

``codes`` is ``(N, D)`` (one column per latent), ``factors`` is ``(N, K)`` (one column per
ground-truth factor). A factor is discrete when ``discrete[k]`` is true; when ``discrete`` is not
given it is inferred (:func:`infer_discrete`: integer values, at most 64 levels).

The default metrics (:func:`mig`, :func:`dci`, :func:`sap`) follow the definitions and defaults of
disentanglement_lib (Locatello et al., ICML 2019; files ``evaluation/metrics/mig.py``, ``dci.py``,
``sap_score.py`` and ``utils.py`` of google-research/disentanglement_lib), so their numbers are
comparable with published ones. Where that library assumes discrete factors, a continuous factor is
handled as documented per metric (docs/evaluation.md lists every formula). Two earlier variants are
kept under their own names: :func:`dci_balanced` and :func:`sap_tree_balanced`.

Every metric returns a :class:`MetricResult`: a read-only mapping of score names to floats, or to
``None`` with a ``reason`` when the score is not meaningful for the data: a single (varying)
factor, where every code trivially "separates" the only factor there is, or a single code, where
there is no second code to form a gap.

References
----------
* MIG: R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud, "Isolating Sources of Disentanglement in
  Variational Autoencoders", NeurIPS 2018.
* DCI: C. Eastwood, C. K. I. Williams, "A Framework for the Quantitative Evaluation of Disentangled
  Representations", ICLR 2018.
* SAP: A. Kumar, P. Sattigeri, A. Balakrishnan, "Variational Inference of Disentangled Latent
  Concepts from Unlabeled Observations", ICLR 2018.
* F. Locatello et al., "Challenging Common Assumptions in the Unsupervised Learning of Disentangled
  Representations", ICML 2019 (disentanglement_lib).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import balanced_accuracy_score, mutual_info_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.svm import LinearSVC
from sklearn.tree import DecisionTreeClassifier

from ..models.factors import _check_pair, histogram_discretize

__all__ = [
    "MetricResult",
    "dci",
    "dci_balanced",
    "dci_from_importance",
    "infer_discrete",
    "mig",
    "sap",
    "sap_score_matrix",
    "sap_tree_balanced",
    "split_indices",
]

MAX_DISCRETE_LEVELS = 64
"""An integer-valued factor with at most this many levels is discrete by default (dSprites' 32
positions and 40 orientations, MPI3D's 40 angles, 3D Shapes' 15 hues stay classes, as in
disentanglement_lib)."""


@dataclass(frozen=True, eq=False)
class MetricResult(Mapping):
    """Scores of one metric: ``result["mig"]``, ``dict(result)``.

    A value is ``None`` when it is not meaningful for the data; ``reason`` says why. ``details``
    holds what the scores were computed from (per-factor scores, matrices, settings).
    """

    name: str
    values: dict[str, float | None]
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float | None:
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def meaningful(self) -> bool:
        """False when some score is ``None`` (see ``reason``)."""
        return all(v is not None for v in self.values.values())

    def to_json(self, digits: int = 4) -> dict[str, Any]:
        """Rounded scores, plus ``reason`` when one is not meaningful."""
        out: dict[str, Any] = {k: None if v is None else round(float(v), digits) for k, v in self.values.items()}
        if self.reason:
            out["reason"] = self.reason
        return out


def infer_discrete(factors: np.ndarray, max_levels: int = MAX_DISCRETE_LEVELS) -> list[bool]:
    """A factor column is discrete when all its values are integers and it has at most
    ``max_levels`` distinct values."""
    f = np.asarray(factors, dtype=float)
    if f.ndim == 1:
        f = f[:, None]
    out = []
    for k in range(f.shape[1]):
        col = f[:, k]
        out.append(bool(np.all(col == np.round(col)) and len(np.unique(col)) <= max_levels))
    return out


def _resolve_discrete(factors: np.ndarray, discrete: Sequence[bool] | None) -> list[bool]:
    if discrete is None:
        return infer_discrete(factors)
    flags = [bool(d) for d in discrete]
    if len(flags) != factors.shape[1]:
        raise ValueError(f"discrete has {len(flags)} entries for {factors.shape[1]} factors; give one flag per factor column")
    return flags


def _labels(column: np.ndarray) -> np.ndarray:
    """Class labels 0..L-1 of a discrete factor (the values as given, renamed in sorted order)."""
    return np.unique(column, return_inverse=True)[1].reshape(-1)


def _varying(f: np.ndarray) -> list[int]:
    return [k for k in range(f.shape[1]) if np.ptp(f[:, k]) > 0]


def _not_meaningful(n_varying: int, n_factors: int, n_codes: int, need_two_codes: bool) -> str | None:
    if n_varying < 2:
        which = "1 factor" if n_factors == 1 else f"{n_varying} of {n_factors} factors vary in these samples"
        return (f"not meaningful with {which}: disentanglement measures how codes separate several factors; "
                "with one factor there is nothing to separate and the score would be trivially high")
    if need_two_codes and n_codes < 2:
        return "not meaningful with 1 code: the score is a gap between the best and the second-best code"
    return None


def split_indices(n: int, train_fraction: float, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded shuffle of ``range(n)`` cut into ``ceil(n * train_fraction)`` training indices and
    the rest for testing (disentanglement_lib's ``split_train_test``, after a shuffle)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    n_train = int(math.ceil(n * train_fraction))
    if n_train < 2 or n - n_train < 1:
        raise ValueError(f"{n} samples are too few to split into training and test parts at train_fraction={train_fraction}")
    perm = np.random.default_rng(random_state).permutation(n)
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


# --------------------------------------------------------------------------------------------- MIG


def mig(codes: np.ndarray, factors: np.ndarray, discrete: Sequence[bool] | None = None, bins: int = 20) -> MetricResult:
    """Mutual Information Gap, as disentanglement_lib computes it (``mig.py``, ``utils.py``).

    1. every code is binned into ``bins`` equal-width histogram bins (``histogram_discretize``);
    2. a discrete factor is used as given; a continuous one is binned the same way (the library
       expects discrete factors; as given, a continuous factor would have entropy ``log N``);
    3. ``I(z_j; v_k)`` is the plug-in mutual information (``sklearn.metrics.mutual_info_score``,
       nats) and ``H(v_k) = I(v_k; v_k)``;
    4. ``MIG = mean_k (I(z_a; v_k) - I(z_b; v_k)) / H(v_k)`` with ``z_a``, ``z_b`` the codes of
       largest and second-largest MI with ``v_k``, over the factors that vary.

    ``None`` (with a reason) with fewer than two varying factors or fewer than two codes.
    ``details``: ``mi`` (D, K), ``entropy`` (K,), ``per_factor`` gaps (``None`` for a constant factor).
    """
    c, f = _check_pair(codes, factors)
    flags = _resolve_discrete(f, discrete)
    varying = _varying(f)
    details: dict[str, Any] = {"bins": bins, "discrete": flags}
    reason = _not_meaningful(len(varying), f.shape[1], c.shape[1], need_two_codes=True)
    if reason:
        return MetricResult("mig", {"mig": None}, reason, details)
    zc = histogram_discretize(c, bins)
    mi = np.zeros((c.shape[1], f.shape[1]))
    entropy = np.zeros(f.shape[1])
    for k in range(f.shape[1]):
        y = _labels(f[:, k]) if flags[k] else histogram_discretize(f[:, k], bins)
        entropy[k] = mutual_info_score(y, y)
        for j in range(c.shape[1]):
            mi[j, k] = mutual_info_score(y, zc[:, j])
    per_factor: list[float | None] = [None] * f.shape[1]
    for k in varying:
        top = np.sort(mi[:, k])[::-1]
        per_factor[k] = float((top[0] - top[1]) / entropy[k])
    details |= {"mi": mi, "entropy": entropy, "per_factor": per_factor}
    return MetricResult("mig", {"mig": float(np.mean([per_factor[k] for k in varying]))}, None, details)


# --------------------------------------------------------------------------------------------- DCI


def _entropy_rows(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy (in ``base``) of each row of non-negative weights, after adding 1e-11 to every
    entry and normalising (scipy.stats.entropy as disentanglement_lib calls it)."""
    q = p + 1e-11
    q = q / q.sum(axis=1, keepdims=True)
    return -(q * np.log(q)).sum(axis=1) / np.log(base)


def dci_from_importance(R: np.ndarray) -> tuple[float | None, float | None]:
    """Disentanglement and completeness of a ``(D, K)`` importance matrix (``dci.py``).

    * disentanglement: ``sum_d rho_d (1 - H_K(P_d))`` with ``P_d`` row ``d`` of ``R`` normalised,
      entropy in base ``K`` (number of factors), ``rho_d = sum_k R[d, k] / sum R``;
    * completeness: ``sum_k rho_k (1 - H_D(P_k))`` with ``P_k`` column ``k`` normalised, entropy in
      base ``D`` (number of codes), ``rho_k = sum_d R[d, k] / sum R``.

    An all-zero matrix weighs codes and factors equally. Disentanglement is ``None`` with ``K < 2``
    and completeness ``None`` with ``D < 2`` (an entropy in base 1 is undefined).
    """
    R = np.abs(np.asarray(R, dtype=float))
    if R.ndim != 2 or 0 in R.shape:
        raise ValueError(f"the importance matrix must be (codes, factors), got shape {R.shape}")
    D, K = R.shape
    W = R if R.sum() > 0 else np.ones_like(R)
    dis = None
    if K >= 2:
        dis = float(np.sum((1.0 - _entropy_rows(R, K)) * W.sum(axis=1) / W.sum()))
    comp = None
    if D >= 2:
        comp = float(np.sum((1.0 - _entropy_rows(R.T, D)) * W.sum(axis=0) / W.sum()))
    return dis, comp


def dci(
    codes: np.ndarray,
    factors: np.ndarray,
    discrete: Sequence[bool] | None = None,
    n_estimators: int = 100,
    train_fraction: float = 2 / 3,
    random_state: int = 0,
) -> MetricResult:
    """DCI (Eastwood & Williams 2018) as disentanglement_lib computes it (``dci.py``).

    The samples are split (``split_indices``: 2/3 for training, like the library's 10000 training
    and 5000 test points). Per factor a gradient-boosted tree ensemble with scikit-learn's defaults
    (``n_estimators`` = 100 trees of depth 3, learning rate 0.1) predicts it from all codes:

    * discrete factor: ``GradientBoostingClassifier`` on the factor's values as classes;
      informativeness = plain accuracy (the library's only case);
    * continuous factor: ``GradientBoostingRegressor``; informativeness = R² (the library has no
      continuous branch; regression is what Eastwood & Williams did for continuous factors).

    The importance matrix ``R[:, k]`` is ``|feature_importances_|``; disentanglement and
    completeness come from :func:`dci_from_importance`. ``informativeness`` is the mean test score
    over factors, ``informativeness_train`` the mean training score. A factor constant in the
    training part is left out. Disentanglement and completeness are ``None`` (with a reason) with
    fewer than two varying factors; completeness is ``None`` with a single code.
    ``details``: ``importance`` (D, K), ``per_factor_test``, ``per_factor_train``.
    """
    c, f = _check_pair(codes, factors)
    flags = _resolve_discrete(f, discrete)
    if n_estimators < 1:
        raise ValueError(f"n_estimators must be >= 1, got {n_estimators}")
    tr, te = split_indices(len(c), train_fraction, random_state)
    D, K = c.shape[1], f.shape[1]
    R = np.zeros((D, K))
    test: list[float | None] = [None] * K
    train: list[float | None] = [None] * K
    for k in range(K):
        y = _labels(f[:, k]) if flags[k] else f[:, k]
        if np.ptp(y[tr]) == 0:
            continue
        if flags[k]:
            model = GradientBoostingClassifier(n_estimators=n_estimators, random_state=random_state)
            model.fit(c[tr], y[tr])
            train[k] = float(np.mean(model.predict(c[tr]) == y[tr]))
            test[k] = float(np.mean(model.predict(c[te]) == y[te]))
        else:
            model = GradientBoostingRegressor(n_estimators=n_estimators, random_state=random_state)
            model.fit(c[tr], y[tr])
            train[k] = float(r2_score(y[tr], model.predict(c[tr])))
            test[k] = float(r2_score(y[te], model.predict(c[te]))) if np.ptp(y[te]) > 0 else None
        R[:, k] = np.abs(model.feature_importances_)
    fitted = [k for k in range(K) if train[k] is not None]
    if not fitted:
        raise ValueError("every factor is constant in the training samples: DCI has nothing to predict")
    scored = [test[k] for k in fitted if test[k] is not None]
    values: dict[str, float | None] = {
        "disentanglement": None, "completeness": None,
        "informativeness": float(np.mean(scored)) if scored else None,
        "informativeness_train": float(np.mean([train[k] for k in fitted])),
    }
    details = {"importance": R, "per_factor_test": test, "per_factor_train": train, "discrete": flags,
               "n_estimators": n_estimators, "n_train": len(tr), "n_test": len(te)}
    reason = _not_meaningful(len(fitted), K, D, need_two_codes=False)
    if reason is None:
        Rf = R[:, fitted]
        values["disentanglement"], values["completeness"] = dci_from_importance(Rf)
        if D < 2:
            reason = "completeness is not meaningful with 1 code: it is an entropy over codes"
    return MetricResult("dci", values, reason, details)


# --------------------------------------------------------------------------------------------- SAP


def sap_score_matrix(
    codes: np.ndarray,
    factors: np.ndarray,
    discrete: Sequence[bool] | None = None,
    train_fraction: float = 2 / 3,
    random_state: int = 0,
) -> np.ndarray:
    """``(D, K)`` matrix of how well each single code predicts each factor (``sap_score.py``).

    * continuous factor: ``Cov(z_j, v_k)^2 / (Var z_j Var v_k)`` (the squared correlation, the
      library's ``continuous_factors=True`` branch) on the training part; 0 when ``Var z_j <= 1e-12``;
    * discrete factor: accuracy on the test part of ``LinearSVC(C=0.01, class_weight="balanced")``
      fitted on the single code (the library's default branch).

    A factor constant in the training part gets a column of zeros.
    """
    c, f = _check_pair(codes, factors)
    flags = _resolve_discrete(f, discrete)
    tr, te = split_indices(len(c), train_fraction, random_state)
    D, K = c.shape[1], f.shape[1]
    S = np.zeros((D, K))
    for k in range(K):
        y = _labels(f[:, k]) if flags[k] else f[:, k]
        if np.ptp(y[tr]) == 0:
            continue
        for j in range(D):
            x = c[:, j]
            if not flags[k]:
                cov = np.cov(x[tr], y[tr], ddof=1)
                S[j, k] = cov[0, 1] ** 2 / (cov[0, 0] * cov[1, 1]) if cov[0, 0] > 1e-12 else 0.0
                continue
            clf = LinearSVC(C=0.01, class_weight="balanced")
            with warnings.catch_warnings():
                # the strongly regularised 1-D fit often stops at max_iter, as in the library
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(x[tr, None], y[tr])
            S[j, k] = float(np.mean(clf.predict(x[te, None]) == y[te]))
    return S


def _top_two_gaps(S: np.ndarray, columns: Sequence[int]) -> list[float]:
    return [float(np.sort(S[:, k])[-1] - np.sort(S[:, k])[-2]) for k in columns]


def sap(
    codes: np.ndarray,
    factors: np.ndarray,
    discrete: Sequence[bool] | None = None,
    train_fraction: float = 2 / 3,
    random_state: int = 0,
) -> MetricResult:
    """SAP score (Kumar et al. 2018) as disentanglement_lib computes it: the mean over factors of
    the gap between the best and the second-best entry of the factor's column of
    :func:`sap_score_matrix`. ``None`` (with a reason) with fewer than two varying factors or
    fewer than two codes. ``details``: ``scores`` (D, K), ``per_factor`` gaps."""
    c, f = _check_pair(codes, factors)
    flags = _resolve_discrete(f, discrete)
    varying = _varying(f)
    details: dict[str, Any] = {"discrete": flags}
    reason = _not_meaningful(len(varying), f.shape[1], c.shape[1], need_two_codes=True)
    if reason:
        return MetricResult("sap", {"sap": None}, reason, details)
    S = sap_score_matrix(c, f, flags, train_fraction, random_state)
    gaps = _top_two_gaps(S, varying)
    details |= {"scores": S, "per_factor": gaps}
    return MetricResult("sap", {"sap": float(np.mean(gaps))}, None, details)


# ------------------------------------------------------------------------- earlier project variants


def _make_model(model: str, is_discrete: bool, random_state: int, n_estimators: int):
    if model in ("gbt", "gradient_boosting"):
        cls = GradientBoostingClassifier if is_discrete else GradientBoostingRegressor
        return cls(n_estimators=n_estimators, max_depth=3, learning_rate=0.1, random_state=random_state)
    if model in ("rf", "random_forest"):
        cls = RandomForestClassifier if is_discrete else RandomForestRegressor
        return cls(n_estimators=n_estimators, max_depth=8, min_samples_leaf=5, random_state=random_state, n_jobs=1)
    raise ValueError(f"unknown model {model!r}: use 'gbt' or 'random_forest'")


def dci_balanced(
    codes: np.ndarray,
    factors: np.ndarray,
    discrete: Sequence[bool] | None = None,
    model: str = "gbt",
    test_size: float = 0.25,
    n_estimators: int = 50,
    random_state: int = 0,
) -> MetricResult:
    """The project's earlier DCI variant; not comparable with published numbers (use :func:`dci`).

    ``model`` is ``"gbt"`` (gradient-boosted trees, depth 3) or ``"random_forest"``; informativeness
    per factor is R² (continuous) or chance-adjusted balanced accuracy (discrete: 0 = chance,
    1 = perfect), clipped to ``[0, 1]``, so class imbalance cannot inflate it. Disentanglement and
    completeness use :func:`dci_from_importance`; ``None`` (with a reason) like :func:`dci`.
    """
    c, f = _check_pair(codes, factors)
    flags = _resolve_discrete(f, discrete)
    _make_model(model, True, random_state, 1)  # reject an unknown model before fitting anything
    idx_train, idx_test = train_test_split(np.arange(len(c)), test_size=test_size, random_state=random_state)
    R = np.zeros((c.shape[1], f.shape[1]))
    info: list[float] = []
    fitted = []
    for k in range(f.shape[1]):
        y = _labels(f[:, k]) if flags[k] else f[:, k]
        y_train, y_test = y[idx_train], y[idx_test]
        if len(np.unique(y_train)) < 2:
            continue
        est = _make_model(model, flags[k], random_state, n_estimators)
        est.fit(c[idx_train], y_train)
        R[:, k] = np.abs(est.feature_importances_)
        pred = est.predict(c[idx_test])
        if flags[k]:
            score = balanced_accuracy_score(y_test, pred, adjusted=True)
        else:
            score = r2_score(y_test, pred) if np.var(y_test) > 0 else 0.0
        info.append(float(np.clip(score, 0.0, 1.0)))
        fitted.append(k)
    if not fitted:
        raise ValueError("every factor is constant in the training samples: DCI has nothing to predict")
    values: dict[str, float | None] = {"disentanglement": None, "completeness": None,
                                       "informativeness": float(np.mean(info))}
    reason = _not_meaningful(len(fitted), f.shape[1], c.shape[1], need_two_codes=False)
    if reason is None:
        values["disentanglement"], values["completeness"] = dci_from_importance(R[:, fitted])
        if c.shape[1] < 2:
            reason = "completeness is not meaningful with 1 code: it is an entropy over codes"
    return MetricResult("dci_balanced", values, reason, {"importance": R, "model": model})


def sap_tree_balanced(
    codes: np.ndarray,
    factors: np.ndarray,
    discrete: Sequence[bool] | None = None,
    test_size: float = 0.25,
    random_state: int = 0,
) -> MetricResult:
    """The project's earlier SAP variant; not comparable with published numbers (use :func:`sap`).

    Continuous factor: squared Pearson correlation on all samples. Discrete factor: balanced
    accuracy on a held-out split of a decision tree with at most ``n_classes`` leaves on the single
    code (it can find a class that sits between two others, which a linear classifier cannot); a
    constant code scores chance (``1 / n_classes``). Score: mean over factors of the top-two gap.
    """
    c, f = _check_pair(codes, factors)
    flags = _resolve_discrete(f, discrete)
    varying = _varying(f)
    reason = _not_meaningful(len(varying), f.shape[1], c.shape[1], need_two_codes=True)
    if reason:
        return MetricResult("sap_tree_balanced", {"sap": None}, reason)
    D, K = c.shape[1], f.shape[1]
    S = np.zeros((D, K))
    idx_train, idx_test = train_test_split(np.arange(len(c)), test_size=test_size, random_state=random_state)
    for k in varying:
        y = f[:, k]
        if not flags[k]:
            yc = y - y.mean()
            for d in range(D):
                xc = c[:, d] - c[:, d].mean()
                vx = (xc**2).sum()
                if vx > 0:
                    S[d, k] = float((xc @ yc) ** 2 / (vx * (yc**2).sum()))
            continue
        labels = _labels(y)
        n_classes = int(labels.max()) + 1
        for d in range(D):
            x = c[:, d : d + 1]
            if np.ptp(x) == 0:
                S[d, k] = 1.0 / n_classes
                continue
            clf = DecisionTreeClassifier(max_leaf_nodes=max(2, n_classes), random_state=random_state)
            clf.fit(x[idx_train], labels[idx_train])
            S[d, k] = float(balanced_accuracy_score(labels[idx_test], clf.predict(x[idx_test])))
    return MetricResult("sap_tree_balanced", {"sap": float(np.mean(_top_two_gaps(S, varying)))}, None, {"scores": S})
