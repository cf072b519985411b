"""LatentLens vs EmbeddingLens vs LogitLens on the shipped demo VLM's visual tokens, per layer,
scored against the renderer's truth (docs/vlm.md, "Lenses for visual tokens").

    nice -n 10 python benchmarks/bench_vlm_lens.py            # 2000 bank captions, 200 held-out images
    nice -n 10 python benchmarks/bench_vlm_lens.py --probe    # plus a linear probe per attribute and layer

The scoring is ``vlm.lens_compare.compare_lenses`` (what ``latentexplainer demo-vlm`` runs at smaller sizes).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentexplainer_plugin.data.shapes import make_dataset
from latentexplainer_plugin.vlm import WEIGHTS_DIR, caption_from_factors, factor_words, load_demo_vlm
from latentexplainer_plugin.vlm.evaluate import HELD_OUT_SEED
from latentexplainer_plugin.vlm.lens import image_hidden_states, patch_labels
from latentexplainer_plugin.vlm.lens_compare import LENSES, OBJECT_ATTRIBUTES, compare_lenses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bank", type=int, default=2000, help="captions of training images (seed 0) in the bank")
    ap.add_argument("--images", type=int, default=200, help="held-out images (seed 7000001)")
    ap.add_argument("--contexts", type=int, default=50, help="max contexts per token string")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--prefix", default="", help="text before every bank caption (e.g. the chat up to 'assistant:')")
    ap.add_argument("--corpus", choices=("captions", "varied"), default="captions",
                    help="captions: the training captions (fixed word order); varied: the same words with the three "
                         "phrases and the two adjectives in a random (seeded) order")
    ap.add_argument("--probe", action="store_true",
                    help="also: is each attribute linearly decodable from the object patches' mean state? "
                         "(logistic regression trained on 600 training images, seed 0, tested on the held-out images)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, processor = load_demo_vlm(WEIGHTS_DIR)
    factors = make_dataset(args.bank, seed=0)["factors"]
    corpus = caption_from_factors(factors) if args.corpus == "captions" else varied_captions(factors)
    held = make_dataset(args.images, seed=HELD_OUT_SEED, masks=True)
    result = compare_lenses(model, processor, corpus, held["images"], held["masks"], held["factors"], top_k=args.top_k,
                            max_contexts_per_token=args.contexts, prefix=args.prefix)
    c = result["counts"]
    print(f"bank: {c['bank_contexts']} contexts, {c['bank_words']} token strings, layers {c['bank_layers']}; "
          f"held-out: {c['images']} images, {c['object_patches']} object patches, {c['background_patches']} background "
          f"patches; top-{args.top_k}")
    for metric, title in (("any", "any true word in the top-k (the brief's metric)"),
                          ("strict", "strict (exactly one word of an attribute, and it is true)")):
        print()
        print(title)
        print("| layer | " + " | ".join(f"{lens} obj" for lens in LENSES) + " | chance obj | "
              + " | ".join(f"{lens} bg" for lens in LENSES) + " | chance bg |")
        print("|---|" + "---|" * (2 * len(LENSES) + 2))
        for row in result["layers"]:
            o = " | ".join(f"{row['object'][lens][metric]:.3f}" for lens in LENSES)
            b = " | ".join(f"{row['background'][lens][metric]:.3f}" for lens in LENSES)
            print(f"| {row['layer']} | {o} | {result['chance']['object'][metric]:.3f} | {b} | "
                  f"{result['chance']['background'][metric]:.3f} |")
    if args.probe:
        states = image_hidden_states(model, processor, held["images"])
        probe(model, processor, held, states, patch_labels(held["masks"])[0])
    print(f"({time.time() - t0:.0f} s)")


def varied_captions(factors: np.ndarray, seed: int = 0) -> list[str]:
    """The caption words of each image, with its three phrases and its two adjectives in a random order."""
    rng = np.random.default_rng(seed)
    out = []
    for w in factor_words(factors):
        adjectives = [w["size"], w["colour"]]
        rng.shuffle(adjectives)
        parts = [f"a {adjectives[0]} {adjectives[1]} {w['shape']}", f"near the {w['vertical']} {w['horizontal']}",
                 f"on a {w['background']} background"]
        out.append(" ".join(parts[i] for i in rng.permutation(3)))
    return out


def probe(model, processor, held: dict, states: torch.Tensor, obj: np.ndarray, n_train: int = 600) -> None:
    """Held-out accuracy of a logistic-regression probe per attribute and layer on the mean state of
    each image's object patches, against the majority word's share."""
    from sklearn.linear_model import LogisticRegression

    def pooled(st: torch.Tensor, o: np.ndarray, factors: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        keep = [i for i in range(o.shape[0]) if o[i].any()]
        x = np.stack([st[:, i, torch.from_numpy(o[i])].mean(dim=1).numpy() for i in keep], axis=1)
        words = factor_words(factors)
        return x, [words[i] for i in keep]

    train = make_dataset(n_train, seed=0, masks=True)
    x_tr, w_tr = pooled(image_hidden_states(model, processor, train["images"]), patch_labels(train["masks"])[0],
                        train["factors"])
    x_te, w_te = pooled(states, obj, held["factors"])
    print()
    print(f"linear probe on the object patches' mean state ({x_tr.shape[1]} train / {x_te.shape[1]} test images)")
    print("| attribute | majority | " + " | ".join(f"layer {x}" for x in range(x_tr.shape[0])) + " |")
    print("|---|---|" + "---|" * x_tr.shape[0])
    for a in OBJECT_ATTRIBUTES:
        y_tr, y_te = [w[a] for w in w_tr], [w[a] for w in w_te]
        majority = max(y_te.count(v) for v in set(y_te)) / len(y_te)
        accs = [LogisticRegression(max_iter=2000).fit(x_tr[x], y_tr).score(x_te[x], y_te)
                for x in range(x_tr.shape[0])]
        print(f"| {a} | {majority:.2f} | " + " | ".join(f"{v:.2f}" for v in accs) + " |")


if __name__ == "__main__":
    main()
