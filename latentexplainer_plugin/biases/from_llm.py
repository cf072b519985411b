"""Let a language model write the prompt template of an inductive bias (the paper's LLM step).

LatentExplainer (arXiv 2406.14862, Sec. 3.2) turns an inductive bias into a prompt by showing a
text-capable LLM the bias's formula, the symbol-to-word map and an in-context example of a
formula turned into a prompt. :func:`prompt_from_llm` does that with any backend (the same
``explain`` call the explanations use, with a text-only prompt and one sample) and checks the
answer before it is used:

* it must be non-empty and at most :data:`MAX_TEMPLATE_CHARS` characters;
* its ``{placeholders}`` must all be known (``{latent}``, ``{low}``, ``{high}``, ``{strengths}``,
  ``{other}``, ``{rows}``, ``{formula_in_words}`` and the bias's required context keys);
* it must keep the required ones: ``{latent}`` and every key in ``bias.requires`` (e.g.
  ``{property}`` for the conditional bias);
* it must render with :func:`~latentexplainer_plugin.biases.base.build_prompt`'s context.

When any check fails, or the backend gives no answer, a warning says why and the bias's own
deterministic template is kept. The result is a new :class:`InductiveBias` (same name, formula,
symbols and layout) whose ``extra`` records where the template came from.
"""

from __future__ import annotations

import dataclasses
import re
import string
import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BackendError, TemplateError  # noqa: F401 (TemplateError re-exported)
from ..types import Prompt, Traversal, usage_of
from .base import InductiveBias

if TYPE_CHECKING:
    from ..backends.base import Backend

__all__ = ["prompt_from_llm", "meta_prompt", "check_template", "TemplateError", "PromptFromLLMWarning",
           "MAX_TEMPLATE_CHARS", "KNOWN_PLACEHOLDERS"]

MAX_TEMPLATE_CHARS = 2000
#: Placeholders that build_prompt fills for every traversal.
KNOWN_PLACEHOLDERS = ("latent", "low", "high", "strengths", "other", "rows", "formula_in_words")
_ALWAYS_REQUIRED = ("latent",)

# "Here is the prompt template:", "Prompt template:", "Template -" before the template itself
_LEAD_IN = re.compile(r"^(?:here(?:\s+is|'s|’s)\s+(?:the|my|a|your)?\s*)?(?:new\s+)?(?:prompt(?:\s+template)?|template)\s*[:\-–—]\s*", re.I)

SYSTEM = "You write prompts for a multimodal model that explains images. Answer with the prompt only."


class PromptFromLLMWarning(UserWarning):
    """The LLM's template was rejected; the deterministic template is used instead."""


def _symbol_lines(bias: InductiveBias) -> str:
    return "\n".join(f"  {sym} -> {words}" for sym, words in bias.symbols.items())


def _default_example(bias: InductiveBias) -> InductiveBias:
    from .builtin import COMBINATION, DISENTANGLEMENT

    return COMBINATION if bias.name == DISENTANGLEMENT.name else DISENTANGLEMENT


def meta_prompt(bias: InductiveBias, example: InductiveBias | None = None) -> str:
    """The text that asks an LLM to turn ``bias`` into a prompt template, with ``example`` worked out."""
    example = example if example is not None else _default_example(bias)
    required = [*_ALWAYS_REQUIRED, *bias.requires]
    allowed = [*KNOWN_PLACEHOLDERS, *bias.requires]
    layout = (
        f"The image has {bias.rows} row(s) per starting picture"
        + (f" and shows {bias.prompt_bases} starting pictures" if bias.prompt_bases > 1 else "")
        + "; the traversal values are written above the columns."
    )
    return (
        "Write a prompt template that asks a multimodal model to explain, in one sentence, what a latent variable "
        "of a generative model changes in a grid of generated images. The prompt must follow from the model's "
        "inductive bias, given as a formula and a map from its symbols to words.\n\n"
        "Example.\n"
        f"Formula: {example.formula}\n"
        f"Symbols:\n{_symbol_lines(example)}\n"
        f"Meaning: {example.description or '(none given)'}\n"
        f"Prompt template: {example.template}\n\n"
        "Now the same for this inductive bias.\n"
        f"Formula: {bias.formula}\n"
        f"Symbols:\n{_symbol_lines(bias)}\n"
        f"Meaning: {bias.description or '(none given)'}\n"
        f"Layout: {layout}\n\n"
        "Rules: write a single paragraph; use placeholders in curly braces exactly as named; you may use "
        f"{', '.join('{' + p + '}' for p in allowed)} and no other placeholders; you must use "
        f"{', '.join('{' + p + '}' for p in required)}; {{formula_in_words}} is the formula with every symbol "
        "replaced by its words. Answer with the prompt template only."
    )


