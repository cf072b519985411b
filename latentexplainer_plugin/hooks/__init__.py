"""Latent sites in any torch model: find, probe, capture and edit them (through nnsight)."""

from .intervene import apply_edit, capture, run_with_edit, wrap
from .sites import EditError, SiteError, check_finite, module_paths, probe_shape, resolve_module, validate_strengths

__all__ = [
    "EditError", "SiteError", "apply_edit", "capture", "check_finite", "module_paths", "probe_shape",
    "resolve_module", "run_with_edit", "validate_strengths", "wrap",
]
