"""``latentexplainer plugins``: what is registered, by whom, with which options."""

from __future__ import annotations

import argparse


def cmd_plugins(args: argparse.Namespace) -> int:
    from ..plugins import KINDS, registry

    for kind in KINDS:
        reg = registry(kind)
        print(f"{kind}:")
        for name in reg.names():
            e = reg.entries[name]
            print(f"  {name:<16} {e.distribution} ({e.plugin})")
        for kept, dropped in reg.conflicts:
            print(f"  ! {dropped.name} from {dropped.distribution} ignored: name taken by {kept.distribution}")
    return 0
