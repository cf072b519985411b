"""Loading user-supplied files safely: safetensors, JSON, or ``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class LoadError(ValueError):
    """A model, weights or data file could not be read; the message says which and why."""


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.parent.is_dir():
        raise LoadError(f"model directory {path.parent} does not exist")
    if not path.is_file():
        raise LoadError(f"{path.parent} has no {path.name}; a model directory needs config.json and model.safetensors")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LoadError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or foreign file raises :class:`LoadError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LoadError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{path} is not a valid safetensors file ({exc}); re-save it with safetensors.torch.save_file") from exc


def load_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors, or from a torch checkpoint only with ``allow_pickle``.

    Even then ``torch.load(weights_only=True)`` is used: tensors and plain containers only.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    if not allow_pickle:
        raise LoadError(
            f"{path} is a pickle-based checkpoint; pickles can run arbitrary code when loaded, so they are "
            "refused by default. Convert it to .safetensors, or pass --allow-pickle to load it with "
            "torch.load(weights_only=True)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise LoadError(f"{path} could not be loaded with torch.load(weights_only=True): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"{path} does not hold a flat state dict of tensors")
    return state
