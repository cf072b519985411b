"""``latentexplainer explain`` and ``demo``: select the components, route and check every option,
then load, find directions, explain and write the run.

Nothing here knows a built-in component by name: what an adapter, backend, bias or direction
finder takes and can do comes from its declarations (``Options``, ``capabilities``,
``preflight``, ``default_bias``, ``max_rows``, ``default_direction_finder``), exactly as for a
third-party plugin.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import OptionError, UsageError
from ..options import capabilities_of
from .common import _parse_floats, _parse_ints, check_device, in_flag_words
from .routing import Selected, flags_given, render, route, select_component, validate


@dataclass
class Plan:
    """What ``explain`` will do, decided and checked before anything expensive."""

    adapter: Selected
    sae: Selected | None
    backend: Selected
    backend_arg: str | None
    bias: Selected
    finder: Selected | None
    finder_implied: dict[str, Any]
    strengths: list[float] | None
    latents: list[int] | None
    context: dict[str, Any]


def _adapter_name(args: argparse.Namespace) -> str:
    """``--adapter``, else the adapter a plugin recognises ``--model`` for (``latentexplainer_adapter_for``)."""
    if getattr(args, "adapter", None):
        return args.adapter
    from ..plugins import hook

    try:
        name = hook().latentexplainer_adapter_for(model=str(args.model))
    except ValueError as exc:  # e.g. a pipeline class no adapter explains
        raise UsageError(f"--model {args.model}: {exc}") from None
    if not name:
        raise UsageError(f"--model {args.model}: no adapter recognises this model; choose one with --adapter NAME "
                         "(latentexplainer plugins lists them)")
    return name


def _check_common(args: argparse.Namespace) -> tuple[list[float] | None, list[int] | None]:
    from ..adapters.base import check_strengths
    from ..uncertainty import get_similarity

    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}")
    try:
        get_similarity(args.similarity)
        strengths = _parse_floats(args.strengths, "strengths")
        if strengths is not None:
            check_strengths(strengths)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_device(args.device)
    try:
        check_ranking_flags(getattr(args, "rank_by", None), getattr(args, "score", None), getattr(args, "top_k", None))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return strengths, _parse_ints(args.latents, "latents")


def check_ranking_flags(rank_by: str | None, score: str | None, top_k: int | None) -> None:
    """Validate the ranking flags before any model is loaded; raises ValueError saying what to change."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if rank_by is None and score is None and top_k is not None:
        raise ValueError("--top-k picks the most important latents of a ranking: add --rank-by METHOD (e.g. IntegratedGradients)")
    from ..ranking import check_method_spec, resolve_score

    if rank_by is not None:
        check_method_spec(rank_by)
    if rank_by == "frequency" and score is not None:
        raise ValueError("--rank-by frequency ranks SAE features by how often they fire; --score does not apply to it")
    if score is not None:
        resolve_score(score)


def _check_out(out: Path) -> None:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise UsageError(f"--out {out}: {probe} is not writable")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is a file, so no directory can be made under it")


def _declaring(kind: str, capability: str) -> list[str]:
    """Names of the registered components of ``kind`` (``adapters``, ``backends``) that declare ``capability``."""
    from ..plugins import registry

    return [n for n in registry(kind).names() if capability in capabilities_of(registry(kind).get(n).factory)]


