"""Rank, then explain: attribute a score of the generated image to the latents, explain the top-k.

1. A score function maps generated images (B, C, H, W) in [0, 1] to one number per image (B,):
   mean intensity, a classifier's logit, a distance to a reference, ...
2. :class:`LatentScore` is the composition latents -> generator -> images -> score as a plain
   torch forward function, so any ``captum.attr`` method can attribute the score to the latents:
   for a VAE the latent is the decoder input z (or the activation at the adapter's site, replaced
   through nnsight), for a diffusion model the strengths alpha_k of the h-space directions
   (h <- h + sum_k alpha_k s_k v_k on every edited step, through nnsight, as the ddpm adapter does).
3. :func:`rank_latents` runs a method given by name (``"IntegratedGradients"``,
   ``"NoiseTunnel(IntegratedGradients)"``), class, instance or factory, and ranks the latents by
   the mean absolute attribution over the base inputs; the convergence delta is kept where the
   method has one.
4. :class:`RankThenExplain` wraps a :class:`~latentexplainer_plugin.LatentExplainer` the way
   captum's ``LLMAttribution`` wraps a method: ``attribute(inputs, top_k=3)`` ranks, explains the
   top-k in words and returns :class:`~latentexplainer_plugin.ExplanationResults` whose latents
   carry ``attribution``, ``rank`` and ``delta`` next to the explanation, certainty and traversal.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .adapters.base import Adapter
from .options import capabilities_of
from .results import ExplanationResults

ScoreFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = [
    "SCORES", "LatentScore", "RankedLatents", "RankThenExplain", "attribution_methods", "make_method",
    "method_name", "rank_by_frequency", "rank_latents", "resolve_score",
]


# -- score functions -----------------------------------------------------------------------------

def mean_intensity(images: torch.Tensor) -> torch.Tensor:
    """Mean pixel value of each image: (B, C, H, W) -> (B,)."""
    return images.flatten(1).mean(1)


def _channel(c: int) -> ScoreFn:
    def score(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] <= c:
            raise ValueError(f"score needs channel {c}, but the images have {images.shape[1]} channel(s)")
        return images[:, c].flatten(1).mean(1)
    return score


def contrast(images: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the pixels of each image (B,)."""
    return images.flatten(1).std(1)


SCORES: dict[str, ScoreFn] = {"mean": mean_intensity, "red": _channel(0), "green": _channel(1), "blue": _channel(2),
                              "contrast": contrast}


def resolve_score(score: str | ScoreFn | None) -> tuple[ScoreFn, str]:
    """A score function and its name from a callable, a built-in name (``mean``) or ``"module:function"``."""
    if score is None:
        return mean_intensity, "mean"
    if callable(score):
        builtin = next((name for name, fn in SCORES.items() if fn is score), None)
        return score, builtin or getattr(score, "__qualname__", None) or type(score).__name__
    if not isinstance(score, str) or not score.strip():
        raise ValueError(f"score must be a callable, a built-in name ({', '.join(SCORES)}) or 'module:function', got {score!r}")
    if score in SCORES:
        return SCORES[score], score
    module_name, sep, attr = score.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"unknown score {score!r}: use a built-in score ({', '.join(SCORES)}) or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"score {score!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ValueError(f"score {score!r}: {module_name} has no callable {attr!r}")
    return fn, score


# -- the forward function captum attributes ------------------------------------------------------

class LatentScore(nn.Module):
    """``forward(latents, *extra) -> score_fn(images)``: the score of generated images as a function of the latents.

    Use it as the ``forward_func`` of any captum method::

        f = LatentScore(adapter, "mean")
        inputs, extra, baselines = f.prepare(bases)
        attr = IntegratedGradients(f).attribute(inputs, baselines=baselines, additional_forward_args=extra)

    What "latents" are depends on the adapter:

    * VAE: the activation at the adapter's site, flattened to (B, D). With the default site
      ``decoder.input`` that is z itself and the decoder runs directly; at any other site the
      activation is replaced through nnsight (the base latents travel as ``additional_forward_args``,
      which captum expands along with the inputs).
    * Diffusion (``ddpm``): the strengths alpha (B, K) of the adapter's K h-space directions; the
      base noises travel as ``additional_forward_args``. Gradients flow through every sampling step.

    Adapters say what their latents are by implementing ``latent_coordinates(bases, alpha) ->
    (inputs, extra, baselines)`` and a differentiable ``images_at(inputs, *extra) -> images``;
    any adapter that does can be ranked.
    """

    def __init__(self, adapter: Adapter, score: str | ScoreFn | None = "mean", alpha: float = 1.0):
        super().__init__()
        self.score_fn, self.score_name = resolve_score(score)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.alpha = float(alpha)
        self._adapter = (adapter,)  # a tuple keeps the adapter out of the module tree
        self.image_output = nn.Identity()  # the generated image as a "layer" (for captum layer methods)
        if not (callable(getattr(adapter, "latent_coordinates", None)) and callable(getattr(adapter, "images_at", None))):
            raise TypeError(
                f"cannot attribute to the latents of a {type(adapter).__name__}: the adapter must implement "
                f"latent_coordinates(bases, alpha) and a differentiable images_at(inputs, *extra) "
                f"(VAEAdapter and DDPMAdapter are reference implementations)"
            )

    @property
    def adapter(self) -> Adapter:
        return self._adapter[0]

    @property
    def n_latents(self) -> int:
        return self.adapter.n_latents

    # 1. the point to attribute at, what travels with it, and the reference point
    def prepare(self, bases: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, ...] | None, torch.Tensor]:
        """``(inputs, additional_forward_args, baselines)`` for base latents / noises ``bases``."""
        return self.adapter.latent_coordinates(bases, alpha=self.alpha)

    # 2. latents -> images, differentiable
    def images(self, inputs: torch.Tensor, *extra: Any) -> torch.Tensor:
        return self.adapter.images_at(inputs, *extra)

    # 3. images -> score
    def forward(self, inputs: torch.Tensor, *extra: Any) -> torch.Tensor:
        images = self.image_output(self.images(inputs, *extra))
        score = self.score_fn(images)
        if not torch.is_tensor(score):
            raise TypeError(f"score function {self.score_name!r} must return a tensor (B,), got {type(score).__name__}")
        if score.ndim == 2 and score.shape[1] == 1:
            score = score[:, 0]
        if score.shape != (len(images),):
            raise ValueError(
                f"score function {self.score_name!r} must map images {tuple(images.shape)} to one number per image, "
                f"shape ({len(images)},); it returned {tuple(score.shape)}"
            )
        return score


