"""Checking a torch device name before anything is loaded onto it."""

from __future__ import annotations


def check_device(device: str, flag: str = "device") -> str:
    """Return ``device`` if this machine has it; else raise ValueError saying what is allowed.

    ``flag`` names the option at the start of the message (``--device`` on the command line, which
    also turns the ``device="cpu"`` advice into its flag).
    """
    import torch

    fallback = 'use device="cpu"'
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


#: Accepted dtype names (and aliases) -> torch dtype attribute names; one table for every component.
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def dtype_name(dtype: object) -> str:
    """The canonical name (float32, float16, bfloat16) of a dtype name, alias or torch dtype;
    anything else raises ValueError listing the accepted names."""
    name = DTYPES.get(str(dtype).strip().lower().removeprefix("torch."))
    if name is None:
        raise ValueError(f"must be one of float32, float16, bfloat16 (or fp32, fp16, bf16), got {str(dtype)!r}")
    return name
