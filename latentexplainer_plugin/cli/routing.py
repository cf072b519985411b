"""Options from the command line to the components that declare them.

Friendly flags (``--steps``, ``--base-url``, ...) are aliases of declared options: each goes to
every selected component that declares it, and is an error when none does. ``-o KEY=VALUE``
goes to the one selected component that declares ``KEY`` (``-o adapter.KEY=VALUE`` or
``-o NAME.KEY=VALUE`` picks one when several do). Values are validated by each component's
``Options`` model before anything is loaded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from ..errors import OptionError, UsageError
from ..options import capabilities_of, options_of, validate_options

#: Friendly flag -> the declared option it sets.
FLAG_OPTIONS: dict[str, str] = {
    "--base-url": "base_url", "--api-key-env": "api_key_env", "--concurrency": "concurrency", "--timeout": "timeout",
    "--max-retries": "max_retries", "--dtype": "dtype", "--max-new-tokens": "max_new_tokens", "--cache-dir": "cache_dir",
    "--no-cache": "no_cache", "--allow-pickle": "allow_pickle", "--site": "site", "--latent-dim": "latent_dim",
    "--steps": "steps", "--t-edit": "t_edit", "--edit-scale": "edit_scale", "--prompt": "prompt",
    "--guidance-scale": "guidance_scale", "--n-directions": "n_directions", "--features": "features",
}
#: Run-wide settings handed to every component that declares them; never "unused".
CONTEXT_OPTIONS: dict[str, str] = {"--device": "device"}


@dataclass
class Selected:
    """One component chosen for this run, and the options routed to it."""

    kind: str  # adapter | backend | bias | direction finder
    name: str
    factory: Any
    raw: dict[str, Any] = field(default_factory=dict)
    given_as: dict[str, str] = field(default_factory=dict)  # option -> how the user wrote it
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"the {self.name} {self.kind}"

    @property
    def capabilities(self) -> frozenset[str]:
        return capabilities_of(self.factory)

    def declares(self, option: str) -> bool:
        return option in options_of(self.factory).model_fields

    def option_names(self) -> list[str]:
        return sorted(options_of(self.factory).model_fields)


def _listing(components: list[Selected]) -> str:
    parts = [f"{c.label}: {', '.join(c.option_names()) or 'none'}" for c in components]
    return "; ".join(parts)


def _join(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


def flags_given(args: argparse.Namespace) -> dict[str, Any]:
    """The friendly flags the user set (store_true flags count when True)."""
    from .common import _parse_ints

    given = {}
    for flag in FLAG_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None and value is not False:
            given[flag] = _parse_ints(value, flag[2:]) if flag == "--features" else value
    return given


def route(components: list[Selected], flags: dict[str, Any], pairs: list[str], context: dict[str, Any]) -> None:
    """Fill each component's ``raw`` options from flags, ``-o`` pairs and run-wide context; raise
    UsageError for an option no selected component takes or one that several take (-o)."""
    for flag, value in flags.items():
        option = FLAG_OPTIONS[flag]
        takers = [c for c in components if c.declares(option)]
        exclusive = [c for c in takers if option in getattr(c.factory, "exclusive_options", ())]
        takers = exclusive or takers  # e.g. --site with --sae: where the SAE reads, not the model's latent
        if not takers:
            raise UsageError(f"{flag}: not used by {_join([c.label for c in components])} "
                             f"(their options: {_listing(components)})")
        for c in takers:
            c.raw[option], c.given_as[option] = value, flag
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"-o {pair!r}: expected KEY=VALUE, e.g. -o steps=20 (options: {_listing(components)})")
        scope, dot, option = key.rpartition(".")
        candidates = components if not dot else [c for c in components if scope in (c.name, c.kind, c.kind.split()[-1])]
        if dot and not candidates:
            raise UsageError(f"-o {key}: {scope!r} is not a selected component "
                             f"({', '.join(f'{c.kind} {c.name}' for c in components)})")
        takers = [c for c in candidates if c.declares(option)]
        if not takers:
            raise UsageError(f"-o {key}: no selected component has an option {option!r} (options: {_listing(candidates)})")
        if len(takers) > 1:
            raise UsageError(f"-o {key}: {option!r} is an option of {_join([c.label for c in takers])}; say which, e.g. "
                             f"-o {takers[0].kind.split()[-1]}.{option}={value}")
        takers[0].raw[option], takers[0].given_as[option] = value, f"-o {key}"
    for flag, option in CONTEXT_OPTIONS.items():
        if option in context:
            for c in components:
                if c.declares(option) and option not in c.raw:
                    c.raw[option] = context[option]
                    c.given_as[option] = flag


def select_component(kind: str, registry_kind: str, name: str) -> Selected:
    """The registered component ``name`` of ``registry_kind`` as a :class:`Selected`; an unknown name is a
    UsageError listing the registered ones."""
    from ..errors import UnknownComponentError
    from ..plugins import registry

    try:
        return Selected(kind, name, registry(registry_kind).get(name).factory)
    except UnknownComponentError as exc:
        raise UsageError(str(exc)) from None


def name_of(component: Selected):
    """How to name an option of ``component`` in a message: as the user gave it, else its flag."""
    flags = {option: flag for flag, option in FLAG_OPTIONS.items()}

    def render(option: str, sentence: bool) -> str:
        name = component.given_as.get(option) or flags.get(option) or (f"--{option.replace('_', '-')}"
                                                                        if option in ("backend", "direction") else f"-o {option}")
        return f"{name} " if sentence else name

    return render


def validate(components: list[Selected]) -> None:
    """Check every component's options against its declaration (UsageError in flag words)."""
    for c in components:
        try:
            c.options = validate_options(c.factory, c.raw, c.label)
        except OptionError as exc:
            raise UsageError(render(exc, c)) from None


def render(exc: OptionError, component: Selected) -> str:
    return exc.render(name_of(component), with_owner=False)