# -- captum methods by name ----------------------------------------------------------------------

META_METHODS = ("NoiseTunnel",)
# base classes and wrappers in captum.attr that are not methods on a forward function
_NOT_METHODS = {"Attribution", "GradientAttribution", "PerturbationAttribution", "DataLoaderAttribution"}


def _own_methods() -> dict[str, type]:
    from .attribution import TraversalSensitivity

    return {"TraversalSensitivity": TraversalSensitivity}


def attribution_methods() -> list[str]:
    """Names :func:`make_method` accepts: captum.attr methods built from a forward function alone, ours, and meta-methods."""
    import captum.attr as ca
    from captum.attr import Attribution, LayerAttribution, NeuronAttribution

    names = []
    for name in dir(ca):
        cls = getattr(ca, name)
        if not (inspect.isclass(cls) and issubclass(cls, Attribution)) or issubclass(cls, (LayerAttribution, NeuronAttribution)):
            continue
        if name.startswith(("LLM", "Remote")) or name in META_METHODS or name in _NOT_METHODS:
            continue
        params = [p for p in inspect.signature(cls.__init__).parameters.values()
                  if p.name != "self" and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)]
        if len(params) == 1:
            names.append(name)
    return sorted(names + list(_own_methods())) + list(META_METHODS)


_SPEC = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$")


def _lookup(name: str) -> type:
    import captum.attr as ca

    own = _own_methods()
    if name in own:
        return own[name]
    allowed = attribution_methods()
    if name not in allowed:
        raise ValueError(f"unknown attribution method {name!r}; use one of: {', '.join(allowed)} "
                         f"(or pass a captum.attr instance, class or factory)")
    return getattr(ca, name)


FREQUENCY = "frequency"  # not a captum method: rank SAE features by how often they fire (rank_by_frequency)


def check_method_spec(spec: str) -> None:
    """Validate a method name such as ``"NoiseTunnel(IntegratedGradients)"`` (or ``"frequency"``) without building anything."""
    if spec == FREQUENCY:
        return
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"attribution method {spec!r} is not a name like 'IntegratedGradients' or 'NoiseTunnel(Saliency)'")
    outer, inner = m.group(1), m.group(2)
    _lookup(outer)
    if outer in META_METHODS:
        if not inner:
            raise ValueError(f"{outer} wraps another method: write e.g. '{outer}(IntegratedGradients)'")
        check_method_spec(inner)
    elif inner:
        raise ValueError(f"{outer} does not wrap another method; {spec!r} is not valid")


