"""Disentanglement metrics of a code against ground-truth factors: MIG, DCI and SAP.

``codes`` is ``(N, D)`` (one column per latent), ``factors`` is ``(N, K)`` (one column per
ground-truth factor). A factor is treated as discrete when ``discrete[k]`` is true; when
``discrete`` is not given it is inferred (:func:`infer_discrete`). Every metric returns a dict of
floats.

References
----------
* MIG: R. T. Q. Chen, X. Li, R. Grosse, D. Duvenaud, "Isolating Sources of Disentanglement in
  Variational Autoencoders", NeurIPS 2018.
* DCI: C. Eastwood, C. K. I. Williams, "A Framework for the Quantitative Evaluation of Disentangled
  Representations", ICLR 2018.
* SAP: A. Kumar, P. Sattigeri, A. Balakrishnan, "Variational Inference of Disentangled Latent
  Concepts from Unlabeled Observations", ICLR 2018.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.metrics import balanced_accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.tree import DecisionTreeClassifier

from .factors import _check_pair, factor_entropies, mutual_info_matrix


def infer_discrete(factors: np.ndarray, max_levels: int = 20) -> list[bool]:
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
        raise ValueError(f"discrete has {len(flags)} entries for {factors.shape[1]} factors")
    return flags


# --------------------------------------------------------------------------------------------- MIG


def mig(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> dict[str, float]:
    """Mutual Information Gap (Chen et al. 2018).

    For each factor ``v_k``: ``(I(z_a; v_k) - I(z_b; v_k)) / H(v_k)`` where ``z_a`` and ``z_b`` are
    the codes with the largest and second-largest MI with ``v_k``; the result is the mean over
    factors. MI is the plug-in estimate on discretised values (``factors.mutual_info_matrix``),
    which replaces the paper's estimator for continuous encoders. Constant factors (zero entropy)
    are left out of the mean. With a single code the gap is the top MI itself.

    Returns ``{"mig": value}``.
    """
    c, f = _check_pair(codes, factors)
    mi = mutual_info_matrix(c, f, bins)  # (D, K)
    h = factor_entropies(f, bins)
    gaps = []
    for k in range(f.shape[1]):
        if h[k] <= 0:
            continue
        col = np.sort(mi[:, k])[::-1]
        second = col[1] if len(col) > 1 else 0.0
        gaps.append((col[0] - second) / h[k])
    if not gaps:
        raise ValueError("all factors are constant: MIG is undefined")
    return {"mig": float(np.mean(gaps))}


# --------------------------------------------------------------------------------------------- DCI


def _make_model(model: str, is_discrete: bool, random_state: int, n_estimators: int):
    if model in ("gbt", "gradient_boosting"):
        cls = GradientBoostingClassifier if is_discrete else GradientBoostingRegressor
        return cls(n_estimators=n_estimators, max_depth=3, learning_rate=0.1, random_state=random_state)
    if model in ("rf", "random_forest"):
        cls = RandomForestClassifier if is_discrete else RandomForestRegressor
        return cls(n_estimators=n_estimators, max_depth=8, min_samples_leaf=5, random_state=random_state, n_jobs=1)
    raise ValueError(f"unknown model {model!r}: use 'gbt' or 'random_forest'")


def dci_importance_matrix(
    codes: np.ndarray,
    factors: np.ndarray,
    discrete: Sequence[bool] | None = None,
    model: str = "gbt",
    test_size: float = 0.25,
    n_estimators: int = 50,
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit one tree ensemble per factor (codes -> factor) and return ``(R, info)``.

    ``R`` is the ``(D, K)`` matrix of impurity-based feature importances (each column sums to 1
    unless the model found nothing to split on). ``info[k]`` is the held-out score for factor
    ``k``: R² for a continuous factor, chance-adjusted balanced accuracy (0 = chance, 1 = perfect)
    for a discrete one, both clipped to ``[0, 1]``.
    """
    c, f = _check_pair(codes, factors)
    flags = _resolve_discrete(f, discrete)
    idx_train, idx_test = train_test_split(np.arange(len(c)), test_size=test_size, random_state=random_state)
    R = np.zeros((c.shape[1], f.shape[1]))
    info = np.zeros(f.shape[1])
    for k in range(f.shape[1]):
        y = f[:, k]
        if flags[k]:
            y = np.unique(y, return_inverse=True)[1].reshape(-1)
        y_train, y_test = y[idx_train], y[idx_test]
        if len(np.unique(y_train)) < 2:  # constant factor: nothing to explain
            continue
        est = _make_model(model, flags[k], random_state, n_estimators)
        est.fit(c[idx_train], y_train)
        R[:, k] = np.abs(est.feature_importances_)
        pred = est.predict(c[idx_test])
        if flags[k]:
            score = balanced_accuracy_score(y_test, pred, adjusted=True)
        else:
            score = r2_score(y_test, pred) if np.var(y_test) > 0 else 0.0
        info[k] = float(np.clip(score, 0.0, 1.0))
    return R, info


def _entropy(p: np.ndarray, base: int) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(base))