def _placeholders(template: str) -> list[str]:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:  # unbalanced braces
        raise TemplateError(f"the template is not a valid format string ({exc})") from None
    names = []
    for field in fields:
        if not field or not re.fullmatch(r"[A-Za-z_]\w*", field):
            raise TemplateError(f"the template has a placeholder {{{field}}} that is not a plain name")
        names.append(field)
    return names


def check_template(template: str | None, bias: InductiveBias) -> str:
    """Return ``template`` tidied, or raise :class:`TemplateError` saying why it cannot be used."""
    if template is None or not template.strip():
        raise TemplateError("the answer is empty")
    text = " ".join(template.split())
    allowed = set(KNOWN_PLACEHOLDERS) | set(bias.requires)
    # {{latent}} (a Jinja habit) means {latent}
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: "{" + m.group(1) + "}" if m.group(1) in allowed else m.group(0), text)
    text = _LEAD_IN.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    if not text:
        raise TemplateError("the answer holds no template")
    if len(text) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"the answer is {len(text)} characters long (at most {MAX_TEMPLATE_CHARS})")
    names = _placeholders(text)
    unknown = sorted(set(names) - allowed)
    if unknown:
        raise TemplateError(f"unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}")
    missing = [p for p in (*_ALWAYS_REQUIRED, *bias.requires) if p not in names]
    if missing:
        raise TemplateError(f"the required placeholder(s) {', '.join('{' + m + '}' for m in missing)} are missing")
    try:
        text.format_map({k: f"<{k}>" for k in allowed})
    except (KeyError, ValueError, IndexError) as exc:
        raise TemplateError(f"the template does not render: {exc}") from None
    return text


def _text_job(text: str) -> tuple[Traversal, Prompt]:
    """A text-only prompt; the traversal is a 2-step blank placeholder that backends ignore."""
    blank = Traversal(latent_id="prompt", images=torch.zeros(1, 1, 2, 3, 8, 8), strengths=torch.tensor([0.0, 1.0]), rule="set")
    return blank, Prompt(text=text, images=[], bias="prompt-from-llm", system=SYSTEM)


def _inner(backend: Backend) -> Backend:
    return getattr(backend, "backend", backend)  # a CachedBackend wraps the real one


def prompt_from_llm(bias: InductiveBias, backend: Backend, example: InductiveBias | None = None) -> InductiveBias:
    """A copy of ``bias`` whose template was written by ``backend`` from the formula, the
    symbol-to-word map and an in-context ``example`` (another bias; default: a built-in one).

    Falls back, with a :class:`PromptFromLLMWarning`, to ``bias.template`` when the answer fails
    :func:`check_template` or the backend returns no answer. Raises ``ValueError`` for a backend
    that cannot write text (the offline measurement explainer) and lets ``BackendError`` (bad
    key, unreachable server) through.
    """
    if not isinstance(bias, InductiveBias):
        raise TypeError(f"bias must be an InductiveBias, got {type(bias).__name__}")
    if "calls_model" not in getattr(_inner(backend), "capabilities", frozenset()):
        raise ValueError(f"the {_inner(backend).name} backend calls no language model (it does not declare the "
                         "calls_model capability), so it cannot write a prompt; use one that does (openai:MODEL, hf:PATH)")
    traversal, prompt = _text_job(meta_prompt(bias, example))
    source: dict[str, Any] = {"template_source": "llm", "template_backend": _inner(backend).name}
    try:
        answers = backend.explain(traversal, prompt, 1)
    except BackendError:
        raise
    except Exception as exc:  # a failed request is reported like a bad answer
        answers, error = [], f"{type(exc).__name__}: {exc}"
    else:
        error = next((r.error for r in answers if r.error), None) or "no answer"
    answer = next((r for r in answers if r.ok), None)
    spent = {"template_usage": usage_of(answers)}  # the request's tokens: counted in the run's total
    try:
        if answer is None:
            raise TemplateError(f"the backend gave no answer ({error})")
        template = check_template(answer.text, bias)
    except TemplateError as exc:
        warnings.warn(
            f"prompt from LLM for the {bias.name!r} bias rejected: {exc}; using the deterministic template",
            PromptFromLLMWarning,
            stacklevel=2,
        )
        return dataclasses.replace(bias, extra={**bias.extra, "template_source": "deterministic",
                                                "template_rejected": str(exc), **spent})
    return dataclasses.replace(bias, template=template, extra={**bias.extra, **source, **spent})