def plan_explain(args: argparse.Namespace, adapter_name: str) -> Plan:
    """Select the components, route the options to them and run every check that needs no model."""
    from ..components import parse_backend_spec
    from ..directions.find import resolve_direction_spec

    strengths, latents = _check_common(args)
    try:
        backend_name, backend_arg = parse_backend_spec(args.backend)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    adapter = select_component("adapter", "adapters", adapter_name)
    backend = select_component("backend", "backends", backend_name)
    sae = None
    if getattr(args, "sae", None):
        from ..sae import SAEFeatureAdapter

        if getattr(args, "direction", None):
            raise UsageError("--direction and --sae: the latents are either directions or SAE features; choose one")
        if "site_edits" not in adapter.capabilities:
            raise UsageError(f"--sae: the {adapter.name} adapter cannot steer a feature at a site (no render_edited); "
                             f"adapters that can: {', '.join(_declaring('adapters', 'site_edits'))}")
        sae = Selected("feature source", "sae", SAEFeatureAdapter)
    elif getattr(args, "features", None):
        raise UsageError("--features picks SAE features: give the SAE with --sae PATH")
    if getattr(args, "rank_by", None) == "frequency" and sae is None and "sae_features" not in adapter.capabilities:
        raise UsageError("--rank-by frequency ranks SAE features by how often they fire: give the SAE with --sae PATH")
    direction = getattr(args, "direction", None)
    if direction is not None and "directions" not in adapter.capabilities:
        raise UsageError(f"--direction: the {adapter.name} adapter explains its latent axes, not directions; adapters that "
                         f"explain directions: {', '.join(_declaring('adapters', 'directions'))}")
    if sae is None:  # with --sae the latents are the SAE's features: no directions to find
        direction = direction or getattr(adapter.factory, "default_direction_finder", None)
    finder, implied = None, {}
    if direction is not None:
        try:
            finder_name, finder_factory, implied = resolve_direction_spec(direction)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        finder = Selected("direction finder", finder_name, finder_factory)
    explained = sae or adapter  # what the latents are: the SAE's features, or the adapter's own
    bias_name = args.bias or ("combination" if finder is not None and "latent_axes" in adapter.capabilities
                              else getattr(explained.factory, "default_bias", "disentanglement"))
    args.bias = bias_name
    bias = select_component("bias", "biases", bias_name)
    components = [c for c in (backend, adapter, sae, finder) if c is not None]
    route(components, flags_given(args), list(getattr(args, "options", None) or []), {"device": args.device})
    if finder is not None:
        finder.raw = implied | finder.raw
    validate(components)

    # what the components declare decides what else must hold
    if getattr(args, "prompt_from_llm", False) and "calls_model" not in backend.capabilities:
        takers = _declaring("backends", "calls_model")
        raise UsageError(f"--prompt-from-llm needs a language-model backend ({', '.join(f'{n}:...' for n in takers)}); "
                         f"the {backend.name} backend calls no model")
    bias_object = bias.factory()
    rows = getattr(bias_object, "rows", 1)
    max_rows = getattr(explained.factory, "max_rows", 1 if sae is not None else rows)
    if rows > max_rows:
        raise UsageError(f"the {bias_name!r} bias compares {rows} rows with another latent clamped; the {adapter.name} "
                         f"adapter's directions have no other latent to clamp: use --bias combination or conditional")
    if "property" in getattr(bias_object, "requires", ()) and not args.property:
        raise UsageError(f"the {bias_name!r} bias needs --property TEXT (the labelled property, e.g. --property smiling)")
    if finder is not None:
        check_adapter = getattr(finder.factory, "check_adapter", None)
        try:
            if callable(check_adapter):
                check_adapter(adapter.factory)
        except OptionError as exc:
            raise UsageError(render(exc, finder)) from None
        if "needs_data" in finder.capabilities and not getattr(args, "data", None):
            raise UsageError(f"--direction {finder.name}: this direction finder needs labelled images: --data FILE.npz")
    _check_out(Path(args.out))
    preflight = getattr(backend.factory, "preflight", None)
    if callable(preflight):  # last: the only check that may wait (a TCP connect, a hub lookup)
        try:
            preflight(backend_arg, backend.options)
        except OptionError as exc:
            raise UsageError(render(exc, backend)) from None
    return Plan(adapter, sae, backend, backend_arg, bias, finder, implied, strengths, latents,
                {"property": args.property} if args.property else {})


def _build_adapter(args: argparse.Namespace, plan: Plan, model: Any) -> Any:
    from ..components import get_adapter

    try:
        adapter = get_adapter(model, plan.adapter.name, **plan.adapter.options)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        raise UsageError(text if text.startswith(str(args.model)) else f"--model {args.model}: {text}") from None
    if plan.sae is None:
        return adapter
    try:  # the SAE's features become the latents; its d_in is checked against the site before any edit
        return plan.sae.factory(adapter, args.sae, **plan.sae.options)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--sae {args.sae}: {exc}") from None


