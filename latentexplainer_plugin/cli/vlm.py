"""``latentexplainer train-demo-vlm`` (rebuild the demo VLM, a tiny LLaVA captioning the shapes data) and
``latentexplainer demo-vlm`` (the multimodal demo, offline)."""

from __future__ import annotations

import argparse
import json


def cmd_train_demo_vlm(args: argparse.Namespace) -> int:
    from ..vlm import WEIGHTS_DIR, train_demo_vlm

    report = train_demo_vlm(args.out or WEIGHTS_DIR, steps=args.steps, seed=args.seed, progress=not args.quiet,
                            n_eval=args.eval_images)
    accuracy = (report.get("evaluation") or {}).get("accuracy") or {}
    for attribute, row in accuracy.items():  # measured on the model reloaded from disk
        print(f"  {attribute:<11} caption accuracy {row['accuracy']:.3f}  (chance {row['chance']:.3f})")
    print(json.dumps({k: v for k, v in report.items() if k not in ("history", "evaluation")}, indent=2, default=str))
    return 0


def cmd_demo_vlm(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..vlm.demo import LENSES, run_demo_vlm

    for flag in ("caption_images", "lens_images", "bank_captions", "top_k", "sae_steps", "feature_train_images",
                 "feature_images"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be an integer >= 1, got {getattr(args, flag)}")
    if args.sae_features < 0:
        raise UsageError(f"--sae-features must be an integer >= 0 (0: skip the SAE section), got {args.sae_features}")
    if args.model is not None and not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model} is not a directory; give a demo-VLM directory "
                         "(written by latentexplainer train-demo-vlm --out DIR) or leave --model out for the shipped one")
    data = run_demo_vlm(args.out, model_dir=args.model, caption_images=args.caption_images, lens_images=args.lens_images,
                        bank_captions=args.bank_captions, top_k=args.top_k, sae_features=args.sae_features,
                        sae_steps=args.sae_steps, feature_train_images=args.feature_train_images,
                        feature_images=args.feature_images)
    for attribute, row in data["captions"]["accuracy"].items():
        print(f"  {attribute:<11} caption accuracy {row['accuracy']:.3f}  (chance {row['chance']:.3f})")
    chance = data["lenses"]["chance"]["object"]
    print(f"  object patches naming a true attribute, any / strict (chance {chance['any']:.3f} / {chance['strict']:.3f}):")
    for row in data["lenses"]["layers"]:
        cells = "  ".join(f"{lens} {row['object'][lens]['any']:.3f} / {row['object'][lens]['strict']:.3f}" for lens in LENSES)
        print(f"    layer {row['layer']}: {cells}")
    if data["features"]:
        s = data["features"]["summary"]
        print(f"  SAE features at {data['features']['sae']['site']}: {s['live']} live, {s['dead']} dead, {s['dense']} dense; "
              f"{s['follow_an_attribute']} follow an attribute; steering changes it most for "
              f"{s['steering_changes_the_followed_attribute']}; IoU median {s['iou_median']}; from examples: "
              f"{s['examples_clear_among_followers']} clear, {s['examples_naming_the_followed_attribute']} naming it, "
              f"{s['examples_clear_among_non_followers']} clear among the others")
        if "self_examples_clear_among_followers" in s:
            print(f"  explained by the demo VLM itself (captions): {s['self_examples_clear_among_followers']} clear among "
                  f"followers, {s['self_examples_naming_the_followed_attribute']} naming it, "
                  f"{s['self_examples_clear_among_non_followers']} clear among the others; "
                  f"{s['self_and_offline_agree']} agree with the offline explainer")
    out = Path(args.out)
    print(f"wrote {out / 'results.json'} and {out / 'report.html'} in {data['seconds']:.0f} s")
    return 0
