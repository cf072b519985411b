"""The thresholds file: certainty thresholds calibrated per backend and similarity (``latentexplainer
calibrate`` writes it; every run reads it when no threshold is given)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

THRESHOLDS_ENV = "LATENTEXPLAINER_THRESHOLDS"
THRESHOLDS_FILE = "thresholds.json"
FILE_VERSION = 1
_OFF = {"none", "off", "0", "false", "no"}


# ------------------------------------------------------------------------------------ the file


def thresholds_path(path: str | os.PathLike | None = None) -> Path | None:
    """The calibration file: ``path`` when given, else ``$LATENTEXPLAINER_THRESHOLDS`` (None when it
    says ``none``/``off``), else ``$XDG_CONFIG_HOME/latentexplainer/thresholds.json`` (an XDG value
    that is not an absolute path is ignored, as the XDG spec says), else ``~/.config/...``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(THRESHOLDS_ENV)
    if env is not None and env.strip():
        if env.strip().lower() in _OFF:
            return None
        return Path(env.strip()).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME", "").strip()
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "latentexplainer" / THRESHOLDS_FILE


def read_thresholds(path: str | os.PathLike) -> dict[str, Any]:
    """The content of a calibration file (an empty layout when the file does not exist).

    Raises ``ValueError`` saying what is wrong with a file that exists but cannot be used."""
    path = Path(path)
    if not path.exists():
        return {"version": FILE_VERSION, "thresholds": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"calibration file {path} cannot be read: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("thresholds"), dict):
        raise ValueError(f"calibration file {path} has no 'thresholds' object")
    if data.get("version") != FILE_VERSION:
        raise ValueError(f"calibration file {path} has version {data.get('version')!r}; this version reads {FILE_VERSION}")
    for backend, per in data["thresholds"].items():
        if not isinstance(per, dict):
            raise ValueError(f"calibration file {path}: thresholds[{backend!r}] must be an object")
        for sim, entry in per.items():
            value = entry.get("threshold") if isinstance(entry, dict) else None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"calibration file {path}: thresholds[{backend!r}][{sim!r}] needs a 'threshold' in [0, 1]")
    return data


def write_thresholds(entries: dict[str, dict[str, dict[str, Any]]], path: str | os.PathLike | None = None) -> Path:
    """Merge ``entries`` (backend -> similarity -> entry with ``threshold``) into the calibration
    file (created with its folder when missing) and return its path. Other entries are kept."""
    from ..safe_io import atomic_write_text

    target = thresholds_path(path)
    if target is None:
        raise ValueError(f"calibrations are turned off (${THRESHOLDS_ENV}={os.environ.get(THRESHOLDS_ENV)}); pass an output file")
    data = read_thresholds(target)
    for backend, per in entries.items():
        data["thresholds"].setdefault(backend, {}).update(per)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return target


def lookup_threshold(backend: str, similarity: str, path: str | os.PathLike | None = None) -> tuple[float, str] | None:
    """The calibrated threshold for (``backend``, ``similarity``) and where it came from
    (``"calibrated: PATH"``), or None when there is none. An unusable file is reported with a
    warning and ignored (explaining still works, with the default threshold)."""
    target = thresholds_path(path)
    if target is None or not target.is_file():
        return None
    try:
        data = read_thresholds(target)
    except ValueError as exc:
        warnings.warn(f"{exc}; using the default threshold", RuntimeWarning, stacklevel=2)
        return None
    entry = data["thresholds"].get(str(backend), {}).get(str(similarity))
    if entry is None:
        return None
    return float(entry["threshold"]), f"calibrated: {target}"


def resolve_threshold(threshold: float | None, backend: str, similarity: str, default: float) -> tuple[float, str]:
    """The threshold a run uses and its source: the given one (``"argument"``), else a calibrated one
    (``"calibrated: PATH"``), else the similarity's default (``"default (SIMILARITY)"``)."""
    if threshold is not None:
        return float(threshold), "argument"
    found = lookup_threshold(backend, similarity)
    if found is not None:
        return found
    return float(default), f"default ({similarity})"