def dci_from_importance(R: np.ndarray) -> tuple[float, float]:
    """Disentanglement and completeness from a ``(D, K)`` importance matrix (Eastwood & Williams).

    * Disentanglement of code ``d``: ``1 - H_K(P_d)`` with ``P_d = R[d, :] / sum_k R[d, k]`` and
      the entropy taken in base ``K``; overall: weighted by ``rho_d = sum_k R[d, k] / sum R``.
    * Completeness of factor ``k``: ``1 - H_D(P_k)`` with ``P_k = R[:, k] / sum_d R[d, k]``,
      entropy in base ``D``; overall: the mean over factors with non-zero importance.

    With ``K == 1`` every code is trivially disentangled (1.0); with ``D == 1`` every factor is
    trivially complete (1.0).
    """
    R = np.abs(np.asarray(R, dtype=float))
    D, K = R.shape
    total = R.sum()
    if total <= 0:
        return 0.0, 0.0
    row = R.sum(axis=1)
    dis = np.zeros(D)
    for d in range(D):
        if row[d] > 0:
            dis[d] = 1.0 if K == 1 else 1.0 - _entropy(R[d] / row[d], K)
    disentanglement = float((dis * row / total).sum())
    col = R.sum(axis=0)
    comp = []
    for k in range(K):
        if col[k] > 0:
            comp.append(1.0 if D == 1 else 1.0 - _entropy(R[:, k] / col[k], D))
    completeness = float(np.mean(comp)) if comp else 0.0
    return disentanglement, completeness


def dci(
    codes: np.ndarray,
    factors: np.ndarray,
    discrete: Sequence[bool] | None = None,
    model: str = "gbt",
    test_size: float = 0.25,
    n_estimators: int = 50,
    random_state: int = 0,
) -> dict[str, float]:
    """DCI (Eastwood & Williams 2018) with tree-ensemble importances.

    ``model`` is ``"gbt"`` (scikit-learn gradient-boosted trees, depth 3; the default) or
    ``"random_forest"``. Importances are impurity-based ``feature_importances_`` fitted on the
    training split; informativeness is the mean held-out score over factors (R² for continuous
    factors, chance-adjusted balanced accuracy for discrete ones, each clipped to ``[0, 1]``, so 1
    is perfect and 0 is no better than predicting the mean / chance). The paper reports
    informativeness as a prediction *error*; here it is a score, higher is better.

    Returns ``{"disentanglement", "completeness", "informativeness"}``.
    """
    R, info = dci_importance_matrix(codes, factors, discrete, model, test_size, n_estimators, random_state)
    d, c = dci_from_importance(R)
    return {"disentanglement": d, "completeness": c, "informativeness": float(np.mean(info))}


# --------------------------------------------------------------------------------------------- SAP


def sap_score_matrix(
    codes: np.ndarray,
    factors: np.ndarray,
    discrete: Sequence[bool] | None = None,
    test_size: float = 0.25,
    random_state: int = 0,
) -> np.ndarray:
    """``(D, K)`` matrix of how well each single code predicts each factor (Kumar et al. 2018).

    Continuous factor: R² of a linear regression of the factor on the single code, i.e. the squared
    Pearson correlation, on all samples. Discrete factor: balanced accuracy on a held-out split of
    a threshold classifier on the single code (a decision tree with at most ``n_classes`` leaves,
    a decision stump for a binary factor). A constant code scores 0 for a continuous factor and
    chance (``1 / n_classes``) for a discrete one; a constant factor scores 0 everywhere.
    """
    c, f = _check_pair(codes, factors)
    flags = _resolve_discrete(f, discrete)
    D, K = c.shape[1], f.shape[1]
    S = np.zeros((D, K))
    idx_train = idx_test = None
    for k in range(K):
        y = f[:, k]
        if not flags[k]:
            yc = y - y.mean()
            vy = (yc**2).sum()
            for d in range(D):
                xc = c[:, d] - c[:, d].mean()
                vx = (xc**2).sum()
                if vx > 0 and vy > 0:
                    S[d, k] = float((xc @ yc) ** 2 / (vx * vy))
            continue
        labels = np.unique(y, return_inverse=True)[1].reshape(-1)
        n_classes = int(labels.max()) + 1
        if n_classes < 2:
            continue
        if idx_train is None:
            idx_train, idx_test = train_test_split(np.arange(len(c)), test_size=test_size, random_state=random_state)
        for d in range(D):
            x = c[:, d : d + 1]
            if np.ptp(x) == 0:  # a constant code predicts at chance level
                S[d, k] = 1.0 / n_classes
                continue
            clf = DecisionTreeClassifier(max_leaf_nodes=max(2, n_classes), random_state=random_state)
            clf.fit(x[idx_train], labels[idx_train])
            S[d, k] = float(balanced_accuracy_score(labels[idx_test], clf.predict(x[idx_test])))
    return S


def sap(
    codes: np.ndarray,
    factors: np.ndarray,
    discrete: Sequence[bool] | None = None,
    test_size: float = 0.25,
    random_state: int = 0,
) -> dict[str, float]:
    """Separated Attribute Predictability (Kumar et al. 2018).

    For each factor, the gap between the best and the second-best single-code score of
    :func:`sap_score_matrix`; the result is the mean over factors. With a single code the gap is
    the best score itself. Returns ``{"sap": value}``.
    """
    S = sap_score_matrix(codes, factors, discrete, test_size, random_state)
    gaps = []
    for k in range(S.shape[1]):
        col = np.sort(S[:, k])[::-1]
        gaps.append(col[0] - (col[1] if len(col) > 1 else 0.0))
    return {"sap": float(np.mean(gaps))}
