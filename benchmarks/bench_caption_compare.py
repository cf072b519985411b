"""The hf backend's caption-then-compare mode on the demo VAE's traversals, with the shipped demo VLM
as the explainer (a captioner that cannot compare frames), judged against the ground-truth factors.

Per latent: the factor it captures (truth: mutual information on held-out images, active latents
only), the agreed explanation, whether it is clear, the factor most answers' first claim names
(claim attribute -> factor: horizontal_position -> x_position, vertical_position -> y_position, size -> scale,
colour -> hue, shape -> shape, background_brightness -> background), and, as a second opinion, the
factor the automatic judge (``evaluation.judge.FactorJudge``, sentence embeddings) reads in the
explanation, and the factors more than half of the answers name in any claim.

    nice -n 10 python benchmarks/bench_caption_compare.py            # 5 answers per latent
    nice -n 10 python benchmarks/bench_caption_compare.py --samples 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

CLAIM_FACTOR = {"horizontal_position": "x_position", "vertical_position": "y_position", "size": "scale",
                "colour": "hue", "shape": "shape", "background_brightness": "background"}


def claimed_factor(responses) -> str | None:
    """The factor most answers' first claim names (None when no answer makes a claim)."""
    firsts = [CLAIM_FACTOR.get(r.meta["claims"][0]["attribute"]) for r in responses
              if r.ok and r.meta.get("claims")]
    return Counter(firsts).most_common(1)[0][0] if firsts else None


def mentioned_factors(responses) -> list[str]:
    """The factors named (in any claim) by more than half of the valid answers."""
    valid = [r for r in responses if r.ok]
    counts = Counter(f for r in valid for f in {CLAIM_FACTOR.get(c["attribute"]) for c in r.meta.get("claims", [])} if f)
    return sorted(f for f, k in counts.items() if 2 * k > len(valid))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, default=5, help="answers per latent (one per base)")
    ap.add_argument("--held-out", type=int, default=2000, help="held-out images for the latent-factor truth")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()

    from latentexplainer_plugin import LatentExplainer
    from latentexplainer_plugin.attribution import most_active_other
    from latentexplainer_plugin.backends.hf import HFBackend
    from latentexplainer_plugin.demo import demo_data, load_demo_model
    from latentexplainer_plugin.run import KL_ACTIVE, latent_stats
    from latentexplainer_plugin.vlm import WEIGHTS_DIR

    model = load_demo_model()
    data = demo_data(args.held_out)
    stats = latent_stats(model, data["images"], data["factors"], list(data["factor_names"]))
    truth = {i: (m.factor if stats.kl[i] > KL_ACTIVE else None) for i, m in enumerate(stats.factors)}
    backend = HFBackend(str(WEIGHTS_DIR), mode="caption_compare", max_new_tokens=16)
    explainer = LatentExplainer(model, backend=backend, samples=args.samples, clamp=most_active_other(stats.kl))
    results = explainer.attribute()
    from latentexplainer_plugin.evaluation.judge import FactorJudge

    judge = FactorJudge(list(data["factor_names"]))
    rows = []
    for r in results:
        factor = truth[r.index]
        named = claimed_factor(r.responses)
        rows.append({"latent": r.id, "factor": factor, "kl": round(float(stats.kl[r.index]), 3),
                     "explanation": r.explanation, "clear": bool(r.clear),
                     "certainty": None if r.certainty is None else round(float(r.certainty), 3),
                     "claimed_factor": named, "right": factor is not None and named == factor,
                     "mentioned": mentioned_factors(r.responses),
                     "judged": judge.judge(r.explanation).factor if r.explanation else None,
                     "captions": r.responses[0].meta.get("captions")})
    seconds = time.time() - t0
    print(f"{'latent':7} {'factor':11} {'clear':5} {'cert':5} {'claimed':11} {'judged':11} {'mentioned':34} "
          f"explanation")
    for row in rows:
        cert = "-" if row["certainty"] is None else f"{row['certainty']:.2f}"
        print(f"{row['latent']:7} {str(row['factor']):11} {str(row['clear']):5} {cert:5} "
              f"{str(row['claimed_factor']):11} {str(row['judged']):11} {','.join(row['mentioned']) or '-':34} "
              f"{row['explanation']}")
    positives = [r for r in rows if r["factor"] is not None]
    negatives = [r for r in rows if r["factor"] is None]
    print(f"factor latents: {len(positives)}, named right: {sum(r['right'] for r in positives)}, "
          f"clear and right: {sum(r['right'] and r['clear'] for r in positives)}, "
          f"judge agrees: {sum(r['judged'] == r['factor'] for r in positives)}, "
          f"named by most answers: {sum(r['factor'] in r['mentioned'] for r in positives)}; "
          f"inactive latents clear: {sum(r['clear'] for r in negatives)} of {len(negatives)}; "
          f"caption generate calls: {backend.generate_calls}; {seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "seconds": seconds, "samples": args.samples}, f, indent=2)


if __name__ == "__main__":
    main()
