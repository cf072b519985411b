"""LatentLens vs EmbeddingLens vs LogitLens on the shipped demo VLM's visual tokens, per layer,
scored against the renderer's truth (docs/vlm.md, "Lenses for visual tokens").

    nice -n 10 python benchmarks/bench_vlm_lens.py            # 2000 bank captions, 200 held-out images
    nice -n 10 python benchmarks/bench_vlm_lens.py --probe    # plus a linear probe per attribute and layer
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentexplainer_plugin.data.shapes import make_dataset
from latentexplainer_plugin.vlm import ATTRIBUTES, WEIGHTS_DIR, caption_from_factors, factor_words, load_demo_vlm
from latentexplainer_plugin.vlm.evaluate import HELD_OUT_SEED
from latentexplainer_plugin.vlm.lens import (attribute_hit_rate, build_context_bank,
                                             embedding_lens, image_hidden_states, latent_lens, logit_lens,
                                             patch_labels, random_top_tokens)

OBJECT_ATTRIBUTES = ("size", "colour", "shape", "vertical", "horizontal")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bank", type=int, default=2000, help="captions of training images (seed 0) in the bank")
    ap.add_argument("--images", type=int, default=200, help="held-out images (seed 7000001)")
    ap.add_argument("--contexts", type=int, default=50, help="max contexts per token string")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--prefix", default="", help="text before every bank caption (e.g. the chat up to 'assistant:')")
    ap.add_argument("--probe", action="store_true",
                    help="also: is each attribute linearly decodable from the object patches' mean state? "
                         "(logistic regression trained on 600 training images, seed 0, tested on the held-out images)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model, processor = load_demo_vlm(WEIGHTS_DIR)
    corpus = caption_from_factors(make_dataset(args.bank, seed=0)["factors"])
    bank = build_context_bank(model, processor, corpus, max_contexts_per_token=args.contexts, prefix=args.prefix)
    held = make_dataset(args.images, seed=HELD_OUT_SEED, masks=True)
    states = image_hidden_states(model, processor, held["images"])  # (L+1, N, P, D)
    n_layers1, n, p, d = states.shape
    obj, bg = patch_labels(held["masks"])
    words = factor_words(held["factors"])
    obj_truth = [frozenset(w[a] for a in OBJECT_ATTRIBUTES) for w in words for _ in range(p)]
    bg_truth = [frozenset([w["background"]]) for w in words for _ in range(p)]
    lm = model.model.language_model
    tok = processor.tokenizer
    emb = model.get_input_embeddings().weight.detach()
    model_vocab = [w for i, w in enumerate(tok.convert_ids_to_tokens(list(range(emb.shape[0]))))
                   if i not in set(tok.all_special_ids)]
    print(f"bank: {len(bank.tokens)} contexts, {len(bank.vocabulary)} token strings, layers {bank.layers}; "
          f"model vocabulary without special tokens: {len(model_vocab)} words; held-out: {n} images, "
          f"{int(obj.sum())} object patches, {int(bg.sum())} background patches; top-{args.top_k}")
    sel_o, sel_b = obj.reshape(-1), bg.reshape(-1)
    tops_by_layer = []
    for layer in range(n_layers1):
        q = states[layer].reshape(n * p, d)
        tops_by_layer.append([latent_lens(q, bank, args.top_k), embedding_lens(q, emb, tok, args.top_k),
                              logit_lens(q, lm.norm, model.lm_head, tok, args.top_k)])
    reps = 20  # random draws per patch for the chance columns

    def chance(vocab: list[str], truth: list, sel: np.ndarray, strict: bool) -> float:
        rows = random_top_tokens(vocab, len(truth) * reps, args.top_k, seed=0)
        return attribute_hit_rate(rows, truth * reps, np.tile(sel, reps), ATTRIBUTES if strict else None)

    for strict in (False, True):
        attrs = ATTRIBUTES if strict else None
        print()
        print("strict (exactly one word of an attribute, and it is true)" if strict
              else "any true word in the top-k (the brief's metric)")
        print("| layer | LatentLens obj | EmbeddingLens obj | LogitLens obj | chance obj bank/model vocab "
              "| LatentLens bg | EmbeddingLens bg | LogitLens bg | chance bg bank/model vocab |")
        print("|---|---|---|---|---|---|---|---|---|")
        c_o = [chance(v, obj_truth, sel_o, strict) for v in (bank.vocabulary, model_vocab)]
        c_b = [chance(v, bg_truth, sel_b, strict) for v in (bank.vocabulary, model_vocab)]
        for layer, tops in enumerate(tops_by_layer):
            o = [attribute_hit_rate(t, obj_truth, sel_o, attrs) for t in tops]
            b = [attribute_hit_rate(t, bg_truth, sel_b, attrs) for t in tops]
            print(f"| {layer} | " + " | ".join(f"{x:.3f}" for x in o) + f" | {c_o[0]:.3f} / {c_o[1]:.3f} | "
                  + " | ".join(f"{x:.3f}" for x in b) + f" | {c_b[0]:.3f} / {c_b[1]:.3f} |")
    if args.probe:
        probe(model, processor, held, states, obj)
    print(f"({time.time() - t0:.0f} s)")


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
