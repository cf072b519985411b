"""The ``latentexplainer`` command line: demo, explain, train-vae, train-demo, make-data, evaluate, calibrate, plugins.

Exit codes: 0 every latent has a result; 1 some latents failed; 2 bad input (nothing was run);
130 interrupted (finished latents are kept; rerun with --resume); 3 internal error (a bug: the
traceback is written to a file whose path is printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import UsageError  # noqa: F401 (re-exported)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


DEFAULT_TRAIN_STEPS = 2000  # = models.training.DEFAULT_STEPS (kept here so the parser needs no torch import)

TRAIN_VAE_EPILOG = """\
defaults (why each; docs/training.md has the measurements):
  objective   beta-TCVAE (Chen et al. 2018): closed-form KL per latent + (beta-1) * total correlation
  warm-up     KL/TC weight 0 -> 1 over the first quarter of the steps (Bowman et al. 2016; Sønderby
              et al. 2016): latents get used before the KL cost can switch them off (posterior collapse)
  beta        normalised (Higgins et al. 2017): beta_norm * H*W*C / latents, so the balance against the
              summed reconstruction term does not depend on the image size
  free bits   1 nat per latent is free (Kingma et al. 2016) for the first 40 % of the steps, fading to 0
              at 80 %: latents stay alive until the decoder uses them (warm-up alone lost the objects
              of shapes2), and unused ones still collapse by the end, so the activity report is honest
  capacity    annealing (Burgess et al. 2018) is off; --capacity 25 forces information through
  threads     the free cores: 2 on an idle 2-core machine, 1 when another process keeps a core busy
              (measured on 2 shared cores: 1 thread 0.55 steps/s, 2 threads 0.28 steps/s)

time: the defaults (2000 steps x 64 images of 64x64 = 128k images) take about 3 minutes on an idle
2-core CPU (one idle core trains 730 images/s), proportionally longer when other processes share the
cores (19 minutes, 1 thread, with 3-8 other CPU-bound jobs on the 2 cores; docs/training.md).
Measured: on shapes2 and shapes3 these defaults capture 3 factors (background, x, y position);
more --steps is the first thing to try for size and colour.

