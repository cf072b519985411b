"""Loading user-supplied files safely: safetensors, JSON, or ``torch.load(weights_only=True)``.

Links to model files are followed (a model directory of links is normal), but whatever they lead
to must be a regular file: a FIFO, device or socket is refused with a :class:`LoadError` before it
is opened, so a pipe where a weights file should be cannot hang a run.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
from .errors import LoadError  # noqa: F401 (re-exported)


def _refuse_special(path: Path, what: str) -> None:
    """Raise :class:`LoadError` when ``path`` exists but is not a regular file (links followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing: the caller says so in its own words
    if stat.S_ISREG(mode):
        return
    kind = next((words for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                                           (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                                           (stat.S_ISBLK, "a block device")) if test(mode)), "a special file")
    raise LoadError(f"{what} {path} is {kind}, not a regular file; point to the file itself")


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.parent.is_dir():
        raise LoadError(f"model directory {path.parent} does not exist")
    _refuse_special(path, "config file")
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
    _refuse_special(path, "weights file")
    if not path.is_file():
        raise LoadError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{path} is not a valid safetensors file ({exc}); re-save it with safetensors.torch.save_file") from exc


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def _head(path: Path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def looks_like_safetensors(path: str | Path) -> bool:
    """True when the file starts like safetensors: an 8-byte header length, then a JSON object."""
    path = Path(path)
    head = _head(path, 9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    try:
        return 0 < size <= path.stat().st_size - 8
    except OSError:
        return False


def looks_like_pickle(path: str | Path) -> bool:
    """True for ``torch.save`` files (a zip archive) and raw pickles (protocol 2+)."""
    head = _head(Path(path), 4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _torch_reason(exc: Exception) -> str:
    """The useful line of torch.load's error (its generic advice to use weights_only=False is dropped)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if not line.startswith(boiler):
            detail = line.replace("WeightsUnpickler error:", "").strip()
            if detail:
                return detail[:200]
    return (lines[0][:200] if lines else "") or type(exc).__name__


def load_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors, or from a torch checkpoint only with ``allow_pickle``.

    The format is told by the file's content, not its name. Even with ``allow_pickle``,
    ``torch.load(weights_only=True)`` is used: tensors and plain containers only, never arbitrary
    objects (a pickle that would construct one is refused, its code never runs).
    """
    path = Path(path)
    _refuse_special(path, "weights file")
    if not path.is_file():
        raise LoadError(f"weights file {path} does not exist")
    if looks_like_safetensors(path) or (path.suffix == ".safetensors" and not looks_like_pickle(path)):
        return load_safetensors(path)
    if not allow_pickle:
        raise LoadError(
            f"{path} is a pickle-based checkpoint; pickles can run arbitrary code when loaded, so they are "
            "refused by default. Convert it to .safetensors, or pass allow_pickle=True to load it with "
            "torch.load(weights_only=True)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise LoadError(
            f"{path} could not be loaded with torch.load(weights_only=True), which only reads tensors and "
            f"plain containers ({_torch_reason(exc)}). The file holds something else, possibly code: do not "
            "load it with weights_only=False unless you trust its source; re-save its tensors as safetensors."
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # the common {"state_dict": ...} checkpoint layout
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise LoadError(f"{path} does not hold a flat state dict of tensors (name -> tensor)")
    return state


def find_weights(directory: str | Path, name: str = "model.safetensors", allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a model directory: ``name`` (safetensors), else a pickle checkpoint in it.

    A pickle checkpoint (``model.pt``, ``pytorch_model.bin``, ...) is refused unless
    ``allow_pickle``; see :func:`load_weights`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise LoadError(f"model directory {directory} does not exist")
    preferred = directory / name
    _refuse_special(preferred, "weights file")
    if preferred.is_file():
        return load_weights(preferred, allow_pickle=allow_pickle)
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        if not allow_pickle:
            raise LoadError(
                f"{directory} has no {name}, only the pickle-based checkpoint {pickles[0].name}; pickles can run "
                "arbitrary code when loaded, so they are refused by default. Convert it to .safetensors, or pass "
                "allow_pickle=True to load it with torch.load(weights_only=True)."
            )
        return load_weights(pickles[0], allow_pickle=True)
    raise LoadError(f"{directory} has no {name}; a model directory needs config.json and {name}")
