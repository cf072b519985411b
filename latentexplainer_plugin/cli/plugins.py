"""``latentexplainer plugins``: what is registered, by whom, what it can do and which options it takes."""

from __future__ import annotations

import argparse

from ..errors import UsageError


def _flag_selected() -> dict[str, tuple[str, type]]:
    """Components a flag selects rather than a registry name: name -> (how it is selected, class)."""
    from ..sae import SAEFeatureAdapter

    return {"sae": ("feature source, selected by --sae PATH", SAEFeatureAdapter)}


def _print_options(factory: type) -> None:
    from ..options import describe_options

    rows = describe_options(factory)
    if not rows:
        print("  takes no options")
    for row in rows:
        default = "required" if row["required"] else f"default {row['default']!r}"
        print(f"  -o {row['name']}=<{row['type']}>  {row['help']} ({default})")


def _show_options(name: str) -> int:
    from ..options import capabilities_of
    from ..plugins import KINDS, registry

    found = [(kind, registry(kind).entries[name]) for kind in KINDS if name in registry(kind).entries]
    flagged = _flag_selected().get(name)
    if not found and flagged is None:
        every = sorted({n for kind in KINDS for n in registry(kind).names()} | set(_flag_selected()))
        raise UsageError(f"--options {name}: no component of that name; registered: {', '.join(every)}")
    for kind, entry in found:
        caps = ", ".join(sorted(capabilities_of(entry.factory))) or "none declared"
        print(f"{kind[:-1].replace('_', ' ') if kind != 'biases' else 'bias'} {name} ({entry.distribution}); capabilities: {caps}")
        _print_options(entry.factory)
    if flagged is not None:
        how, factory = flagged
        caps = ", ".join(sorted(capabilities_of(factory))) or "none declared"
        print(f"{how}: {name}; capabilities: {caps}")
        _print_options(factory)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from ..plugins import KINDS, registry

    if getattr(args, "options", None):
        return _show_options(args.options)
    for kind in KINDS:
        reg = registry(kind)
        print(f"{kind}:")
        for name in reg.names():
            e = reg.entries[name]
            print(f"  {name:<16} {e.distribution} ({e.plugin})")
        for kept, dropped in reg.conflicts:
            print(f"  ! {dropped.name} from {dropped.distribution} ignored: name taken by {kept.distribution}")
    print("selected by a flag:")
    for name, (how, factory) in _flag_selected().items():
        print(f"  {name:<16} {how} ({factory.__module__.rsplit('.', 1)[0]}.{factory.__name__})")
    return 0
