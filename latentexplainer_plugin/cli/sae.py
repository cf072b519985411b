"""``latentexplainer sae-train``: collect a model's activations at a site and train a TopK SAE on them.

The activations come from the model's own sampling: the adapter's base latents (z ~ N(0, I) for a VAE
or generator, initial noises for a sampling loop) rendered through its driver, streamed to shards
under OUT/activations. In a sampling loop every step's call of the site is kept (SAeUron trains over
many timesteps), and under classifier-free guidance only the conditional half of the batch. The SAE is written
to OUT in SAELens layout, ready for ``latentexplainer explain --model M --sae OUT``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError


def cmd_sae_train(args: argparse.Namespace) -> int:
    from ..components import get_adapter
    from ..plugins import hook
    from ..types import Site

    for flag, value, low in (("--n-features", args.n_features, 1), ("-k", args.k, 1), ("--steps", args.steps, 1),
                             ("--samples", args.samples, 2), ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.k > args.n_features:
        raise UsageError(f"-k ({args.k}) cannot exceed --n-features ({args.n_features})")
    from .routing import route, select_component, validate

    name = args.adapter or hook().latentexplainer_adapter_for(model=str(args.model))
    selected = select_component("adapter", "adapters", name)
    route([selected], {}, list(args.options or []), {"device": args.device})
    validate([selected])  # -o options checked against the adapter's declaration before it loads
    try:
        adapter = get_adapter(str(args.model), name, **selected.options)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--model {args.model}: {exc}") from None
    driver = getattr(adapter, "driver", None)
    if driver is None:
        raise UsageError(f"the {name} adapter has no driver module to collect activations from")
    site = Site.parse(args.site) if args.site else adapter.site
    if args.update:  # the SAE's hook name says where it reads: steering edits the same update site
        site = Site(site.path, "update")
    from ..sae.collect import collect_from_adapter
    from ..sae.train import train_sae

    out = Path(args.out)
    bases = adapter.sample_bases(args.samples, seed=args.seed)
    try:
        collect_from_adapter(adapter, site, bases, out / "activations", batch_size=args.batch_size, update=args.update)
        sae, report = train_sae(out / "activations", args.n_features, args.k, args.steps, seed=args.seed,
                                out_dir=out, site=str(site))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    m = report.metrics
    print(f"SAE at {site}: {report.d_in} -> {report.d_sae} features, k={report.k}, {report.steps} steps in {report.seconds:.1f} s")
    print(json.dumps({k: m.get(k) for k in ("fvu", "l0", "n_dead", "n_dense") if k in m} or m, default=str))
    print(f"wrote {out} (SAELens layout); explain its features with: latentexplainer explain --model {args.model} --sae {out}")
    return 0
