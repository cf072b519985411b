"""Reading image datasets in the ``train-vae`` npz layout (images, optional factors and factor_names)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..safe_load import LoadError


def load_npz(path: str | Path, need_factors: bool = False) -> dict[str, Any]:
    """Load and check an npz: ``images`` (N,H,W,C) uint8, C in {1,3}; ``factors`` (N,K); ``factor_names`` (K,)."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"data file {path} does not exist" if not path.exists() else f"data file {path} is not a file")
    if not zipfile.is_zipfile(path):
        raise LoadError(f"{path} is not an .npz archive (write one with numpy.savez(path, images=...))")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        reason = "it holds object arrays, which need pickle and are refused" if "allow_pickle" in str(exc) else str(exc)
        raise LoadError(f"{path} is not a readable .npz file: {reason}") from exc
    if "images" not in data:
        raise LoadError(f"{path} has no 'images' array (found: {', '.join(data) or 'nothing'}); expected images (N,H,W,3) uint8")
    images = data["images"]
    if images.dtype != np.uint8:
        raise LoadError(f"{path}: 'images' must be uint8 in 0..255, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2] or len(images) == 0:
        raise LoadError(f"{path}: 'images' must have shape (N,H,W,C) with H == W and C in (1, 3), got {images.shape}")
    out: dict[str, Any] = {"images": images}
    if "factors" in data:
        raw = data["factors"]
        if raw.dtype.kind not in "biuf":
            raise LoadError(f"{path}: 'factors' must hold numbers (N, K), got dtype {raw.dtype}")
        factors = np.asarray(raw, dtype=np.float64)
        if factors.ndim != 2 or len(factors) != len(images):
            raise LoadError(f"{path}: 'factors' must have shape (N={len(images)}, K), got {data['factors'].shape}")
        names = [str(n) for n in data.get("factor_names", [f"factor{k}" for k in range(factors.shape[1])])]
        if len(names) != factors.shape[1]:
            raise LoadError(f"{path}: {len(names)} factor_names for {factors.shape[1]} factor columns")
        check_finite_factors(factors, names, path)
        out["factors"], out["factor_names"] = factors, names
    elif need_factors:
        raise LoadError(f"{path} has no 'factors' array; evaluation needs ground-truth factors (N,K) and factor_names")
    return out


def check_images_fit(images: np.ndarray, image_size: int | None, channels: int | None, what: str = "the data") -> None:
    """Refuse images (N,H,W,C) that a model made for ``image_size`` x ``image_size`` x ``channels`` cannot take."""
    if image_size is None and channels is None:
        return
    _, h, w, c = images.shape
    if (image_size is not None and (h, w) != (image_size, image_size)) or (channels is not None and c != channels):
        want = f"{image_size}x{image_size}" if image_size is not None else f"{h}x{w}"
        raise LoadError(
            f"{what} holds {h}x{w} images with {c} channel(s), but the model takes {want} images with "
            f"{channels if channels is not None else c} channel(s); use data like the model's training data"
        )


def check_finite_factors(factors: np.ndarray, names: list[str], path: str | Path) -> None:
    """Refuse factor columns with NaN or +-inf (metrics on them would be NaN or silently wrong)."""
    bad = ~np.isfinite(factors)
    if not bad.any():
        return
    column = int(np.flatnonzero(bad.any(axis=0))[0])
    rows = np.flatnonzero(bad[:, column])
    value = factors[rows[0], column]
    more = sum(1 for c in range(factors.shape[1]) if bad[:, c].any()) - 1
    others = f" (and {more} more column(s))" if more else ""
    raise LoadError(
        f"{path}: factor column {column} ({names[column]!r}) holds {len(rows)} non-finite value(s) "
        f"(first: {value} in row {int(rows[0])}){others}; factors must be finite numbers: drop or impute those rows"
    )
