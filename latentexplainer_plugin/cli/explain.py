"""``latentexplainer explain`` and ``demo``: check every input, build the components, explain, write the run."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .common import _parse_floats, _parse_ints, check_device


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Open and close a TCP connection to the server of ``url`` (no request, no key sent), so an
    unreachable server fails before any model is loaded. Skipped when a proxy is configured."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    from ..backends.openai_compat import redact_url

    parts = urlsplit(url)
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UsageError(f"--base-url {redact_url(url)!r} has an invalid port") from None
    if not host:
        return
    proxies = urllib.request.getproxies()
    if (proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return  # the proxy decides what is reachable
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc) or type(exc).__name__)
        raise UsageError(
            f"cannot reach {parts.scheme}://{host}:{port} ({reason}): is the server running and is --base-url right? "
            "(default https://api.openai.com/v1; Ollama: http://localhost:11434/v1)"
        ) from None


def _validate_explain(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be checked before loading a model or calling a backend."""
    from ..adapters.base import check_strengths
    from ..components import parse_backend_spec
    from ..plugins import UnknownComponentError, registry
    from ..uncertainty import get_similarity

    if args.samples < 1:
        raise UsageError(f"--samples must be >= 1, got {args.samples}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must be in [0, 1], got {args.threshold}")
    try:
        name, _ = parse_backend_spec(args.backend)
        registry("backends").get(name)
        if args.bias is None:  # an adapter may name its own default bias (ddpm: combination)
            factory = registry("adapters").get(args.adapter).factory if getattr(args, "adapter", None) else None
            args.bias = getattr(factory, "default_bias", "disentanglement")
        registry("biases").get(args.bias)
        if getattr(args, "adapter", None):
            registry("adapters").get(args.adapter)
        get_similarity(args.similarity)
        strengths = _parse_floats(args.strengths, "strengths")
        if strengths is not None:
            check_strengths(strengths)
    except (UnknownComponentError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    check_device(args.device)
    try:
        from ..ranking import check_cli_options

        check_cli_options(getattr(args, "rank_by", None), getattr(args, "score", None), getattr(args, "top_k", None))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # language-model backends: every flag is checked here, before any model load or request
    from urllib.parse import urlsplit

    from ..backends.base import BackendError
    from ..backends.hf import check_vlm_dir, resolve_dtype
    from ..backends.openai_compat import check_env_name, redact_url

    _, backend_arg = parse_backend_spec(args.backend)
    flags = {"--base-url": args.base_url, "--api-key-env": args.api_key_env, "--concurrency": args.concurrency,
             "--timeout": args.timeout, "--max-retries": args.max_retries,
             "--dtype": None if getattr(args, "adapter", None) in ("ddpm", "sd") else args.dtype,  # also the UNet's dtype
             "--max-new-tokens": args.max_new_tokens}
    given = [flag for flag, value in flags.items() if value is not None]
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be > 0 seconds, got {args.timeout} (a finite number: the deadline of one whole request)")
    if args.max_retries is not None and args.max_retries < 0:
        raise UsageError(f"--max-retries must be >= 0, got {args.max_retries}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.base_url is not None:
        parts = urlsplit(args.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"--base-url must be an http:// or https:// URL, got {redact_url(args.base_url)!r}")
    if args.api_key_env is not None:
        try:
            check_env_name(args.api_key_env)  # a key pasted here is refused without being echoed
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.dtype is not None:
        try:
            resolve_dtype(args.dtype)
        except ValueError as exc:
            raise UsageError(f"--dtype: {exc}") from None
    cache = {"cache_dir": args.cache_dir, "no_cache": args.no_cache}
    only = {"openai": ("--base-url", "--api-key-env", "--concurrency", "--timeout", "--max-retries"), "hf": ("--dtype",)}
    if name == "openai":
        if not (backend_arg or "").strip():
            raise UsageError("--backend openai:MODEL needs a model name, e.g. openai:gpt-4o")
        env = args.api_key_env or "OPENAI_API_KEY"
        if not os.environ.get(env, "").strip():
            raise UsageError(f"No API key: set the {env} environment variable (or choose another variable with --api-key-env NAME)")
        options = {"base_url": args.base_url, "api_key_env": args.api_key_env, "concurrency": args.concurrency,
                   "timeout": args.timeout, "max_retries": args.max_retries, "max_tokens": args.max_new_tokens} | cache
    elif name == "hf":
        if not (backend_arg or "").strip():
            raise UsageError("--backend hf:PATH_OR_ID needs a model directory or hub id, e.g. hf:Qwen/Qwen2.5-VL-3B-Instruct")
        try:
            if Path(backend_arg).expanduser().is_dir():
                check_vlm_dir(Path(backend_arg).expanduser())
                from ..adapters.loading import check_pickle_policy

                check_pickle_policy(Path(backend_arg).expanduser(), getattr(args, "allow_pickle", False), "VLM")
            elif not Path(backend_arg).expanduser().exists():
                from ..backends.hf import check_hub_model

                check_hub_model(backend_arg)  # an unreachable hub fails here, in seconds, before any model loads
        except BackendError as exc:
            raise UsageError(str(exc)) from None
        options = {"device": args.device, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
                   "allow_pickle": True if getattr(args, "allow_pickle", False) else None} | cache
    elif name == "offline":
        if given:
            raise UsageError(f"{', '.join(given)}: not used by the offline backend (it calls no model)")
        if args.prompt_from_llm:
            raise UsageError("--prompt-from-llm needs a language-model backend (openai:MODEL or hf:PATH_OR_ID)")
        options = {}
    else:  # a plugin's backend gets the flags that were given, under their option names
        options = {f[2:].replace("-", "_"): flags[f] for f in given} | ({"cache_dir": args.cache_dir} if args.cache_dir else {}) \
            | ({"no_cache": True} if args.no_cache else {})
    wrong = [f for other, fs in only.items() if name in only and other != name for f in fs if f in given]
    if wrong:
        raise UsageError(f"{', '.join(wrong)}: not used by the {name} backend")
    bias = registry("biases").get(args.bias).factory()
    if "property" in getattr(bias, "requires", ()) and not args.property:
        raise UsageError(f"the {args.bias!r} bias needs --property TEXT (the labelled property, e.g. --property smiling)")
    out = Path(args.out)
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise UsageError(f"--out {out}: {probe} is not writable")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is a file, so no directory can be made under it")
    if name == "openai":  # last: the only check that may wait (for a TCP connect)
        check_reachable(args.base_url or "https://api.openai.com/v1", timeout=min(args.timeout or 5.0, 10.0))
    return {"strengths": strengths, "latents": _parse_ints(args.latents, "latents"),
            "backend_options": {k: v for k, v in options.items() if v is not None},
            "context": {"property": args.property} if args.property else {}}


def _explain(args: argparse.Namespace, model: Any, adapter: str | None, header: dict[str, Any], stats: Any,
             checked: dict[str, Any], adapter_options: dict[str, Any] | None = None) -> int:
    from ..adapters.base import DEFAULT_STRENGTHS
    from ..attribution import LatentExplainer
    from ..run import explain_to_dir, summarize

    try:
        explainer = LatentExplainer(
            model, backend=args.backend, bias=args.bias, samples=args.samples, similarity=args.similarity,
            threshold=args.threshold, strengths=checked["strengths"] or DEFAULT_STRENGTHS, seed=args.seed,
            adapter=adapter, adapter_options=adapter_options,
            backend_options=checked.get("backend_options"), context=checked.get("context"),
        )
        targets = checked["latents"]
        if targets is not None:
            explainer.resolve_targets(targets)
        from ..ranking import cli_plan  # --rank-by/--score/--top-k, and the heat maps of the report

        targets, extras, ranked = cli_plan(explainer, args.out, getattr(args, "rank_by", None), getattr(args, "score", None),
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


def cmd_demo(args: argparse.Namespace) -> int:
    checked = _validate_explain(args)
    from ..demo import demo_data, load_demo_model
    from ..run import latent_stats

    model = load_demo_model(device="cpu")
    data = demo_data()
    stats = latent_stats(model, data["images"], data["factors"], [str(n) for n in data["factor_names"]])
    return _explain(args, model.to(args.device), "vae", {"model": "latentexplainer demo VAE (shapes, 10 latents)"}, stats, checked)


def _explain_diffusion(args: argparse.Namespace, checked: dict[str, Any], data: dict[str, Any] | None) -> int:
    """--adapter ddpm|sd: load UNet + DDIM scheduler (sd: + VAE, text encoder), find (or on --resume reload)
    h-space directions, save them to OUT/directions.safetensors, explain."""
    from ..adapters.diffusion import find_directions, labelled_images, resolve_direction_spec
    from ..directions import Directions
    from ..plugins import registry

    cls = registry("adapters").get(args.adapter).factory
    options = {"prompt": args.prompt or "a photograph", "guidance_scale": args.guidance_scale} if args.adapter == "sd" else {}
    if args.adapter != "sd" and args.prompt is not None:
        raise UsageError(f"--prompt: the {args.adapter} adapter is not text-conditioned (use --adapter sd)")
    if args.n_directions is not None and args.n_directions < 1:
        raise UsageError(f"--n-directions must be >= 1, got {args.n_directions}")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    rows = registry("biases").get(args.bias).factory().rows
    if rows > cls.max_rows:
        raise UsageError(f"the {args.bias!r} bias compares {rows} rows with another latent clamped; h-space directions have no "
                         f"other latent to clamp: use --bias combination (the {args.adapter} default) or conditional")
    try:
        args.direction = args.direction or "pca"
        if resolve_direction_spec(args.direction)[0] == "conditional":
            if args.adapter == "sd":
                raise ValueError("--direction conditional inverts the --data images, which the sd adapter cannot do; use pca, pullback or a file")
            labelled_images(data)  # needs --data with binary factors: refuse before loading the model
        try:
            scale = args.edit_scale if args.edit_scale == "auto" else float(args.edit_scale)
        except ValueError:
            raise ValueError(f"--edit-scale must be auto or a positive number, got {args.edit_scale!r}") from None
        if getattr(args, "allow_pickle", False):  # only then: a plugin's adapter need not know the option
            options["allow_pickle"] = True
        adapter = cls.from_pretrained(args.model, device=args.device, dtype=args.dtype or "float32", steps=args.steps,
                                      t_edit=args.t_edit, site=args.site, scale=scale, **options)
        saved = Path(args.out) / "directions.safetensors"
        if args.resume and saved.is_file():
            directions = Directions.load(saved)
            adapter.set_directions(directions)
        else:
            directions = find_directions(adapter, args.direction, args.n_directions, seed=args.seed, data=data)
            if args.force or not (Path(args.out) / "results.json").exists():  # never clobber another run's file
                directions.save(saved)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    header = {"model": str(args.model), "data": str(args.data) if args.data else None,
              "directions": {"file": "directions.safetensors", "finder": directions.provenance.get("finder"), "count": len(directions)}}
    return _explain(args, adapter, args.adapter, header, None, checked)


def _explain_generator_directions(args: argparse.Namespace, model: Any, options: dict[str, Any],
                                  checked: dict[str, Any]) -> int:
    """--adapter generator --direction sefa|ganspace|FILE: explain directions in the generator's latent space."""
    from ..adapters.diffusion import find_directions, resolve_direction_spec
    from ..adapters.generator import GeneratorAdapter

    try:
        if resolve_direction_spec(args.direction)[0] == "conditional":
            raise ValueError("--direction conditional needs DDIM inversion (ddpm adapter); for a generator use sefa, ganspace or a file")
        adapter = GeneratorAdapter(model, site=args.site, **options)
        directions = find_directions(adapter, args.direction, args.n_directions, seed=args.seed)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    if args.force or not (Path(args.out) / "results.json").exists():  # never clobber another run's file
        directions.save(Path(args.out) / "directions.safetensors")
    header = {"model": str(args.model), "data": None,
              "directions": {"file": "directions.safetensors", "finder": directions.provenance.get("finder"), "count": len(directions)}}
    return _explain(args, adapter, "generator", header, None, checked)


def cmd_explain(args: argparse.Namespace) -> int:
    from ..adapters.generator import is_code_spec

    if args.adapter is None:
        args.adapter = "generator" if is_code_spec(args.model) else "vae"
    if args.latent_dim is not None and args.adapter != "generator":
        raise UsageError(f"--latent-dim is for generators in code (--model file.py:factory); the {args.adapter} "
                         "adapter reads the latent size from the model")
    if args.latent_dim is not None and args.latent_dim < 1:
        raise UsageError(f"--latent-dim must be >= 1, got {args.latent_dim}")
    if args.direction is not None and args.adapter == "vae":
        raise UsageError("--direction: the vae adapter explains its latent axes; directions are for --adapter generator "
                         "(sefa, ganspace, a file) and the diffusion adapters (ddpm, sd)")
    if args.direction is not None and args.adapter == "generator" and args.bias is None:
        args.bias = "combination"  # a direction has no other latent to clamp
    checked = _validate_explain(args)
    from ..data import load_npz
    from ..run import latent_stats

    data = load_npz(args.data) if args.data else None
    if args.adapter in ("ddpm", "sd"):
        return _explain_diffusion(args, checked, data)
    from ..adapters.vae import load_vae

    model_path = Path(args.model)
    options: dict[str, Any] = {}
    if args.adapter == "generator":
        from ..adapters.generator import load_generator

        try:
            model = load_generator(args.model, latent_dim=args.latent_dim)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--model {args.model}: {exc}") from None
        stats = None
        if args.latent_dim is not None:
            options["latent_dim"] = args.latent_dim
        if args.direction is not None:
            return _explain_generator_directions(args, model, options, checked)
    elif args.adapter == "vae":
        if not model_path.exists():
            raise UsageError(f"--model {args.model}: no such directory (a VAE directory holds config.json and model.safetensors)")
        try:
            model = load_vae(model_path, device=args.device, allow_pickle=args.allow_pickle)
        except (ValueError, TypeError) as exc:  # LoadError, or a config that does not fit the weights
            raise UsageError(f"--model {args.model}: {exc}") from None
        stats = None
        if data is not None and hasattr(model, "encode"):
            stats = latent_stats(model, data["images"], data.get("factors"), data.get("factor_names"))
    else:
        model = args.model
        stats = None
    if args.site:
        options["site"] = args.site
    header = {"model": str(args.model), "data": str(args.data) if args.data else None}
    return _explain(args, model, args.adapter, header, stats, checked, options)