def _directions(args: argparse.Namespace, plan: Plan, adapter: Any, data: dict[str, Any] | None) -> dict[str, Any]:
    """Find (or, on --resume, reload) the directions, save them to OUT/directions.safetensors; the header entry."""
    from ..directions import Directions
    from ..directions.find import find_directions

    saved = Path(args.out) / "directions.safetensors"
    try:
        if args.resume and saved.is_file():
            directions = Directions.load(saved)
            adapter.set_directions(directions)
        else:
            spec = plan.finder_implied.get("file", plan.finder.name)  # a file given as --direction PATH
            options = {k: v for k, v in plan.finder.options.items() if k not in plan.finder_implied}
            directions = find_directions(adapter, spec, seed=args.seed, data=data, **options)
            if args.force or not (Path(args.out) / "results.json").exists():  # never clobber another run's file
                directions.save(saved)
    except OptionError as exc:
        raise UsageError(render(exc, plan.finder)) from None
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    return {"file": "directions.safetensors", "finder": directions.provenance.get("finder"), "count": len(directions)}


def _rank_plan(explainer: Any, out_dir: str, rank_by: str | None, score: str | None, top_k: int | None,
             targets: Sequence[int] | None) -> tuple[list[int] | None, Callable[[Any], dict[str, Any]], dict[str, Any]]:
    """What ``explain``/``demo`` run: (targets in rank order, per-latent extras, results.json header keys).

    Without ranking flags: the given targets, heat maps (score: mean intensity), no header keys.
    With them: rank every latent (``--rank-by``, default IntegratedGradients, of ``--score``, default
    ``mean``), keep the ``--top-k`` among ``targets``, record attribution and rank per latent.
    """
    from ..ranking import rank_latents
    from ..report.examples import ExamplesWriter
    from ..report.heatmaps import HeatmapWriter

    heatmaps = HeatmapWriter(out_dir, score)
    examples = ExamplesWriter(out_dir)  # SAE features with example evidence: examples/<id>.png
    latent_extras = getattr(explainer.adapter, "latent_extras", None)  # what the adapter knows per latent

    def own(result: Any) -> dict[str, Any]:
        return (latent_extras(result.index) if callable(latent_extras) else {}) | examples(result)

    if rank_by is None and score is None:
        return (list(targets) if targets is not None else None), (lambda result: heatmaps(result) | own(result)), {}
    ranking = rank_latents(explainer.adapter, score, rank_by or "IntegratedGradients", seed=explainer.seed)
    allowed = set(explainer.resolve_targets(targets))
    order = [i for i in ranking.order if i in allowed]
    order = order[:top_k] if top_k is not None else order

    def extras(result: Any) -> dict[str, Any]:
        return ranking.extras(result.index) | heatmaps(result) | own(result)

    return order, extras, {"ranking": ranking.to_json()}