def make_method(method: Any, forward_func: Callable[..., torch.Tensor]) -> Any:
    """A captum ``Attribution`` on ``forward_func`` from a name, a class, a factory or an instance."""
    from captum.attr import Attribution

    if isinstance(method, Attribution):
        if not isinstance(method.forward_func, LatentScore):
            raise ValueError(
                f"the {type(method).__name__} instance attributes {type(method.forward_func).__name__}, not a LatentScore; "
                f"build it as {type(method).__name__}(LatentScore(adapter, score)), or pass the class or its name"
            )
        return method
    if isinstance(method, str):
        check_method_spec(method)
        outer, inner = _SPEC.match(method).group(1, 2)
        cls = _lookup(outer)
        return cls(make_method(inner, forward_func)) if outer in META_METHODS else cls(forward_func)
    if inspect.isclass(method) and issubclass(method, Attribution):
        return method(forward_func)
    if callable(method):  # a factory: lambda f: NoiseTunnel(IntegratedGradients(f))
        built = method(forward_func)
        if not isinstance(built, Attribution):
            raise TypeError(f"the method factory returned {type(built).__name__}, not a captum.attr Attribution")
        return built
    raise TypeError(f"method must be a captum.attr method name, class, instance or factory, got {type(method).__name__}")


def method_name(method: Any) -> str:
    """``NoiseTunnel(IntegratedGradients)`` for a NoiseTunnel around IG, the class name otherwise."""
    inner = getattr(method, "attribution_method", None)
    return f"{type(method).__name__}({method_name(inner)})" if inner is not None else type(method).__name__


def _sig(value: Any, digits: int = 6) -> float:
    """``value`` rounded to ``digits`` significant digits (attributions can be tiny)."""
    return float(f"{float(value):.{digits}g}")


# -- the ranking ---------------------------------------------------------------------------------

