"""Turn names from the command line or the API into registered components (adapters, backends, biases)."""

from __future__ import annotations

from typing import Any

from .adapters.base import Adapter
from .backends.base import Backend
from .biases.base import InductiveBias
from .plugins import BUILTIN_DISTRIBUTION, Entry, registry
from .errors import PluginError  # noqa: F401 (re-exported)


def _build(kind: str, entry: Entry, *args: Any, **options: Any) -> Any:
    """``entry.factory(*args, **options)``; an unexpected exception from a third-party plugin's
    factory becomes a :class:`PluginError` naming it (ValueError/TypeError, i.e. bad options, and
    errors of the built-ins pass through unchanged)."""
    try:
        return entry.factory(*args, **options)
    except (ValueError, TypeError):
        raise
    except Exception as exc:
        if entry.distribution == BUILTIN_DISTRIBUTION:
            raise
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise PluginError(
            f"{kind} {entry.name!r} from plugin {entry.plugin} ({entry.distribution}) failed: "
            f"{type(exc).__name__}{': ' + detail if detail else ''}; it is the plugin's error: update or uninstall "
            f"{entry.distribution}, or choose another {kind}"
        ) from exc


def parse_backend_spec(spec: str) -> tuple[str, str | None]:
    """``"openai:gpt-4o"`` -> ("openai", "gpt-4o"); ``"offline"`` -> ("offline", None)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"backend must be a name such as 'offline', 'openai:MODEL' or 'hf:PATH', got {spec!r}")
    name, sep, arg = spec.partition(":")
    return name, (arg if sep else None)


def get_backend(spec: str | Backend, **options: Any) -> Backend:
    if isinstance(spec, Backend):
        return spec
    name, arg = parse_backend_spec(spec)
    backend = _build("backend", registry("backends").get(name), arg, **options)
    if not isinstance(backend, Backend):
        raise TypeError(f"backend factory {name!r} returned {type(backend).__name__}, not a Backend")
    return backend


def get_bias(spec: str | InductiveBias) -> InductiveBias:
    if isinstance(spec, InductiveBias):
        return spec
    bias = _build("bias", registry("biases").get(spec))
    if not isinstance(bias, InductiveBias):
        raise TypeError(f"bias factory {spec!r} returned {type(bias).__name__}, not an InductiveBias")
    return bias


def get_adapter(generator: Any, name: str | None = None, **options: Any) -> Adapter:
    if isinstance(generator, Adapter):
        return generator
    adapter = _build("adapter", registry("adapters").get(name or "vae"), generator, **options)
    if not isinstance(adapter, Adapter):
        raise TypeError(f"adapter factory {name!r} returned {type(adapter).__name__}, not an Adapter")
    return adapter


def get_direction_finder(name: str) -> Any:
    return registry("direction_finders").get(name).factory