def _explain(args: argparse.Namespace, plan: Plan, adapter: Any, header: dict[str, Any], stats: Any) -> int:
    from ..adapters.base import DEFAULT_STRENGTHS
    from ..attribution import LatentExplainer
    from ..run import explain_to_dir, summarize

    try:
        explainer = LatentExplainer(
            adapter, backend=args.backend, bias=args.bias, samples=args.samples, similarity=args.similarity,
            threshold=args.threshold, strengths=plan.strengths or DEFAULT_STRENGTHS, seed=args.seed,
            backend_options=plan.backend.options, context=plan.context,
        )
        targets = plan.latents
        if targets is not None:
            explainer.resolve_targets(targets)
        targets, extras, ranked = _rank_plan(explainer, args.out, getattr(args, "rank_by", None), getattr(args, "score", None),
                                           getattr(args, "top_k", None), targets)
        header = header | ranked
        if getattr(args, "prompt_from_llm", False):
            from ..biases.from_llm import prompt_from_llm

            explainer.bias = prompt_from_llm(explainer.bias, explainer.backend)
            print(f"prompt template ({explainer.bias.extra.get('template_source')}): {explainer.bias.template}", file=sys.stderr)
    except (ValueError, IndexError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    started = time.perf_counter()
    try:
        data = explain_to_dir(explainer, args.out, target=targets, stats=stats, header=header,
                              resume=args.resume, force=args.force, progress=not args.quiet, extras=extras)
    finally:
        close = getattr(explainer.backend, "close", None)
        if callable(close):
            close()
    text, code = summarize(data)
    text = in_flag_words(text)
    print(text)
    stats_of = getattr(explainer.backend, "stats", None)
    if callable(stats_of) and stats_of().get("enabled"):
        cached = stats_of()
        print(f"response cache: {cached['hits']} samples reused, {cached['misses']} asked")
    usage = data.get("usage") or {}
    if usage.get("requests"):
        print(f"tokens: {usage.get('prompt_tokens', 0)} prompt + {usage.get('completion_tokens', 0)} completion "
              f"in {usage['requests']} requests")
    print(f"wrote {Path(args.out) / 'results.json'} and report.html in {time.perf_counter() - started:.1f} s")
    return code


def explain_model(args: argparse.Namespace, model: Any, adapter_name: str, header: dict[str, Any]) -> int:
    """The whole command for a model (a path, hub id, code spec or loaded module) and an adapter name."""
    plan = plan_explain(args, adapter_name)
    from ..data import load_npz

    examples_only = "examples_only" in capabilities_of(plan.adapter.factory)
    if examples_only and not getattr(args, "data", None):
        raise UsageError(f"the {plan.adapter.name} adapter explains its latents from example images only: pass "
                         f"--data X.npz (images, and masks for IoU) to find where each fires")
    if plan.sae is not None and plan.sae.options.get("sampled_examples") and getattr(args, "data", None):
        raise UsageError("--data and -o sampled_examples: the examples come either from the data or from the model's "
                         "own samples; choose one")
    data = load_npz(args.data) if getattr(args, "data", None) else None
    if data is not None and plan.finder is not None:
        check_data = getattr(plan.finder.factory, "check_data", None)
        if callable(check_data):
            try:
                check_data(data)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
    adapter = _build_adapter(args, plan, model)
    if (plan.sae is not None or examples_only) and data is not None:  # example evidence and statistics from the data
        try:
            adapter.attach_examples(data["images"], masks=data.get("masks"))
        except ValueError as exc:
            raise UsageError(f"--data {args.data}: {exc}") from None
    if plan.finder is not None:
        header = header | {"directions": _directions(args, plan, adapter, data)}
    stats = None
    if data is not None:
        try:
            stats = adapter.latent_statistics(data)
        except ValueError as exc:
            raise UsageError(f"--data {args.data}: {exc}") from None
    return _explain(args, plan, adapter, header, stats)


DEMO_SAE_TRAIN = True  # ``demo --sae`` without a path: train an SAE here and explain it (cli/demo_sae.py)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import demo_data, load_demo_model

    if getattr(args, "sae", None) is DEMO_SAE_TRAIN:
        from .demo_sae import print_summary, run_demo_sae

        if args.samples < 1:
            raise UsageError(f"--samples must be >= 1, got {args.samples}")
        print_summary(run_demo_sae(args.out, samples=args.samples, seed=args.seed, progress=not args.quiet,
                                   force=args.force))
        print(f"wrote {Path(args.out) / 'results.json'}, sae_demo.json and report.html")
        return 0

    plan = plan_explain(args, "vae")  # every input checked before the model loads
    model = load_demo_model(device="cpu").to(args.device)
    adapter = _build_adapter(args, plan, model)
    data = demo_data()
    stats = adapter.latent_statistics(data | {"factor_names": [str(n) for n in data["factor_names"]]})
    return _explain(args, plan, adapter, {"model": "latentexplainer demo VAE (shapes, 10 latents)"}, stats)


def cmd_explain(args: argparse.Namespace) -> int:
    name = _adapter_name(args)
    header = {"model": str(args.model), "data": str(args.data) if args.data else None}
    if getattr(args, "sae", None):
        header["sae"] = str(args.sae)
    return explain_model(args, str(args.model), name, header)
