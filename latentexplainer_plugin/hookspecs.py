"""The whole extension surface. Built-ins (``default_plugins``) implement these hooks exactly as third parties do."""

from __future__ import annotations

from typing import Any, Callable

from pluggy import HookimplMarker, HookspecMarker

PROJECT = "latentexplainer"
hookspec = HookspecMarker(PROJECT)
hookimpl = HookimplMarker(PROJECT)

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def latentexplainer_register_adapters(register: Register) -> None:
    """Register adapters: ``register(name, factory)``; ``factory(model, **options)`` returns an adapter."""


@hookspec
def latentexplainer_register_backends(register: Register) -> None:
    """Register explainer backends: ``register(name, factory)``; ``factory(arg, **options)`` returns a Backend."""


@hookspec
def latentexplainer_register_biases(register: Register) -> None:
    """Register inductive biases: ``register(name, factory)``; ``factory()`` returns an InductiveBias."""


@hookspec
def latentexplainer_register_direction_finders(register: Register) -> None:
    """Register direction finders: ``register(name, finder)``; ``finder(adapter, *, seed, data, **options)`` returns Directions."""


@hookspec
def latentexplainer_register_edit_rules(register: Register) -> None:
    """Register edit rules: ``register(name, rule)``; ``rule(activation, edit)`` returns the edited activation (same shape)."""


@hookspec
def latentexplainer_register_sae_formats(register: Register) -> None:
    """Register SAE file formats: ``register(name, fmt)``; ``fmt.detect(folder)`` -> bool, ``fmt.load(folder, **kwargs)`` -> SparseAutoencoder."""


@hookspec(firstresult=True)
def latentexplainer_adapter_for(model: Any) -> str | None:
    """Return the name of the adapter for ``model`` (a path, hub id or ``file.py:factory``) if this plugin recognises it, else None."""


@hookspec(firstresult=True)
def latentexplainer_default_site(model: Any) -> Any:
    """Return the default latent Site for ``model`` if this plugin knows its architecture, else None."""


@hookspec
def latentexplainer_latent_captured(site: Any, call: int, activation: Any) -> None:
    """Observe every captured latent (``activation`` is a detached tensor; ``call`` counts site calls)."""
