"""``latentexplainer plugins``: what is registered, by whom, what it can do and which options it takes."""

from __future__ import annotations

import argparse

from ..errors import UsageError


def _show_options(name: str) -> int:
    from ..options import capabilities_of, describe_options
    from ..plugins import KINDS, registry

    found = [(kind, registry(kind).entries[name]) for kind in KINDS if name in registry(kind).entries]
    if not found:
        every = sorted({n for kind in KINDS for n in registry(kind).names()})
        raise UsageError(f"--options {name}: no component of that name; registered: {', '.join(every)}")
    for kind, entry in found:
        caps = ", ".join(sorted(capabilities_of(entry.factory))) or "none declared"
        print(f"{kind[:-1].replace('_', ' ') if kind != 'biases' else 'bias'} {name} ({entry.distribution}); capabilities: {caps}")
        rows = describe_options(entry.factory)
        if not rows:
            print("  takes no options")
        for row in rows:
            default = "required" if row["required"] else f"default {row['default']!r}"
            print(f"  -o {row['name']}=<{row['type']}>  {row['help']} ({default})")
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
    return 0