At the end it prints the KL of every latent, the active ones (KL > 0.05 nats) and, when the data has
factors, the factor each captures; all of it goes into config.json under "training". It warns loudly
when most latents collapsed.
"""


def _add_explain_options(p: argparse.ArgumentParser, default_out: str | None) -> None:
    p.add_argument("--out", default=default_out, required=default_out is None, help="run directory to write")
    p.add_argument("--backend", default="offline", help="offline | openai:MODEL | hf:PATH_OR_ID | a plugin's backend")
    p.add_argument("--samples", type=int, default=5, help="answers per latent (n); default 5")
    p.add_argument("--bias", default=None, help="inductive bias: disentanglement | combination | conditional | a plugin's (default: the adapter's; vae: disentanglement, ddpm: combination)")
    p.add_argument("--similarity", default="agree", help="certainty measure: agree (same attribute and direction; default) | embed (sentence embeddings) | bow (the paper's bag of words, exactly) | bow-refined (docs/concepts.md)")
    p.add_argument("--threshold", type=float, default=None, help="certainty threshold in [0,1] (default: per similarity)")
    p.add_argument("--strengths", default=None, help="comma-separated traversal values (default -3,-1.5,0,1.5,3)")
    p.add_argument("--latents", default=None, help="comma-separated latent indices to explain (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base latents")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, mps")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--force", action="store_true", help="overwrite a run with other settings in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    r = p.add_argument_group("rank, then explain (captum); see docs/captum.md")
    r.add_argument("--rank-by", default=None, metavar="METHOD", help="captum.attr method that ranks the latents by a score: IntegratedGradients, Saliency, FeatureAblation, 'NoiseTunnel(IntegratedGradients)', ...")
    r.add_argument("--score", default=None, help="score of the generated image to attribute: mean | red | green | blue | contrast | MODULE:FUNC (images (B,C,H,W) -> (B,)); default mean")
    r.add_argument("--top-k", type=int, default=None, metavar="K", help="explain only the K latents the score depends on most (needs --rank-by)")
    p.add_argument("--property", default=None, metavar="TEXT", help="the labelled property a conditional direction is tied to (conditional bias), e.g. smiling")
    p.add_argument("--prompt-from-llm", action="store_true", help="let the selected language-model backend write the prompt from the bias formula")
    g = p.add_argument_group("language-model backends (openai:MODEL, hf:PATH_OR_ID); see docs/backends.md")
    g.add_argument("--base-url", default=None, metavar="URL", help="OpenAI-compatible API root (default https://api.openai.com/v1; Ollama: http://localhost:11434/v1)")
    g.add_argument("--api-key-env", default=None, metavar="NAME", help="environment variable that holds the API key (default OPENAI_API_KEY)")
    g.add_argument("--concurrency", type=int, default=None, metavar="N", help="most requests in flight at once (openai; default 8)")
    g.add_argument("--timeout", type=float, default=None, metavar="S", help="deadline in seconds of one whole HTTP request, body included (openai; default 60)")
    g.add_argument("--max-retries", type=int, default=None, metavar="N", help="retries after 429/5xx/timeouts/dropped connections (openai; default 4)")
    g.add_argument("--dtype", default=None, help="hf model dtype: float32 | float16 | bfloat16 (default float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N", help="most tokens per answer (openai: max_tokens, default 200; hf: default 120)")
    g.add_argument("--cache-dir", default=None, metavar="DIR", help="response cache directory (default ~/.cache/latentexplainer/responses, or under $XDG_CACHE_HOME)")
    g.add_argument("--no-cache", action="store_true", help="neither read nor write the response cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentexplainer", description="Explain what the latents of a generative model mean.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="explain every latent of the shipped demo VAE (offline)")
    _add_explain_options(p, "latentexplainer-demo")

    p = sub.add_parser("explain", help="explain the latents of a model")
    p.add_argument("--model", required=True,
                   help="model directory (train-vae output), hub id, or a generator in code: path/to/file.py:factory "
                        "or package.module:factory (a function returning an nn.Module whose forward(z) gives images)")
    p.add_argument("--adapter", default=None,
                   help="vae (default for directories) | generator (default for file.py:factory) | ddpm | sd | a plugin's adapter")
    p.add_argument("--latent-dim", type=int, default=None,
                   help="latent size of a generator that does not tell (no latent_dim/z_dim/nz attribute)")
    p.add_argument("--site", default=None, help="latent site, e.g. decoder.input or mid_block.output (default: per architecture)")
    p.add_argument("--data", default=None, help="npz with images (and factors) to measure KL and captured factors")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept a pickle checkpoint (.pt/.bin) when the model has no safetensors; read with torch.load(weights_only=True)")
    d = p.add_argument_group("diffusion models (--adapter ddpm | sd); see docs/diffusion.md")
    d.add_argument("--direction", default=None, help="direction finder: ddpm/sd h-space: pca (default) | pullback | conditional (needs --data); "
                   "generator latent space: sefa | ganspace (default: the latent axes); a plugin's; a directions .safetensors file")
    d.add_argument("--n-directions", type=int, default=None, metavar="K", help="directions to find (default 8; conditional: one per binary factor)")
    d.add_argument("--steps", type=int, default=50, help="denoising steps per image (default 50)")
    d.add_argument("--t-edit", type=int, default=None, help="edit h on every step with timestep t >= T (default: half the training timesteps)")
    d.add_argument("--edit-scale", default="auto", help="h <- h + strength * scale * v; auto: scale = std of <h, v> over 16 samples (default)")
    d.add_argument("--prompt", default=None, help="sd: the prompt every image is generated from (default 'a photograph')")
    d.add_argument("--guidance-scale", type=float, default=7.5, help="sd: classifier-free guidance weight (default 7.5; <= 1: none)")
    _add_explain_options(p, None)

    p = sub.add_parser("train-vae", help="train a beta-TCVAE on an npz of images",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_VAE_EPILOG)
    p.add_argument("--data", required=True, help="npz with images (N,H,W,3) uint8, optional factors and factor_names")
    p.add_argument("--out", required=True, help="directory for config.json and model.safetensors")
    p.add_argument("--latents", type=int, default=10, help="latent dimensions (default 10)")
    p.add_argument("--steps", type=int, default=DEFAULT_TRAIN_STEPS, help=f"optimiser steps (default {DEFAULT_TRAIN_STEPS})")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate, cosine-decayed to 5%% (default 1e-3)")
    p.add_argument("--beta", type=float, default=None,
                   help="weight of the total-correlation term (Chen et al. 2018); default: from --beta-norm")
    p.add_argument("--beta-norm", type=float, default=0.005,
                   help="normalised beta (Higgins et al. 2017): beta = max(1, beta_norm * H*W*C / latents); "
                        "default 0.005 (6.1 for 64x64 RGB, 10 latents)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="KL warm-up: the KL/TC weight rises 0 -> 1 over these steps (Bowman et al. 2016, "
                        "Sønderby et al. 2016); default a quarter of --steps; 0: off")
    p.add_argument("--free-bits", type=float, default=1.0,
                   help="nats per latent whose KL is free (Kingma et al. 2016), faded out (see --free-bits-steps); default 1; 0: off")
    p.add_argument("--free-bits-steps", type=int, default=None,
                   help="free bits held for the first half of these steps, then linearly to 0 here; default 0.8 x --steps; 0: never faded")
    p.add_argument("--capacity", type=float, default=0.0,
                   help="capacity annealing C_max in nats (Burgess et al. 2018): the KL is pulled to C(t); default 0 (off)")
    p.add_argument("--capacity-steps", type=int, default=None, help="steps over which C(t) rises to C_max (default: half of --steps)")
    p.add_argument("--capacity-weight", type=float, default=100.0, help="gamma of |KL - C(t)| (default 100)")
    p.add_argument("--recon-scale", type=float, default=1.0,
                   help="multiplies the Bernoulli log-likelihood; > 1 weighs reconstruction more (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; default 0: the cores not already busy (1 or 2 on 2 cores)")
    p.add_argument("--stop-on-collapse", action="store_true", help="stop early when most latents collapsed after the warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("train-demo", help="regenerate the shipped demo weights (seeded, reproducible)")
    p.add_argument("--out", default=None, help="where to write them (default: the package's demo/weights)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("make-data", help="write a procedural shapes dataset as npz")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="shapes", choices=("shapes", "shapes2", "shapes3"),
                   help="shapes: the demo's data; shapes2: other shapes, a tinted gradient background, other ranges; "
                        "shapes3: ellipse/cross/triangle, pastel colours, a cool gradient darker at the top, wider ranges")

    p = sub.add_parser("evaluate", help="explain a VAE, then score the explanations against the data's ground-truth factors")
    p.add_argument("--model", required=True, help="VAE directory (train-vae output)")
    p.add_argument("--data", required=True, help="npz with images, factors (N,K) and factor_names")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickle checkpoint when the model has no safetensors")
    p.add_argument("--max-images", type=int, default=5000, help="images used for KL, factors and disentanglement metrics (seeded subsample; default 5000)")
    _add_explain_options(p, None)

    p = sub.add_parser("calibrate", help="learn certainty thresholds from evaluated runs (per backend and similarity)")
    p.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="run directories holding evaluation.json")
    p.add_argument("--out", default=None, help="thresholds file (default $XDG_CONFIG_HOME/latentexplainer/thresholds.json)")

    sub.add_parser("plugins", help="list registered adapters, backends, biases and direction finders")
    return parser


def _parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    return values


def _parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated integers, got {text!r}") from None


def check_reachable(url: str, timeout: float = 5.0) -> None:
    """Open and close a TCP connection to the server of ``url`` (no request, no key sent), so an
    unreachable server fails before any model is loaded. Skipped when a proxy is configured."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    from .backends.openai_compat import redact_url

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