@dataclass
class RankedLatents:
    """Latents ranked by the mean absolute attribution of a score over the base inputs.

    ``attributions`` is (n_inputs, n_latents); ``importance`` its mean absolute value per latent
    (the ranking key) and ``signed`` its mean; ``order`` the latent indices, most important first;
    ``delta`` the convergence delta per input for methods that have one (IG: completeness error).
    """

    ids: list[str]
    attributions: torch.Tensor
    method: str
    score: str
    delta: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        a = self.attributions.detach().float().cpu()
        self.attributions = a
        self.importance = a.abs().mean(0).numpy()
        self.signed = a.mean(0).numpy()
        # stable sort: ties keep latent order
        self.order = [int(i) for i in np.argsort(-self.importance, kind="stable")]
        self._rank = {i: r + 1 for r, i in enumerate(self.order)}
        if self.delta is not None:
            self.delta = self.delta.detach().float().cpu().flatten()

    def __len__(self) -> int:
        return len(self.ids)

    def top(self, k: int | None = None) -> list[int]:
        """The ``k`` most important latent indices (all when None)."""
        if k is None:
            return list(self.order)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
        return self.order[:k]

    def rank_of(self, index: int) -> int:
        """1 for the most important latent."""
        return self._rank[index]

    @property
    def mean_abs_delta(self) -> float | None:
        return None if self.delta is None else float(self.delta.abs().mean())

    def extras(self, index: int) -> dict[str, Any]:
        """What a latent's results.json entry records about its attribution."""
        return {
            "attribution": _sig(self.importance[index]),
            "attribution_signed": _sig(self.signed[index]),
            "rank": self.rank_of(index),
            "delta": None if self.delta is None else _sig(self.mean_abs_delta),
            "attribution_method": self.method,
        }

    def to_json(self) -> dict[str, Any]:
        """The ranking as stored in results.json's header (``ranking``)."""
        return {"method": self.method, "score": self.score, "order": [self.ids[i] for i in self.order],
                "attribution": {self.ids[i]: _sig(self.importance[i]) for i in range(len(self.ids))},
                "delta": None if self.delta is None else _sig(self.mean_abs_delta)} | {
                    k: v for k, v in self.info.items() if k in ("n_inputs", "alpha", "seconds", "method_kwargs")}

    def __repr__(self) -> str:
        lines = [f"RankedLatents({self.method} of {self.score!r}, {self.info.get('n_inputs', '?')} inputs)"]
        for r, i in enumerate(self.order, 1):
            lines.append(f"  {r:>2}. {self.ids[i]:>6}  {self.importance[i]:.4g}  (signed {self.signed[i]:+.4g})")
        if self.delta is not None:
            lines.append(f"  convergence delta: mean |delta| {self.mean_abs_delta:.3g}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        top = float(self.importance.max()) if len(self.importance) and self.importance.max() > 0 else 1.0
        rows = "".join(
            f"<tr><td>{r}</td><td>{html.escape(self.ids[i])}</td><td>{self.importance[i]:.4g}</td>"
            f"<td>{self.signed[i]:+.4g}</td><td><div style='background:#37a;height:8px;"
            f"width:{100 * self.importance[i] / top:.0f}px'></div></td></tr>"
            for r, i in enumerate(self.order, 1)
        )
        return (f"<p>{html.escape(self.method)} of score <code>{html.escape(self.score)}</code></p><table>"
                "<thead><tr><th>rank</th><th>latent</th><th>mean |attr|</th><th>mean attr</th><th></th></tr></thead>"
                f"<tbody>{rows}</tbody></table>")

    def plot(self, ax: Any = None) -> Any:
        """A bar chart of mean |attribution| in rank order (matplotlib Figure, no pyplot)."""
        from .plots import ranking_figure

        return ranking_figure(self, ax=ax)


def _adapter_of(target: Any) -> Adapter:
    if isinstance(target, Adapter):
        return target
    if isinstance(getattr(target, "adapter", None), Adapter):  # a LatentExplainer
        return target.adapter
    from .components import get_adapter

    return get_adapter(target)


def rank_latents(adapter: Any, score: str | ScoreFn | None = "mean", method: Any = "IntegratedGradients",
                 inputs: torch.Tensor | None = None, *, n_bases: int = 8, seed: int = 0, alpha: float = 1.0,
                 **method_kwargs: Any) -> RankedLatents:
    """Attribute ``score(images)`` to every latent with a captum method; rank by mean |attribution|.

    Args:
        adapter: an Adapter (``vae``, ``ddpm``), a model the ``vae`` adapter takes, or a LatentExplainer.
        score: images (B, C, H, W) in [0, 1] -> (B,); a callable, a built-in name or ``"module:function"``.
        method: a captum.attr name (``"IntegratedGradients"``, ``"FeatureAblation"``,
            ``"NoiseTunnel(IntegratedGradients)"``), class, factory ``f -> Attribution``, or an
            instance built on a :class:`LatentScore`.
        inputs: base latents (VAE, (n, D)) or base noises (ddpm, (n, C, H, W)); ``n_bases`` are
            drawn from ``seed`` when None.
        alpha: (ddpm) the direction strength attributed, from the baseline alpha = 0.
        method_kwargs: passed to ``attribute`` (``n_steps``, ``baselines``, ``nt_samples``, ``stdevs``, ...).
    """
    adapter = _adapter_of(adapter)
    if isinstance(method, str) and method == FREQUENCY:
        return rank_by_frequency(adapter)
    forward = LatentScore(adapter, score, alpha=alpha)
    attribution = make_method(method, forward)
    if attribution.forward_func is not forward:
        forward = attribution.forward_func
    if inputs is None:
        if not isinstance(n_bases, int) or n_bases < 1:
            raise ValueError(f"n_bases must be an integer >= 1, got {n_bases!r}")
        inputs = adapter.sample_bases(n_bases, seed=seed)
    x, extra, baselines = forward.prepare(torch.as_tensor(inputs))
    kwargs = dict(method_kwargs)
    accepted = inspect.signature(attribution.attribute).parameters
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
    if extra is not None:
        kwargs.setdefault("additional_forward_args", extra)
    if "baselines" in accepted:
        kwargs.setdefault("baselines", baselines)
    elif takes_kwargs and type(attribution).__name__ == "NoiseTunnel":
        inner = inspect.signature(attribution.attribution_method.attribute).parameters
        if "baselines" in inner:
            kwargs.setdefault("baselines", baselines)
    has_delta = bool(attribution.has_convergence_delta())
    if has_delta:
        kwargs.setdefault("return_convergence_delta", True)
    unknown = [k for k in kwargs if k not in accepted and not takes_kwargs]
    if unknown:
        raise TypeError(f"{method_name(attribution)}.attribute() takes no {', '.join(unknown)}; "
                        f"it takes {', '.join(p for p in accepted if p != 'self')}")
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # noise tunnels and sampling methods draw from torch's RNG
        warnings.filterwarnings("ignore", message=".*did not already require gradients.*")
        out = attribution.attribute(x, **kwargs)
    delta = None
    if has_delta and kwargs.get("return_convergence_delta"):
        out, delta = out
    if isinstance(out, tuple):
        out = out[0]
    if not torch.is_tensor(out) or out.shape != x.shape:
        raise ValueError(f"{method_name(attribution)} returned {getattr(out, 'shape', type(out))}, expected {tuple(x.shape)}")
    n = adapter.n_latents
    ids = [adapter.latent_id(i) for i in range(n)]
    info = {"n_inputs": int(len(x)), "seconds": round(time.perf_counter() - started, 4),
            "method_kwargs": {k: v for k, v in method_kwargs.items() if isinstance(v, (int, float, str, bool))}}
    if "directions" in capabilities_of(adapter):
        info["alpha"] = forward.alpha
    return RankedLatents(ids, out.detach().reshape(len(x), -1)[:, :n], method_name(attribution), forward.score_name,
                         delta=delta, info=info)


def rank_by_frequency(adapter: Any) -> RankedLatents:
    """Rank latents by how often they fire: the share of images (or bases) where each SAE feature is
    active, from the adapter's feature statistics (``adapter.stats["frequency"]``, from the data when
    it has example evidence). Dead features come last."""
    adapter = _adapter_of(adapter)
    stats = getattr(adapter, "stats", None)
    frequency = stats.get("frequency") if isinstance(stats, dict) else None
    if not torch.is_tensor(frequency) or frequency.shape != (adapter.n_latents,):
        raise ValueError(f"ranking by frequency needs latents that fire, such as the features of an SAEFeatureAdapter; the "
                         f"{getattr(adapter, 'name', type(adapter).__name__)} adapter keeps no firing frequencies")
    ids = [adapter.latent_id(i) for i in range(adapter.n_latents)]
    source = "data" if getattr(adapter, "has_examples", False) else "samples"
    return RankedLatents(ids, frequency.float()[None], FREQUENCY, FREQUENCY, info={"n_inputs": 1, "stats_source": source})


class RankThenExplain:
    """Rank latents by a captum attribution of a score, then explain the top-k in words.

    Wraps a :class:`~latentexplainer_plugin.LatentExplainer` like captum's ``LLMAttribution``
    wraps a method::

        rte = RankThenExplain(LatentExplainer(vae), score="mean", method="IntegratedGradients")
        results = rte.attribute(top_k=3, n_steps=32)
        results.ranking        # RankedLatents for every latent
        results[0].rank, results[0].attribution, results[0].explanation, results[0].certainty

    ``inputs`` (base latents or noises) serve the ranking and the explanation alike.
    """

    def __init__(self, explainer: Any, score: str | ScoreFn | None = "mean", method: Any = "IntegratedGradients",
                 alpha: float = 1.0):
        self.explainer = explainer
        self.score_fn, self.score_name = resolve_score(score)
        self.method = method
        self.alpha = alpha
        if isinstance(method, str):
            check_method_spec(method)

    def rank(self, inputs: torch.Tensor | None = None, *, n_bases: int = 8, **method_kwargs: Any) -> RankedLatents:
        return rank_latents(self.explainer.adapter, self.score_fn, self.method, inputs, n_bases=n_bases,
                            seed=self.explainer.seed, alpha=self.alpha, **method_kwargs)

    def attribute(self, inputs: torch.Tensor | None = None, top_k: int | None = 3, *, n_bases: int = 8,
                  **method_kwargs: Any) -> ExplanationResults:
        """Rank every latent, explain the ``top_k`` most important (all when None), in rank order."""
        ranking = self.rank(inputs, n_bases=n_bases, **method_kwargs)
        results = self.explainer.attribute(inputs, target=ranking.top(top_k))
        for result in results:
            result.extras.update(ranking.extras(result.index))
        results.ranking = ranking
        results.info["ranking"] = ranking.to_json()
        return results


def score_attribution(traversal: Any, score: Any = None, n_steps: int = 16) -> np.ndarray | None:
    """(H, W, C): IG of ``score`` over the image, from the traversal's first step to its last.

    Averaged over bases and rows. None when the score has no gradient (e.g. it leaves torch).
    """
    from captum.attr import IntegratedGradients

    fn, _ = resolve_score(score)
    images = traversal.images.detach().float()
    first = images[:, :, 0].reshape(-1, *images.shape[-3:])
    last = images[:, :, -1].reshape(-1, *images.shape[-3:])

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = fn(x)
        return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out

    try:
        with torch.enable_grad():
            attr = IntegratedGradients(forward).attribute(last, baselines=first, n_steps=n_steps)
    except RuntimeError as exc:  # "element 0 of tensors does not require grad": no gradient to follow
        if "grad" not in str(exc):
            raise
        return None
    return attr.mean(0).permute(1, 2, 0).detach().cpu().numpy()
