"""Checking a torch device name before anything is loaded onto it."""

from __future__ import annotations


def check_device(device: str, flag: str = "device") -> str:
    """Return ``device`` if this machine has it; else raise ValueError saying what is allowed.

    ``flag`` names the option in the message (``--device`` on the command line).
    """
    import torch

    fallback = "use --device cpu" if flag.startswith("--") else "use cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {device}: CUDA is not available on this machine; {fallback}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0..)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: MPS is not available on this machine; {fallback}")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {device!r}: supported device types are cpu, cuda and mps")
    return str(device)
