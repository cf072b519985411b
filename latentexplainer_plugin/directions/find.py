"""Resolve ``--direction`` (a finder name or a file), run the finder, set the directions on the adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UnknownComponentError
from .base import Directions


def resolve_direction_spec(spec: str) -> tuple[str, Any, dict[str, Any]]:
    """``(name, finder, implied options)``: an existing ``.safetensors`` file is the ``given`` finder
    with ``file=spec``; anything else is a registered finder name (unknown names raise
    ValueError listing the registered finders)."""
    from ..plugins import registry

    reg = registry("direction_finders")
    if Path(spec).is_file():
        return "given", reg.get("given").factory, {"file": str(spec)}
    try:
        return spec, reg.get(spec).factory, {}
    except UnknownComponentError as exc:
        raise ValueError(f"{exc} (or give the path of a directions .safetensors file)") from None


def find_directions(adapter: Any, spec: str, n_directions: int | None = None, seed: int = 0,
                    data: dict[str, Any] | None = None, **options: Any) -> Directions:
    """Directions for ``adapter`` from a finder name or a file, set on the adapter and returned.

    Every finder is called the same way: ``finder(adapter, seed=S, data=D, **options)``;
    ``n_directions`` is one of those options, named here for convenience.
    """
    if n_directions is not None:
        options["n_directions"] = n_directions
    name, finder, implied = resolve_direction_spec(spec)
    found = finder(adapter, seed=seed, data=data, **(implied | options))
    if not isinstance(found, Directions):
        raise TypeError(f"direction finder {name!r} returned {type(found).__name__}, not Directions")
    adapter.set_directions(found)
    return found
