"""Captum-style entry points.

- :class:`LatentExplainer` (constructor takes the thing to explain, ``attribute(inputs, target=...)``)
  returns rich :class:`ExplanationResults`: words, certainty, traversal per latent.
- :class:`TraversalSensitivity` is a tensor-level ``captum.attr.Attribution`` (finite-difference
  image change per latent), so it composes with captum meta-methods such as ``NoiseTunnel``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from captum.attr import Attribution
from captum.log import log_usage

from .adapters.base import DEFAULT_STRENGTHS, Adapter, check_strengths
from .backends.base import Backend, FatalBackendError
from .biases.base import InductiveBias, build_prompt
from .components import get_adapter, get_backend, get_bias
from .evidence import MIN_STRIPS, NonFiniteImagesError, traversal_evidence
from .options import capabilities_of
from .results import ExplanationResults, LatentResult
from .uncertainty import get_similarity, select_explanation
from .uncertainty.selection import ONE_ANSWER_NOTE

Target = int | Sequence[int] | None


def most_active_other(kl: Sequence[float]) -> Callable[[int], int]:
    """Clamp rule for the disentanglement rows: the most active latent other than i."""
    order = list(np.argsort(-np.asarray(kl, dtype=float)))
    return lambda i: int(next(j for j in order if j != i))


class LatentExplainer:
    """Explain latents of a generator in words, with a certainty score.

    Args:
        generator: an :class:`Adapter`, or a model (``nn.Module`` or directory) for ``adapter``.
        backend: ``"offline"`` (default), ``"openai:MODEL"``, ``"hf:PATH"`` or a Backend instance.
        bias: inductive bias name or object (``disentanglement``, ``combination``, ``conditional``);
            default: the adapter's ``default_bias`` (vae: disentanglement, ddpm/sd: combination).
        samples: n, the number of answers per latent.
        similarity: ``"agree"`` (default: answers agree when they name the same attribute and
            direction), ``"embed"`` (sentence embeddings), ``"bow"`` (the paper's bag of words,
            exactly) or ``"bow-refined"``; see docs/concepts.md.
        threshold: certainty below which the result is "no clear explanation". None: the threshold
            calibrated for this backend and similarity (``latentexplainer calibrate``; see
            docs/evaluation.md), else the similarity's default. ``describe()`` says which
            (``threshold_source``).
        strengths: traversal values (the paper's {-3,-1.5,0,1.5,3} by default).
        clamp: for two-row biases, which latent j to clamp for latent i (mapping or callable).
        context: extra prompt words, e.g. ``{"property": "smiling"}`` for the conditional bias.
        chunk_size: latents traversed and explained per round (results arrive per round).

    SAE features whose adapter has example evidence (``SAEFeatureAdapter.attach_examples``) are also
    explained from their example sets (``Backend.explain_examples``); each result then carries that
    record in ``extras["examples"]`` beside the steering explanation (docs/sae.md).
    """

    def __init__(self, generator: Any, backend: str | Backend = "offline", bias: str | InductiveBias | None = None,
                 samples: int = 5, similarity: str = "agree", threshold: float | None = None,
                 strengths: Sequence[float] = DEFAULT_STRENGTHS, seed: int = 0, adapter: str | None = None,
                 clamp: Any = None, context: dict[str, Any] | None = None, chunk_size: int = 16,
                 backend_options: dict[str, Any] | None = None, adapter_options: dict[str, Any] | None = None):
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        if samples == 1:
            warnings.warn(f"samples=1: {ONE_ANSWER_NOTE}; every latent will be 'no clear explanation'", UserWarning,
                          stacklevel=2)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.strengths = check_strengths(strengths)
        self.similarity = get_similarity(similarity)
        self.bias = get_bias(bias) if bias is not None else None  # checked before the model loads
        self.backend = get_backend(backend, **(backend_options or {}))
        self.adapter: Adapter = get_adapter(generator, adapter, **(adapter_options or {}))
        if self.bias is None:
            self.bias = get_bias(self.adapter.default_bias)
        self.samples, self.threshold, self.seed = samples, threshold, seed
        from .uncertainty.thresholds import resolve_threshold  # light: json and paths only

        self.resolved_threshold, self.resolved_threshold_source = resolve_threshold(
            threshold, self.backend.name, self.similarity.name, self.similarity.default_threshold)
        self.clamp, self.context, self.chunk_size = clamp, dict(context or {}), chunk_size
        missing = [k for k in self.bias.requires if not self.context.get(k)]
        if missing:
            raise ValueError(f"the {self.bias.name!r} bias needs context {missing} (e.g. context={{'property': 'smiling'}})")

    def resolve_targets(self, target: Target) -> list[int]:
        """Latent indices for ``target`` (int, list, or None = all); out-of-range indices raise IndexError."""
        if target is None:
            return list(range(self.adapter.n_latents))
        targets = [target] if isinstance(target, int) else list(target)
        if not targets:
            raise ValueError("target is empty: give a latent index, a list of indices, or None for all")
        return [self.adapter.check_index(int(t) if isinstance(t, np.integer) else t) for t in targets]

    def _bases(self, inputs: torch.Tensor | None) -> torch.Tensor:
        needed = self.samples if self.backend.samples_from_bases else max(1, self.bias.prompt_bases)
        if inputs is None:  # enough bases for the image evidence to tell consistency from chance
            needed = max(needed, -(-MIN_STRIPS // max(1, self.bias.rows)))
            return self.adapter.sample_bases(needed, seed=self.seed)
        inputs = torch.as_tensor(inputs, dtype=torch.float32)
        if inputs.ndim == 1:
            inputs = inputs[None]
        if len(inputs) < needed:
            raise ValueError(
                f"got {len(inputs)} base latents, but the {self.backend.name!r} backend takes one answer per base "
                f"and samples={self.samples}: give at least {needed} inputs, or inputs=None to sample them"
            )
        return inputs

    def attribute(self, inputs: torch.Tensor | None = None, target: Target = None) -> ExplanationResults:
        """Explain each target latent; ``inputs`` are base latents (n, D), sampled from ``seed`` when None."""
        return ExplanationResults(list(self.iter_results(inputs, target)), info=self.describe())

    def iter_results(self, inputs: torch.Tensor | None = None, target: Target = None,
                     skip: Sequence[int] = ()) -> Iterator[LatentResult]:
        """:meth:`attribute`, one :class:`LatentResult` at a time as each latent finishes (so a caller
        can save it at once); latents in ``skip`` are not computed."""
        targets = self.resolve_targets(target)
        todo = [t for t in targets if t not in set(skip)]
        if "examples_only" in capabilities_of(self.adapter):  # no traversal: the example set is the evidence
            for index in todo:
                yield self._examples_only(index)
            return
        bases = self._bases(inputs)
        for start in range(0, len(todo), self.chunk_size):
            chunk = todo[start : start + self.chunk_size]
            t0 = time.perf_counter()
            traversals = self.adapter.traverse(chunk, bases, self.strengths, rows=self.bias.rows, clamp=self.clamp)
            t_traverse = (time.perf_counter() - t0) / len(chunk)
            jobs, prepared = [], []
            for index, traversal in zip(chunk, traversals):
                try:
                    prompt = build_prompt(self.bias, traversal, self.context)
                    jobs.append((traversal, prompt, self.samples))
                    prepared.append((index, traversal, None))
                except Exception as exc:
                    prepared.append((index, traversal, exc))
            t1 = time.perf_counter()
            answers = iter(self.backend.explain_many(jobs))
            t_explain = (time.perf_counter() - t1) / max(1, len(jobs))
            for index, traversal, prep_error in prepared:
                answer = prep_error if prep_error is not None else next(answers)
                result = self._select(index, traversal, answer)
                result.timing = {"traverse_s": t_traverse, "explain_s": t_explain} | result.timing
                if getattr(self.adapter, "has_examples", False):  # SAE features given a dataset: second evidence
                    self._add_examples(result)
                yield result

    def _examples_only(self, index: int) -> LatentResult:
        """A latent explained from its example set alone (adapters with capability ``examples_only``):
        the example answers are the result's answers; the ``examples`` record keeps the set's details."""
        result = LatentResult(self.adapter.latent_id(index), index, "ok")
        chosen = self._add_examples(result)
        record = result.extras.get("examples", {})
        if chosen is None:
            result.status, result.error = "failed", record.get("error", "no example answers")
            return result
        result.explanation = chosen.explanation if chosen.clear else None
        result.certainty, result.clear, result.responses = chosen.certainty, bool(chosen.clear), chosen.responses
        return result

    def _add_examples(self, result: LatentResult) -> Any:
        """Explain ``result``'s feature from its example set too (the adapter's ``example_set``):
        the record goes to ``result.extras["examples"]``, the set and its prompt image to
        ``result.example_evidence`` (``report.examples.ExamplesWriter`` saves the image). Returns the
        selected :class:`~latentexplainer_plugin.types.Explanation`, None when the examples failed."""
        from .biases.examples import build_example_prompt
        from .results import responses_json
        from .types import usage_of

        t0 = time.perf_counter()
        try:
            examples = self.adapter.example_set(result.index)
            prompt = build_example_prompt(examples)
            answers = self.backend.explain_examples(examples, prompt, self.samples)
        except FatalBackendError:
            raise
        except Exception as exc:  # reported for this feature's examples; the steering result stands
            result.extras["examples"] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            return None
        record: dict[str, Any] = {"status": "ok", "n_firing": examples.n_active, "n_not_firing": examples.n_inactive,
                                  "iou": examples.meta.get("iou"), "items": examples.meta.get("items"),
                                  "inactive_items": examples.meta.get("inactive_items")}
        chosen = None
        try:
            chosen = select_explanation(answers, self.similarity, self._threshold()[0])
        except ValueError as exc:  # every sample failed
            record |= {"status": "failed", "error": str(exc), "responses": responses_json(answers)}
        else:
            record |= {"explanation": chosen.explanation if chosen.clear else None, "certainty": chosen.certainty,
                       "clear": bool(chosen.clear), "note": chosen.note, "responses": responses_json(chosen.responses),
                       "usage": usage_of(chosen.responses)}
        result.extras["examples"] = record
        result.example_evidence = (examples, prompt.images[0])
        result.timing["examples_s"] = time.perf_counter() - t0
        return chosen

    def _select(self, index: int, traversal: Any, answer: Any) -> LatentResult:
        lid = self.adapter.latent_id(index)
        # image-side evidence first (also when the backend failed): a clear explanation needs a
        # visible change that agrees across bases, whatever the answers say
        try:
            evidence = traversal_evidence(traversal)
        except NonFiniteImagesError as exc:
            return LatentResult(lid, index, "failed", traversal=traversal, error=str(exc))
        if isinstance(answer, BaseException):
            return LatentResult(lid, index, "failed", traversal=traversal, error=f"{type(answer).__name__}: {answer}",
                                evidence=evidence)
        t0 = time.perf_counter()
        try:
            chosen = select_explanation(answer, self.similarity, self._threshold()[0])
        except ValueError as exc:  # every sample failed: report it, never score it
            return LatentResult(lid, index, "failed", responses=list(answer), traversal=traversal, error=str(exc),
                                evidence=evidence)
        clear = bool(chosen.clear and evidence.consistent)
        return LatentResult(lid, index, "ok", explanation=chosen.explanation if clear else None,
                            certainty=chosen.certainty, clear=clear, responses=chosen.responses, traversal=traversal,
                            timing={"select_s": time.perf_counter() - t0}, evidence=evidence)

    def _threshold(self) -> tuple[float, str]:
        """The threshold in use and where it came from: argument, calibration file or default."""
        if self.threshold is not None:
            return float(self.threshold), "argument"
        return self.resolved_threshold, self.resolved_threshold_source

    def describe(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.describe(),
            "backend": self.backend.describe(),
            "bias": self.bias.name,
            "samples": self.samples,
            "similarity": self.similarity.name,
            "threshold": self._threshold()[0],
            "threshold_source": self._threshold()[1],
            "strengths": self.strengths.tolist(),
            "seed": self.seed,
        }


class TraversalSensitivity(Attribution):
    """How much the generated image changes per unit move of each latent (central finite differences).

    ``forward_func`` maps latents (B, D) to images (B, ...). ``attribute(inputs)`` returns (B, D):
    the mean absolute image change per unit of latent ``d`` around each input. Tensor in, tensor
    out, so captum's ``NoiseTunnel`` can average it over noisy inputs.
    """

    def __init__(self, forward_func: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(forward_func)

    @log_usage()
    def attribute(self, inputs: torch.Tensor, target: Any = None, delta: float = 0.5,
                  additional_forward_args: Any = None) -> torch.Tensor:
        if not torch.is_tensor(inputs) or inputs.ndim != 2:
            raise ValueError(f"inputs must be latents of shape (B, D), got {getattr(inputs, 'shape', type(inputs))}")
        if not delta > 0:
            raise ValueError(f"delta must be > 0, got {delta}")
        b, d = inputs.shape
        eye = torch.eye(d, dtype=inputs.dtype, device=inputs.device) * delta
        plus = (inputs[:, None, :] + eye[None]).reshape(b * d, d)
        minus = (inputs[:, None, :] - eye[None]).reshape(b * d, d)
        args = () if additional_forward_args is None else (
            tuple(additional_forward_args) if isinstance(additional_forward_args, tuple) else (additional_forward_args,))
        # per-item extra arguments (base noises, ...) follow their item into the (B * D) batch
        args = tuple(a.repeat_interleave(d, dim=0) if torch.is_tensor(a) and a.ndim and a.shape[0] == b else a for a in args)
        with torch.no_grad():
            out_p = self.forward_func(plus, *args)
            out_m = self.forward_func(minus, *args)
        diff = (out_p - out_m).abs().reshape(b, d, -1).mean(-1) / (2 * delta)
        return diff

    def has_convergence_delta(self) -> bool:
        return False

    @property
    def multiplies_by_inputs(self) -> bool:
        return False
