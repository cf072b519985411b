"""latentexplainer_plugin: explain what the latent variables of generative models mean, in words, with certainty.

Public names are imported lazily so that ``latentexplainer --help`` and input errors answer in
well under a second (torch, nnsight and captum load only when needed).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LatentExplainer": "attribution",
    "TraversalSensitivity": "attribution",
    "RankThenExplain": "ranking",
    "RankedLatents": "ranking",
    "LatentScore": "ranking",
    "rank_latents": "ranking",
    "ExplanationResults": "results",
    "LatentResult": "results",
    "Site": "types",
    "Edit": "types",
    "Traversal": "types",
    "Prompt": "types",
    "Response": "types",
    "Explanation": "types",
    "Adapter": "adapters",
    "VAEAdapter": "adapters",
    "GeneratorAdapter": "adapters",
    "DDPMAdapter": "adapters",
    "StableDiffusionAdapter": "adapters",
    "Backend": "backends.base",
    "BackendError": "errors",
    "LatentExplainerError": "errors",
    "InductiveBias": "biases",
    "build_prompt": "biases",
    "Directions": "directions",
    "select_explanation": "uncertainty",
    "capture": "hooks",
    "run_with_edit": "hooks",
    "hookimpl": "hookspecs",
    "register_plugin": "plugins",
    "load_demo_model": "demo",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