def check_device(device: str) -> str:
    from .devices import check_device as check

    try:
        return check(device, flag="--device")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _validate_explain(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be checked before loading a model or calling a backend."""
    from .adapters.base import check_strengths
    from .components import parse_backend_spec
    from .plugins import UnknownComponentError, registry
    from .uncertainty import get_similarity

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
        from .ranking import check_cli_options

        check_cli_options(getattr(args, "rank_by", None), getattr(args, "score", None), getattr(args, "top_k", None))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # language-model backends: every flag is checked here, before any model load or request
    from urllib.parse import urlsplit

    from .backends.base import BackendError
    from .backends.hf import check_vlm_dir, resolve_dtype
    from .backends.openai_compat import check_env_name, redact_url

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
                from .adapters.loading import check_pickle_policy

                check_pickle_policy(Path(backend_arg).expanduser(), getattr(args, "allow_pickle", False), "VLM")
            elif not Path(backend_arg).expanduser().exists():
                from .backends.hf import check_hub_model

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
    from .adapters.base import DEFAULT_STRENGTHS
    from .attribution import LatentExplainer
    from .run import explain_to_dir, summarize

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
        from .ranking import cli_plan  # --rank-by/--score/--top-k, and the heat maps of the report

        targets, extras, ranked = cli_plan(explainer, args.out, getattr(args, "rank_by", None), getattr(args, "score", None),
                                           getattr(args, "top_k", None), targets)
        header = header | ranked
        if getattr(args, "prompt_from_llm", False):
            from .biases.from_llm import prompt_from_llm

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
    from .demo import demo_data, load_demo_model
    from .run import latent_stats

    model = load_demo_model(device="cpu")
    data = demo_data()
    stats = latent_stats(model, data["images"], data["factors"], [str(n) for n in data["factor_names"]])
    return _explain(args, model.to(args.device), "vae", {"model": "latentexplainer demo VAE (shapes, 10 latents)"}, stats, checked)


def _explain_diffusion(args: argparse.Namespace, checked: dict[str, Any], data: dict[str, Any] | None) -> int:
    """--adapter ddpm|sd: load UNet + DDIM scheduler (sd: + VAE, text encoder), find (or on --resume reload)
    h-space directions, save them to OUT/directions.safetensors, explain."""
    from .adapters.diffusion import find_directions, labelled_images, resolve_direction_spec
    from .directions import Directions
    from .plugins import registry

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
    from .adapters.diffusion import find_directions, resolve_direction_spec
    from .adapters.generator import GeneratorAdapter

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
    from .adapters.generator import is_code_spec

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
    from .data import load_npz
    from .run import latent_stats

    data = load_npz(args.data) if args.data else None
    if args.adapter in ("ddpm", "sd"):
        return _explain_diffusion(args, checked, data)
    from .adapters.vae import load_vae

    model_path = Path(args.model)
    options: dict[str, Any] = {}
    if args.adapter == "generator":
        from .adapters.generator import load_generator

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


def cmd_train_vae(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .data import load_npz
    from .models.conv_vae import ConvVAEConfig
    from .models.training import beta_from_normalized, default_train_config, latent_report, train_vae

    if args.steps < 1 or args.latents < 1 or args.batch_size < 2:
        raise UsageError("--steps and --latents must be >= 1 and --batch-size >= 2")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; give a new or existing directory for the model")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise UsageError(f"--out {out}: {probe} is a file, so no directory can be made under it")
    if not os.access(probe, os.W_OK):
        raise UsageError(f"--out {out}: {probe} is not writable")
    data = load_npz(args.data)
    images = data["images"]
    try:
        mcfg = ConvVAEConfig(latent_dim=args.latents, image_size=images.shape[1], channels=images.shape[3])
        beta = args.beta if args.beta is not None else beta_from_normalized(args.beta_norm, mcfg.image_size, mcfg.channels, mcfg.latent_dim)
        overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "beta": beta, "seed": args.seed,
                     "free_bits": args.free_bits, "capacity": args.capacity, "capacity_weight": args.capacity_weight,
                     "recon_scale": args.recon_scale, "threads": args.threads, "stop_on_collapse": args.stop_on_collapse,
                     "capacity_steps": args.capacity_steps if args.capacity_steps is not None else args.steps // 2}
        if args.free_bits_steps is not None:
            overrides["free_bits_steps"] = args.free_bits_steps
        if args.warmup_steps is not None:
            overrides["warmup_steps"] = args.warmup_steps
        cfg = default_train_config(mcfg.image_size, mcfg.channels, mcfg.latent_dim, **overrides)
    except ValueError as exc:
        raise UsageError(f"{exc}") from None
    started = time.perf_counter()
    model, history = train_vae(images, mcfg, cfg, progress=not args.quiet)
    seconds = time.perf_counter() - started
    report = latent_report(model, images, data.get("factors"), data.get("factor_names"), seed=args.seed)
    training = asdict(cfg) | {"beta_norm": args.beta_norm if args.beta is None else None, "data": str(args.data),
                              "threads_used": history[-1]["threads"], "seconds": round(seconds, 1),
                              "steps_per_second": round(history[-1]["step"] / max(history[-1]["seconds"], 1e-9), 2),
                              "stopped_early": history[-1]["stopped_early"], "final": history[-1]} | report
    extra = {"training": training}
    if "factor_names" in data:
        extra["factor_names"] = data["factor_names"]
    model.save_pretrained(out, extra=extra)
    _print_latent_report(report)
    print(f"saved {out} ({history[-1]['step'] + 1} steps in {seconds / 60:.1f} min, {training['threads_used']} thread(s); "
          f"final loss {history[-1]['loss']:.1f})")
    if report["warning"]:
        bar = "!" * 78
        print(f"{bar}\nlatentexplainer train-vae: warning: {report['warning']}\n{bar}", file=sys.stderr)
    return 0


def _print_latent_report(report: dict[str, Any]) -> None:
    captured = {c["latent"]: c for c in report.get("captured", [])}
    print(f"active latents (KL > {report['kl_active_threshold']} nats): {report['n_active']} of "
          f"{len(report['kl_per_latent'])}: {', '.join(f'z{i}' for i in report['active_latents']) or 'none'}")
    for i, kl in enumerate(report["kl_per_latent"]):
        line = f"  z{i}: KL {kl:7.3f} nats  {'active' if i in report['active_latents'] else 'collapsed'}"
        if i in captured:
            c = captured[i]
            line += f"  captures {c['factor']} (NMI {c['nmi']:.2f})" if c["factor"] else "  captures nothing"
        print(line)
    if "captured_factors" in report:
        print(f"factors captured: {len(report['captured_factors'])}: {', '.join(report['captured_factors']) or 'none'}")


def cmd_train_demo(args: argparse.Namespace) -> int:
    from .demo import WEIGHTS_DIR
    from .demo.build import build_demo

    out = Path(args.out) if args.out else WEIGHTS_DIR
    report = build_demo(out, steps=args.steps, progress=not args.quiet)
    print(json.dumps(report, indent=2))
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    import numpy as np

    if args.dataset == "shapes2":
        from .data.shapes2 import make_dataset
    elif args.dataset == "shapes3":
        from .data.shapes3 import make_dataset
    else:
        from .data.shapes import make_dataset

    if args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    # numpy adds .npz to a name without it; say (and check) the path really written.
    if not str(args.out).strip():
        raise UsageError("--out must name the .npz file to write, got ''")
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a directory; give a file name, e.g. {Path(args.out) / 'shapes.npz'}")
    out = Path(args.out if str(args.out).endswith(".npz") else f"{args.out}.npz")
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name, e.g. {out / 'shapes.npz'}")
    # a missing directory is created (like train-vae and explain create theirs); a file in the way is refused
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UsageError(f"--out {out}: {blocker} is a file, so no directory can be made under it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create {out.parent} ({exc.strerror or exc})") from None
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"--out {out}: {out.parent} is not writable")
    from . import safe_io

    try:
        safe_io.check_target(out)  # a link or special file at --out: refused before generating anything
        arrays = make_dataset(args.n, seed=args.seed)
        # streamed into a no-follow temp file renamed over `out` (numpy would follow a link at `out`)
        with safe_io.atomic_writer(out) as f:
            np.savez_compressed(f, **arrays)
    except safe_io.UnsafePathError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {out} ({args.n} images)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.harness import cli_evaluate

    return cli_evaluate(args, cmd_explain, build_parser, UsageError)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .evaluation.harness import cli_calibrate

    return cli_calibrate(args, UsageError)


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import KINDS, registry

    for kind in KINDS:
        reg = registry(kind)
        print(f"{kind}:")
        for name in reg.names():
            e = reg.entries[name]
            print(f"  {name:<16} {e.distribution} ({e.plugin})")
        for kept, dropped in reg.conflicts:
            print(f"  ! {dropped.name} from {dropped.distribution} ignored: name taken by {kept.distribution}")
    return 0


COMMANDS = {"demo": cmd_demo, "explain": cmd_explain, "train-vae": cmd_train_vae, "train-demo": cmd_train_demo,
            "make-data": cmd_make_data, "plugins": cmd_plugins, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate}


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (a job scheduler, `kill`) ends a run like Ctrl-C: marked, resumable


#: Integer options -> (lowest, highest) allowed (None: checked by the command, with its own message).
#: Upper bounds keep absurd values (``--seed 2**70``, ``--samples 10**9``) from overflowing or running forever.
INT_LIMITS: dict[str, tuple[int | None, int | None]] = {
    "seed": (0, 2**63 - 1), "samples": (None, 1000), "n": (None, 1_000_000), "latents": (None, 4096),
    "batch_size": (None, 65536), "steps": (None, 10_000_000), "n_directions": (None, 4096), "top_k": (None, 1_000_000),
    "concurrency": (None, 1024), "max_retries": (None, 100), "max_new_tokens": (None, 1_000_000),
    "max_images": (None, 10_000_000), "threads": (None, 1024),
}
INT_DEFAULT_LIMITS = (-(2**31 - 1), 2**31 - 1)


def check_out(args: argparse.Namespace) -> None:
    """``--out ''`` (or only spaces) would silently mean the current directory: refuse it."""
    out = getattr(args, "out", None)
    if out is not None and not str(out).strip():
        raise UsageError(f"--out {out!r} is empty; give the path to write to, e.g. --out runs/demo")


def check_int_limits(args: argparse.Namespace) -> None:
    """Refuse integer options outside the range this program can handle (see :data:`INT_LIMITS`)."""
    for dest, value in vars(args).items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        lo, hi = INT_LIMITS.get(dest, INT_DEFAULT_LIMITS)
        flag = "--" + dest.replace("_", "-")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            allowed = f"an integer in [{lo}, {hi}]" if lo is not None else f"at most {hi}"
            raise UsageError(f"{flag} must be {allowed}, got {value}")


class _PipeSafeStdout:
    """Wraps stdout: once the reader has gone (``latentexplainer plugins | head -1``), further output
    is dropped instead of raising BrokenPipeError, so the command ends quietly with its own exit code."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._broken = False

    def _drop(self) -> None:
        self._broken = True
        try:  # the interpreter flushes the real stdout at exit: send what is buffered to /dev/null
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # not a real file (captured by a test harness)

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """Plugin warnings as one plain line on stderr (no source location: it is not the user's code)."""
    print(f"latentexplainer: warning: {message}", file=sys.stderr)


EXIT_INTERNAL_ERROR = 3


def _internal_error(command: str, exc: BaseException, args: argparse.Namespace | None = None) -> int:
    """A bug, not bad input: one line on stderr, the full traceback in a file, exit code 3."""
    import tempfile
    import traceback

    import re

    secrets = [v for v in (os.environ.get(n, "") for n in {"OPENAI_API_KEY", getattr(args, "api_key_env", None) or ""} if n)
               if len(v) >= 8]

    def scrub(text: str) -> str:  # credentials in URLs and the API key never reach the screen or the file
        text = re.sub(r"(\w+://)[^/\s@:]+:[^/\s@]*@", r"\1***@", text)
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    summary = scrub(str(exc).strip().splitlines()[0][:300]) if str(exc).strip() else ""
    where = "could not be written"
    try:
        fd, path = tempfile.mkstemp(prefix="latentexplainer-crash-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write(scrub(f"latentexplainer {command}: {' '.join(sys.argv[1:])}\n\n"))
            f.write(scrub("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
        where = f"written to {path}"
    except OSError:
        pass
    cause = ("This looks like a problem of this machine (disk, memory, permissions), not of your input"
             if isinstance(exc, (OSError, MemoryError)) else "This is a bug in latentexplainer, not in your input")
    print(f"latentexplainer {command}: internal error: {type(exc).__name__}{': ' + summary if summary else ''}\n"
          f"{cause}; the full traceback was {where} (please attach it to a bug report).", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import warnings

    from .backends.base import BackendError, FatalBackendError
    from .plugins import PluginWarning
    from .safe_load import LoadError
    from .store import RunStoreError

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    real_stdout, stdout = sys.stdout, _PipeSafeStdout(sys.stdout)
    sys.stdout = stdout  # type: ignore[assignment]
    warning_state = warnings.catch_warnings()
    warning_state.__enter__()
    default_show = warnings.showwarning
    warnings.showwarning = lambda m, c, *a, **k: (_show_warning if issubclass(c, PluginWarning) else default_show)(m, c, *a, **k)
    try:
        check_int_limits(args)
        check_out(args)
        return COMMANDS[args.command](args)
    except (UsageError, LoadError, RunStoreError, BackendError) as exc:
        print(f"latentexplainer {args.command}: error: {exc}", file=sys.stderr)
        out = getattr(args, "out", None)
        if isinstance(exc, FatalBackendError) and out and (Path(out) / "results.json").is_file():
            print(f"Finished latents are saved in {out}; fix the cause, then rerun the same command with --resume.",
                  file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        started = bool(out) and (Path(out) / "results.json").is_file()  # else it stopped before the run began
        hint = f" Finished latents are saved in {out}; rerun the same command with --resume to continue." if started else ""
        print(f"\nlatentexplainer {args.command}: interrupted.{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - anything else is a bug: summarise, keep the traceback, exit 3
        return _internal_error(args.command, exc, args)
    finally:
        stdout.flush()
        sys.stdout = real_stdout
        warning_state.__exit__(None, None, None)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
