"""Which ground-truth factor a latent captures, measured by mutual information.

Codes (latent values, shape ``(N, D)``) and factors (ground-truth generative factors, shape
``(N, K)``) are discretised column by column and compared with the plug-in (histogram) estimate
of mutual information, ``sklearn.metrics.mutual_info_score``. All quantities are in nats.

The plug-in estimator is biased upwards by roughly ``(bins_a - 1)(bins_b - 1) / (2N)`` nats, so
with few samples even independent columns get a small positive MI; use enough samples (a few
thousand for 20 bins) or fewer bins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import mutual_info_score


def _as_2d(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D (N, columns), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_pair(codes: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = _as_2d(codes, "codes")
    f = _as_2d(factors, "factors")
    if c.shape[0] != f.shape[0]:
        raise ValueError(f"codes and factors must have the same number of rows, got {c.shape[0]} and {f.shape[0]}")
    return c, f


def discretize(x: np.ndarray, bins: int = 20) -> np.ndarray:
    """Discretise each column into integer codes ``0 .. bins-1`` with equal-width bins.

    A column with at most ``bins`` distinct values is not binned: its values are replaced by their
    rank among the distinct values (``0 .. n_unique-1``), so discrete factors keep their classes.
    A 1-D input gives a 1-D output; otherwise the shape is kept.
    """
    def column(col: np.ndarray) -> np.ndarray:
        uniq, inverse = np.unique(col, return_inverse=True)
        if len(uniq) <= bins:
            return inverse.reshape(-1)
        edges = np.linspace(col.min(), col.max(), bins + 1)
        # interior edges only: values equal to the max fall into the last bin
        return np.digitize(col, edges[1:-1], right=False)

    return _by_column(x, bins, column)


def _by_column(x: np.ndarray, bins: int, label: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``label`` applied to every column of ``x`` (1-D in, 1-D out), after checking ``bins``."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    arr = np.asarray(x, dtype=float)
    squeeze = arr.ndim == 1
    arr = _as_2d(arr, "x")
    out = np.empty(arr.shape, dtype=np.int64)
    for j in range(arr.shape[1]):
        out[:, j] = label(arr[:, j])
    return out[:, 0] if squeeze else out


def histogram_discretize(x: np.ndarray, bins: int = 20) -> np.ndarray:
    """Bin every column into ``bins`` equal-width bins between its min and max, whatever its number
    of distinct values: disentanglement_lib's ``histogram_discretizer`` (the edges of
    ``np.histogram(column, bins)``; the maximum falls into the last bin). Labels are ``0 .. bins-1``.

    Unlike :func:`discretize`, a column with few distinct values is binned too (two values closer
    than a bin width share a bin), as disentanglement_lib does for codes.
    """
    return _by_column(x, bins, lambda col: np.digitize(col, np.histogram_bin_edges(col, bins)[1:-1], right=False))


def mutual_info_matrix(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> np.ndarray:
    """``(D, K)`` matrix of mutual information (nats) between each code and each factor."""
    c, f = _check_pair(codes, factors)
    cd = discretize(c, bins)
    fd = discretize(f, bins)
    m = np.zeros((c.shape[1], f.shape[1]))
    for i in range(c.shape[1]):
        for k in range(f.shape[1]):
            m[i, k] = mutual_info_score(fd[:, k], cd[:, i])
    return m


def factor_entropies(factors: np.ndarray, bins: int = 20) -> np.ndarray:
    """``(K,)`` entropy (nats) of each discretised factor (H(X) = I(X; X))."""
    fd = discretize(_as_2d(factors, "factors"), bins)
    return np.array([mutual_info_score(fd[:, k], fd[:, k]) for k in range(fd.shape[1])])


@dataclass
class FactorMatch:
    """The ground-truth factor a latent captures best.

    ``score`` is the best normalised mutual information, ``factor`` its name (``None`` when the
    score is below the threshold), ``scores`` the normalised MI for every factor name.
    """

    latent: int
    factor: str | None
    score: float
    metric: str
    scores: dict[str, float] = field(default_factory=dict)


def normalized_mutual_info_matrix(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> np.ndarray:
    """``(D, K)`` matrix of MI(code, factor) / H(factor); 0 for a constant factor."""
    mi = mutual_info_matrix(codes, factors, bins)
    h = factor_entropies(factors, bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        nmi = np.where(h[None, :] > 0, mi / np.where(h > 0, h, 1.0)[None, :], 0.0)
    return np.clip(nmi, 0.0, 1.0)


def captured_factors(
    codes: np.ndarray,
    factors: np.ndarray,
    factor_names: Sequence[str],
    min_score: float = 0.1,
    bins: int = 20,
) -> list[FactorMatch]:
    """For each latent (code column), the factor with the highest MI / H(factor).

    ``factor`` is ``None`` when even the best normalised MI is below ``min_score``. Ties go to the
    first factor in ``factor_names`` order.
    """
    c, f = _check_pair(codes, factors)
    names = list(factor_names)
    if len(names) != f.shape[1]:
        raise ValueError(f"got {len(names)} factor names for {f.shape[1]} factors")
    if len(set(names)) != len(names):
        raise ValueError("factor names must be unique")
    nmi = normalized_mutual_info_matrix(c, f, bins)
    matches = []
    for i in range(c.shape[1]):
        row = nmi[i]
        best = int(np.argmax(row))
        score = float(row[best])
        matches.append(
            FactorMatch(
                latent=i,
                factor=names[best] if score >= min_score else None,
                score=score,
                metric="normalized_mutual_info",
                scores={n: float(v) for n, v in zip(names, row)},
            )
        )
    return matches
