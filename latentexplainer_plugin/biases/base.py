"""Inductive biases as data, and the deterministic symbol-to-word prompt builder."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..types import Prompt, Traversal

ABSTAIN_INSTRUCTION = "If nothing visible changes, answer exactly: no visible change."


@dataclass(frozen=True)
class InductiveBias:
    """A model's inductive bias: its formula, what each symbol means in words, the layout it needs.

    ``symbols`` maps formula symbols to words; words may use ``{latent}``, ``{other}`` and any key of
    the prompt context. ``template`` is the prompt text; it may use ``{formula_in_words}``,
    ``{strengths}``, ``{rows}`` and the same context keys.
    """

    name: str
    formula: str
    symbols: Mapping[str, str]
    template: str
    rows: int = 1  # rows per base latent in the image (2: the traversal with another latent clamped twice)
    prompt_bases: int = 1  # how many base latents the prompt image shows
    requires: tuple[str, ...] = ()  # context keys the prompt needs (e.g. "property")
    description: str = ""
    example: str = ""  # an in-context example answer
    extra: Mapping[str, Any] = field(default_factory=dict)

    def formula_in_words(self, context: Mapping[str, Any]) -> str:
        """Replace every symbol of the formula by its words (longest symbols first, whole tokens only)."""
        words = {sym: text.format_map(_Context(context)) for sym, text in self.symbols.items()}
        pattern = re.compile("|".join(rf"(?<![\w]){re.escape(s)}(?![\w])" for s in sorted(words, key=len, reverse=True)))
        return pattern.sub(lambda m: words[m.group(0)], self.formula) if words else self.formula


class _Context(dict):
    def __missing__(self, key: str) -> str:
        raise KeyError(f"the prompt needs {{{key}}}, which the context does not give")


def build_prompt(bias: InductiveBias, traversal: Traversal, context: Mapping[str, Any] | None = None,
                 max_side: int = 768) -> Prompt:
    """The prompt for one traversal under ``bias``: text plus one labelled grid image."""
    from ..report.strips import grid

    context = dict(context or {})
    missing = [k for k in bias.requires if not context.get(k)]
    if missing:
        raise ValueError(f"the {bias.name!r} bias needs {', '.join(missing)} (e.g. context={{'property': 'smiling'}} for conditional directions)")
    clamped = traversal.meta.get("clamped")
    context.setdefault("latent", traversal.latent_id)
    context.setdefault("other", f"z{clamped}" if clamped is not None else "the other latents")
    values = traversal.strengths.tolist()
    context.setdefault("strengths", ", ".join(f"{v:+g}" for v in values))
    context.setdefault("low", f"{values[0]:+g}")
    context.setdefault("high", f"{values[-1]:+g}")
    context.setdefault("rows", "; ".join(f"row {i + 1}: {label}" for i, label in enumerate(traversal.row_labels) if label) or "one row")
    context["formula_in_words"] = bias.formula_in_words(context)
    text = bias.template.format_map(_Context(context)).strip()
    bases = list(range(min(bias.prompt_bases, traversal.n_bases)))
    image = grid(traversal, bases=bases, max_side=max_side)
    return Prompt(text=f"{text} {ABSTAIN_INSTRUCTION}", images=[image], bias=bias.name)
