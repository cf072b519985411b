"""Latent sites in any torch model: find, probe, capture and edit them (through nnsight)."""

from .intervene import apply_edit, capture, edit_items, repeat_edit, run_with_edit, wrap
from .sites import (EditError, SiteError, block_update, check_finite, module_paths, probe_shape, register_site_hooks,
                    resolve_module, update_output_index, validate_strengths)

__all__ = [
    "EditError", "SiteError", "apply_edit", "block_update", "capture", "check_finite", "edit_items", "module_paths", "probe_shape",
    "register_site_hooks", "repeat_edit", "resolve_module", "run_with_edit", "update_output_index", "validate_strengths", "wrap",
]
