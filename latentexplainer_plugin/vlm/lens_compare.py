"""LatentLens, EmbeddingLens and LogitLens side by side, per layer, scored against the renderer's truth.

The comparison of arXiv 2602.00462 with ground truth in place of its GPT judge: for every layer of
the language model, the share of object patches (at least half covered by the object) whose top-k
token strings name a true attribute of their image (size, colour, shape, position), and of
background patches that name the true background word. Two scores per lens:

* ``any``: some top-k string is a true word;
* ``strict``: for some attribute, the top-k strings name exactly one of its words and it is true
  (so a lens that always lists "small medium large" scores nothing for it).

Chance: the same score for ``top_k`` strings drawn uniformly from the bank's vocabulary
(``any`` exactly, ``strict`` by ``chance_draws`` seeded draws per patch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import VLMError
from .captions import ATTRIBUTES, factor_words
from .lens import (attribute_hit_rate, build_context_bank, chance_hit_rate, embedding_lens, image_hidden_states,
                   latent_lens, lens_modules, logit_lens, patch_labels, random_top_tokens)

__all__ = ["LENSES", "OBJECT_ATTRIBUTES", "compare_lenses"]

OBJECT_ATTRIBUTES = ("size", "colour", "shape", "vertical", "horizontal")
LENSES = ("latentlens", "embeddinglens", "logitlens")


def _rate(tops: list[list[str]], truth: list[frozenset[str]], select: np.ndarray) -> dict[str, float]:
    return {"any": attribute_hit_rate(tops, truth, select), "strict": attribute_hit_rate(tops, truth, select, ATTRIBUTES)}


def compare_lenses(model: Any, processor: Any, corpus: Sequence[str], images: np.ndarray, masks: np.ndarray,
                   factors: np.ndarray, *, top_k: int = 5, max_contexts_per_token: int = 50, patch: int = 8,
                   chance_draws: int = 20, prefix: str = "") -> dict[str, Any]:
    """Score the three lenses at every layer (0 = embedding output .. L) on ``images`` with their
    object ``masks`` and ``factors`` (the shapes renderer's). ``corpus``: texts of the contextual
    bank (e.g. captions of training images), each read after ``prefix``. Returns JSON-ready data: ``layers`` (one row per layer:
    ``{"layer", "object": {lens: {"any", "strict"}}, "background": ...}``), ``chance``, ``counts``."""
    if not isinstance(top_k, int) or top_k < 1:
        raise VLMError(f"top_k must be an integer >= 1, got {top_k!r}")
    if len(images) != len(masks) or len(images) != len(factors) or len(images) == 0:
        raise VLMError(f"images, masks and factors must be non-empty and of one length; got {len(images)}, "
                       f"{len(masks)}, {len(factors)}")
    bank = build_context_bank(model, processor, corpus, max_contexts_per_token=max_contexts_per_token, prefix=prefix)
    states = image_hidden_states(model, processor, images)  # (L+1, N, P, D)
    n_layers1, n, p, d = states.shape
    obj, bg = patch_labels(masks, patch=patch)
    if obj.shape[1] != p:
        raise VLMError(f"the masks give {obj.shape[1]} patches of {patch} px per image but the model has {p} image "
                       f"tokens; pass the model's patch size")
    words = factor_words(factors)
    obj_truth = [frozenset(w[a] for a in OBJECT_ATTRIBUTES) for w in words for _ in range(p)]
    bg_truth = [frozenset([w["background"]]) for w in words for _ in range(p)]
    sel_o, sel_b = obj.reshape(-1), bg.reshape(-1)
    embedding, norm, head = lens_modules(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    rows = []
    for layer in range(n_layers1):
        q = states[layer].reshape(n * p, d)
        tops = {"latentlens": latent_lens(q, bank, top_k), "embeddinglens": embedding_lens(q, embedding, tokenizer, top_k),
                "logitlens": logit_lens(q, norm, head, tokenizer, top_k)}
        rows.append({"layer": layer,
                     "object": {name: _rate(t, obj_truth, sel_o) for name, t in tops.items()},
                     "background": {name: _rate(t, bg_truth, sel_b) for name, t in tops.items()}})

    def strict_chance(truth: list[frozenset[str]], sel: np.ndarray) -> float:
        draws = random_top_tokens(bank.vocabulary, len(truth) * chance_draws, top_k, seed=0)
        return attribute_hit_rate(draws, truth * chance_draws, np.tile(sel, chance_draws), ATTRIBUTES)

    chance = {"object": {"any": chance_hit_rate(bank.vocabulary, obj_truth, top_k, sel_o),
                         "strict": strict_chance(obj_truth, sel_o)},
              "background": {"any": chance_hit_rate(bank.vocabulary, bg_truth, top_k, sel_b),
                             "strict": strict_chance(bg_truth, sel_b)}}
    return {"layers": rows, "chance": chance, "top_k": top_k,
            "counts": {"images": n, "object_patches": int(sel_o.sum()), "background_patches": int(sel_b.sum()),
                       "bank_contexts": len(bank.tokens), "bank_words": len(bank.vocabulary),
                       "bank_layers": bank.layers}}
