"""The plugin manager and the registries it fills (adapters, backends, biases, direction finders).

Environment variables:
- ``LATENTEXPLAINER_NO_PLUGINS=1``: do not load external (entry-point) plugins.
- ``LATENTEXPLAINER_PLUGINS=a,b``: load only these entry points (by entry-point name).
- ``LATENTEXPLAINER_TRACE_PLUGINS=1``: print every hook call to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from . import hookspecs
from .hookspecs import PROJECT

DEFAULT_PLUGINS = (
    "latentexplainer_plugin.default_plugins.adapters",
    "latentexplainer_plugin.default_plugins.backends",
    "latentexplainer_plugin.default_plugins.biases",
    "latentexplainer_plugin.default_plugins.directions",
    "latentexplainer_plugin.default_plugins.sites",
    "latentexplainer_plugin.default_plugins.edits",
)
BUILTIN_DISTRIBUTION = "latentexplainer-plugin"
KINDS = ("adapters", "backends", "biases", "direction_finders")


@dataclass(frozen=True)
class Entry:
    """One registered component: its name, factory and who provided it."""

    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str


@dataclass
class Registry:
    kind: str
    entries: dict[str, Entry] = field(default_factory=dict)
    conflicts: list[tuple[Entry, Entry]] = field(default_factory=list)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def get(self, name: str) -> Entry:
        try:
            return self.entries[name]
        except KeyError:
            singular = {"biases": "bias"}.get(self.kind, self.kind[:-1].replace("_", " "))
            raise UnknownComponentError(
                f"unknown {singular} {name!r}; registered: {', '.join(self.names()) or '(none)'}"
            ) from None


class UnknownComponentError(ValueError):
    """A name that no plugin registered; the message lists the registered names."""


_pm: pluggy.PluginManager | None = None
_registries: dict[str, Registry] | None = None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allow = {s.strip() for s in os.environ.get("LATENTEXPLAINER_PLUGINS", "").split(",") if s.strip()}
    for ep in metadata.entry_points(group=PROJECT):
        if allow and ep.name not in allow:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        plugin = ep.load()
        pm.register(plugin, name=ep.name)
        dist = getattr(ep, "dist", None)
        pm._le_dists[ep.name] = dist.metadata["Name"] if dist is not None else ep.value  # type: ignore[attr-defined]


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager: built-ins first, then entry points unless disabled."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        pm._le_dists = {}  # type: ignore[attr-defined]
        for module_name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(module_name), name=module_name)
            pm._le_dists[module_name] = BUILTIN_DISTRIBUTION  # type: ignore[attr-defined]
        if not _truthy("LATENTEXPLAINER_NO_PLUGINS"):
            _load_entry_points(pm)
        if _truthy("LATENTEXPLAINER_TRACE_PLUGINS"):
            pm.trace.root.setwriter(lambda msg: sys.stderr.write(str(msg)))
            pm.enable_tracing()
        _pm = pm
    return _pm


def register_plugin(plugin: Any, name: str | None = None, distribution: str = "(registered at run time)") -> None:
    """Register a plugin object (module or class instance) in this process, e.g. from a notebook."""
    pm = get_plugin_manager()
    name = pm.register(plugin, name=name)
    pm._le_dists[name] = distribution  # type: ignore[attr-defined]
    reset_registries()


def unregister_plugin(name: str) -> None:
    get_plugin_manager().unregister(name=name)
    reset_registries()


def reset_registries() -> None:
    global _registries
    _registries = None


def reset() -> None:
    """Forget the plugin manager (tests use this after changing environment variables)."""
    global _pm
    _pm = None
    reset_registries()


def _collect(pm: pluggy.PluginManager, kind: str) -> Registry:
    registry = Registry(kind)
    caller = getattr(pm.hook, f"latentexplainer_register_{kind}")
    # pluggy *calls* the most recently registered plugin first; get_hookimpls() lists them in
    # registration order, so built-ins claim their names first and clashes resolve the same way every run.
    for impl in caller.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        dist = pm._le_dists.get(plugin_name, "?")  # type: ignore[attr-defined]

        def register(name: str, factory: Callable[..., Any], _p=plugin_name, _d=dist) -> None:
            if not isinstance(name, str) or not name or ":" in name:
                raise ValueError(f"plugin {_p} registered an invalid {kind} name {name!r} (non-empty, no ':')")
            entry = Entry(name, factory, _p, _d)
            if name in registry.entries:
                registry.conflicts.append((registry.entries[name], entry))
                warnings.warn(
                    f"{kind}: {name!r} from {_p} ({_d}) ignored; the name is taken by "
                    f"{registry.entries[name].plugin} ({registry.entries[name].distribution})",
                    stacklevel=2,
                )
                return
            registry.entries[name] = entry

        impl.function(register=register)
    return registry


def registry(kind: str) -> Registry:
    """The registry of one kind: ``adapters``, ``backends``, ``biases`` or ``direction_finders``."""
    global _registries
    if kind not in KINDS:
        raise ValueError(f"unknown registry {kind!r}; kinds: {', '.join(KINDS)}")
    if _registries is None:
        pm = get_plugin_manager()
        _registries = {k: _collect(pm, k) for k in KINDS}
    return _registries[kind]


def hook() -> Any:
    return get_plugin_manager().hook
