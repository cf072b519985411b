"""The plugin manager and the registries it fills (adapters, backends, biases, direction finders,
edit rules, SAE formats).

Environment variables:
- ``LATENTEXPLAINER_NO_PLUGINS=1``: do not load external (entry-point) plugins.
- ``LATENTEXPLAINER_PLUGINS=a,b``: load only these entry points (by entry-point name).
- ``LATENTEXPLAINER_TRACE_PLUGINS=1``: print every hook call to stderr.

A plugin that fails to import, a register hook that raises, and a registration with an invalid
name (:data:`NAME_PATTERN`) or a factory that is not callable are skipped with a
:class:`PluginWarning` naming the plugin, its distribution and what failed (:func:`failures`
lists them); everything else keeps working.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from . import hookspecs
from .hookspecs import PROJECT
from .errors import UnknownComponentError  # noqa: F401 (re-exported)

DEFAULT_PLUGINS = (
    "latentexplainer_plugin.default_plugins.adapters",
    "latentexplainer_plugin.default_plugins.backends",
    "latentexplainer_plugin.default_plugins.biases",
    "latentexplainer_plugin.default_plugins.directions",
    "latentexplainer_plugin.default_plugins.sites",
    "latentexplainer_plugin.default_plugins.detection",
    "latentexplainer_plugin.default_plugins.edits",
    "latentexplainer_plugin.default_plugins.sae_formats",
)
BUILTIN_DISTRIBUTION = "latentexplainer-plugin"
KINDS = ("adapters", "backends", "biases", "direction_finders", "edit_rules", "sae_formats")


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


class PluginWarning(UserWarning):
    """A plugin (or one of its registrations) was skipped; the message says which and why."""


#: What a registered name may be: ASCII letters, digits, ``_``, ``-`` and ``.``, starting with a
#: letter or digit, at most 64 characters (it is typed on the command line, and ``:`` separates a
#: backend's name from its argument).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-64 characters from A-Z a-z 0-9 _ - ., starting with a letter or digit"

#: Problems met while loading plugins in this process: (plugin, distribution, what failed).
_failures: list[tuple[str, str, str]] = []


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _report(plugin: str, distribution: str, what: str) -> None:
    """Record a skipped plugin or registration and warn (the CLI prints it on stderr)."""
    _failures.append((plugin, distribution, what))
    hint = "" if distribution == BUILTIN_DISTRIBUTION else (
        "; set LATENTEXPLAINER_NO_PLUGINS=1 to skip external plugins, or LATENTEXPLAINER_PLUGINS=NAME,... "
        "to load only the ones you name")
    warnings.warn(f"plugin {plugin!r} ({distribution}) {what}; skipped{hint}", PluginWarning, stacklevel=3)


def failures() -> list[tuple[str, str, str]]:
    """Plugins and registrations skipped so far: ``(plugin, distribution, what failed)``."""
    return list(_failures)


def check_name(name: Any) -> str | None:
    """None if ``name`` is a valid component name, else why not."""
    if not isinstance(name, str):
        return f"a name must be a string, got {type(name).__name__} {name!r}"
    if not NAME_PATTERN.fullmatch(name):
        return f"invalid name {name!r} (allowed: {NAME_RULE})"
    return None


_pm: pluggy.PluginManager | None = None
_registries: dict[str, Registry] | None = None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _dist_name(ep: Any, version: bool = False) -> str:
    """The distribution that provides entry point ``ep`` (with its version: for messages)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ep.value
    number = dist.metadata["Version"] if version else None
    return f"{dist.metadata['Name']} {number}" if number else dist.metadata["Name"]


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allow = {s.strip() for s in os.environ.get("LATENTEXPLAINER_PLUGINS", "").split(",") if s.strip()}
    for ep in metadata.entry_points(group=PROJECT):
        if allow and ep.name not in allow:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except (Exception, SystemExit) as exc:  # a broken plugin must not take every command down with it
            _report(ep.name, _dist_name(ep, version=True), f"failed to load ({ep.value}): {_describe(exc)}")
            continue
        pm._le_dists[ep.name] = _dist_name(ep)  # type: ignore[attr-defined]


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
    _failures.clear()
    reset_registries()


def _check_factory(kind: str, name: str, factory: Any) -> str | None:
    """None if ``factory`` fits registry ``kind``, else why not (an SAE format has ``detect`` and ``load``)."""
    if kind == "sae_formats":
        missing = [m for m in ("detect", "load") if not callable(getattr(factory, m, None))]
        return (f"SAE format {name!r} has no callable {' or '.join(missing)} (got {type(factory).__name__})"
                if missing else None)
    return None if callable(factory) else f"factory for {name!r} is not callable (got {type(factory).__name__})"


def _collect(pm: pluggy.PluginManager, kind: str) -> Registry:
    registry = Registry(kind)
    caller = getattr(pm.hook, f"latentexplainer_register_{kind}")
    # pluggy *calls* the most recently registered plugin first; get_hookimpls() lists them in
    # registration order, so built-ins claim their names first and clashes resolve the same way every run.
    for impl in caller.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        dist = pm._le_dists.get(plugin_name, "?")  # type: ignore[attr-defined]
        pending: list[Entry] = []  # kept only if the whole hook call succeeds

        def register(name: str, factory: Callable[..., Any], _p=plugin_name, _d=dist, _pending=pending) -> None:
            problem = check_name(name) or _check_factory(kind, name, factory)
            if problem is not None:
                _report(_p, _d, f"registered an invalid {kind} entry: {problem}")
                return
            _pending.append(Entry(name, factory, _p, _d))

        try:
            impl.function(register=register)
        except (Exception, SystemExit) as exc:
            _report(plugin_name, dist, f"failed in latentexplainer_register_{kind}: {_describe(exc)}")
            continue
        for entry in pending:
            if entry.name in registry.entries:
                kept = registry.entries[entry.name]
                registry.conflicts.append((kept, entry))
                warnings.warn(
                    f"{kind}: {entry.name!r} from {entry.plugin} ({entry.distribution}) ignored; the name is taken by "
                    f"{kept.plugin} ({kept.distribution})",
                    stacklevel=2,
                )
                continue
            registry.entries[entry.name] = entry
    return registry


def registry(kind: str) -> Registry:
    """The registry of one kind: ``adapters``, ``backends``, ``biases``, ``direction_finders``, ``edit_rules`` or ``sae_formats``."""
    global _registries
    if kind not in KINDS:
        raise ValueError(f"unknown registry {kind!r}; kinds: {', '.join(KINDS)}")
    if _registries is None:
        pm = get_plugin_manager()
        _registries = {k: _collect(pm, k) for k in KINDS}
    return _registries[kind]


def hook() -> Any:
    return get_plugin_manager().hook
