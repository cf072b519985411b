"""``latentexplainer train-demo-vlm``: rebuild the demo VLM (a tiny LLaVA captioning the shapes data)."""

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
