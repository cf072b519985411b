"""Which built-in adapter explains a model given on the command line (first plugin with an answer wins)."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl


@hookimpl(trylast=True)
def latentexplainer_adapter_for(model: Any) -> str | None:
    from ..adapters.detect import adapter_for_directory
    from ..adapters.generator import is_code_spec

    if not isinstance(model, str):
        return None
    if is_code_spec(model):  # path/to/file.py:factory or package.module:factory
        return "generator"
    return adapter_for_directory(model) or "vae"  # a diffusers pipeline tells by model_index.json
