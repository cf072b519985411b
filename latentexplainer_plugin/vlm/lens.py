"""Lenses for the visual tokens of a VLM, scored against the renderer's truth.

Three ways to name what a visual token's hidden state at layer ``l`` of the language model says:

* **LatentLens** (arXiv 2602.00462): nearest neighbours (cosine) in a *contextual bank*, i.e.
  hidden states of the same language model on a text corpus at several layers, L2-normalised and
  stored with the token string they belong to (at most ``max_contexts_per_token`` contexts per
  string); searched per bank layer, the per-layer candidates merged by similarity;
* **EmbeddingLens**: nearest rows (cosine) of the input embedding matrix;
* **LogitLens**: top tokens of ``lm_head(final_norm(h))``.

Hidden states come from the transformers forward with ``output_hidden_states=True`` for layers
``0 .. L-1`` (0 = embedding output) and from a forward hook on the last decoder layer for layer
``L``: transformers returns the *final-normed* state as its last hidden state, and every lens here
wants the raw residual stream at every layer (the logit lens applies the norm itself).

Truth: on the procedural shapes the renderer knows each image's attribute words and which 8x8
patches cover the object (:func:`patch_labels`); :func:`attribute_hit_rate` is the share of
patches whose top-k token strings contain a true word.

The method is implemented here rather than with PyPI ``latentlens`` 0.1.0 (see docs/vlm.md,
"Lenses for visual tokens"). Needs ``torch`` and ``transformers`` (imported by the functions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import comb
from typing import Any

import numpy as np

from ..errors import VLMError
from .build import PROMPT, caption_messages

__all__ = [
    "ContextBank",
    "attribute_hit_rate",
    "build_context_bank",
    "chance_hit_rate",
    "embedding_lens",
    "image_hidden_states",
    "image_inputs",
    "image_token_id",
    "language_model",
    "latent_lens",
    "lens_modules",
    "logit_lens",
    "patch_labels",
    "random_top_tokens",
    "select_image_tokens",
    "text_hidden_states",
]


@dataclass
class ContextBank:
    """Contextual text embeddings: ``embeddings[layer]`` is ``(N, D)``, rows L2-normalised; row ``i``
    of every layer belongs to ``tokens[i]`` in the text ``contexts[i]`` (same rows at every layer)."""

    embeddings: dict[int, Any]
    tokens: list[str]
    contexts: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[int]:
        return sorted(self.embeddings)

    @property
    def vocabulary(self) -> list[str]:
        """The distinct token strings in the bank, sorted."""
        return sorted(set(self.tokens))


def _torch():
    import torch

    return torch


def language_model(model: Any) -> Any:
    """The decoder stack of a VLM's language model (a module with ``.layers`` and a final ``.norm``),
    found through ``model.get_decoder()`` (LLaVA and Gemma 3: ``model.language_model``; Idefics3 /
    SmolVLM: ``model.text_model``), not through one architecture's attribute names."""
    get = getattr(model, "get_decoder", None)
    lm = get() if callable(get) else None
    if lm is None or not hasattr(lm, "layers"):  # older wrappers without get_decoder
        lm = getattr(getattr(model, "model", None), "language_model", None)
    if lm is None or not hasattr(lm, "layers") or not hasattr(lm, "norm"):
        raise VLMError(f"{type(model).__name__}: get_decoder() gives no language model with .layers and .norm; "
                       f"the lenses need a transformers image-text-to-text model whose decoder is a stack of "
                       f"layers with a final norm (LLaVA, Gemma 3, Idefics3 / SmolVLM, the demo VLM)")
    return lm



def lens_modules(model: Any) -> tuple[Any, Any, Any]:
    """``(embedding matrix (V, D), final norm, unembedding)`` of a VLM's language model: what
    :func:`embedding_lens` and :func:`logit_lens` take, from ``get_input_embeddings`` /
    ``get_output_embeddings`` and the decoder's ``norm`` (any architecture)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None or not hasattr(head, "in_features"):
        raise VLMError(f"{type(model).__name__} has no input embeddings or no linear output embeddings (lm_head); "
                       f"the embedding and logit lenses need both")
    return emb.weight.detach(), language_model(model).norm, head


def image_token_id(model: Any, processor: Any = None) -> int:
    """The token id whose positions hold the visual tokens: the model config's ``image_token_id``
    (the id the model itself replaces with image features), else the tokenizer's or processor's.

    The config comes first because processors disagree: Gemma 3's ``processor.image_token_id`` is the
    begin-of-image token, while the image features sit at ``tokenizer.image_token_id`` (the soft token)."""
    candidates = [getattr(model.config, "image_token_id", None), getattr(model.config, "image_token_index", None)]
    if processor is not None:
        candidates += [getattr(getattr(processor, "tokenizer", None), "image_token_id", None),
                       getattr(processor, "image_token_id", None)]
    for value in candidates:
        if isinstance(value, int):
            return value
    raise VLMError(f"{type(model.config).__name__} has no image_token_id (nor has the processor); "
                   f"cannot find the visual tokens")


def _forward_states(model: Any, inputs: Mapping[str, Any]) -> Any:
    """``(L+1, B, T, D)`` raw residual states: embeddings output, then every decoder layer's output."""
    torch = _torch()
    lm = language_model(model)
    captured: dict[str, Any] = {}

    def hook(_module: Any, _args: Any, output: Any) -> None:
        captured["last"] = output[0] if isinstance(output, tuple) else output

    handle = lm.layers[-1].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            out = model(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    states = list(out.hidden_states)
    if len(states) != len(lm.layers) + 1:
        raise VLMError(f"expected {len(lm.layers) + 1} hidden states, got {len(states)}")
    states[-1] = captured["last"]  # transformers' last entry is already final-normed
    return torch.stack([s.float() for s in states])


def image_hidden_states(model: Any, processor: Any, images: np.ndarray | Sequence[Any], prompt: str = PROMPT,
                        batch_size: int = 32) -> Any:
    """Hidden states at the image-token positions of the chat prompt for each image:
    a float tensor ``(L+1, N, P, D)`` (layer 0 = embedding output, P image tokens in patch order)."""
    torch = _torch()
    pil = list(images)
    if not pil:
        raise VLMError("images is empty; pass at least one (H, W, 3) uint8 image")
    token = image_token_id(model, processor)
    chunks = []
    for start in range(0, len(pil), batch_size):
        inputs = image_inputs(processor, pil[start:start + batch_size], prompt)
        states = _forward_states(model, inputs)
        chunks.append(select_image_tokens(states, inputs["input_ids"], token, batch_dim=1))
    return torch.cat(chunks, dim=1)


def image_inputs(processor: Any, images: Sequence[Any], prompt: str = PROMPT) -> Any:
    """Processor inputs for one chat per image (``[user: image + prompt]``, generation prompt added),
    batched: ``input_ids``, ``attention_mask``, ``pixel_values`` and whatever else the architecture's
    processor returns (``token_type_ids``, ``pixel_attention_mask``, ...)."""
    from PIL import Image

    pil = [Image.fromarray(np.asarray(im)) if not hasattr(im, "convert") else im.convert("RGB") for im in images]
    text = processor.apply_chat_template(caption_messages(pil[0], prompt), add_generation_prompt=True, tokenize=False)
    # one list of images per text: the form every processor accepts (Idefics3 refuses a flat list)
    return processor(images=[[im] for im in pil], text=[text] * len(pil), return_tensors="pt", padding=True)


def select_image_tokens(states: Any, input_ids: Any, token_id: int, batch_dim: int = 0) -> Any:
    """The entries of ``states`` at the positions where ``input_ids (B, T) == token_id``: ``states``
    has B at ``batch_dim`` and T right after it; returns the same shape with T replaced by P, the image
    tokens per row (every row must hold the same number)."""
    torch = _torch()
    mask = torch.as_tensor(input_ids) == token_id
    counts = mask.sum(dim=1).tolist()
    if not counts or counts[0] == 0 or len(set(counts)) != 1:
        raise VLMError(f"every row must hold the same non-zero number of image tokens (id {token_id}); got {counts}")
    moved = states.movedim((batch_dim, batch_dim + 1), (0, 1))  # (B, T, ...)
    picked = moved[mask].reshape(mask.shape[0], counts[0], *moved.shape[2:])
    return picked.movedim((0, 1), (batch_dim, batch_dim + 1))


def text_hidden_states(model: Any, tokenizer: Any, texts: Sequence[str]) -> list[tuple[list[int], Any]]:
    """For each text: ``(token ids, states)`` with states ``(L+1, T, D)``, one forward per text
    (no padding, so no padding side or mask can change the states)."""
    out = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            continue
        states = _forward_states(model, {"input_ids": ids, "attention_mask": _torch().ones_like(ids)})
        out.append((ids[0].tolist(), states[:, 0]))
    return out


def build_context_bank(model: Any, processor: Any, corpus: Sequence[str], layers: Sequence[int] | None = None,
                       max_contexts_per_token: int = 50, prefix: str = "") -> ContextBank:
    """The contextual bank of ``corpus`` through the model's language model.

    Every position of every text is a context, except special tokens and positions whose prefix
    (the token ids up to and including it) was seen before: a causal model gives an identical state
    there. At most ``max_contexts_per_token`` contexts per token string, first come first served.
    ``layers`` default: every decoder layer's output ``1 .. L`` (not the embedding layer 0, whose
    rows are the EmbeddingLens). ``prefix`` is prepended to every text (its own tokens are not stored).
    """
    torch = _torch()
    if max_contexts_per_token < 1:
        raise VLMError(f"max_contexts_per_token must be >= 1, got {max_contexts_per_token}")
    texts = [str(t) for t in corpus]
    if not texts:
        raise VLMError("corpus is empty; pass a list of texts (e.g. captions of training images)")
    n_layers = len(language_model(model).layers)
    chosen = list(range(1, n_layers + 1)) if layers is None else sorted({int(x) for x in layers})
    bad = [x for x in chosen if not 0 <= x <= n_layers]
    if bad or not chosen:
        raise VLMError(f"layers must be non-empty and in 0..{n_layers} (0 = embedding output); "
                       f"got {list(layers or [])}")
    tokenizer = getattr(processor, "tokenizer", processor)
    special = set(tokenizer.all_special_ids)
    skip = len(tokenizer(prefix)["input_ids"]) if prefix else 0
    seen: set[tuple[int, ...]] = set()
    counts: dict[str, int] = {}
    rows: dict[int, list[Any]] = {x: [] for x in chosen}
    tokens: list[str] = []
    contexts: list[str] = []
    for text, (ids, states) in zip(texts, text_hidden_states(model, tokenizer, [prefix + t for t in texts])):
        for pos in range(skip, len(ids)):
            key = tuple(ids[:pos + 1])
            if ids[pos] in special or key in seen:
                continue
            word = tokenizer.convert_ids_to_tokens(ids[pos])
            if counts.get(word, 0) >= max_contexts_per_token:
                continue
            seen.add(key)
            counts[word] = counts.get(word, 0) + 1
            tokens.append(word)
            contexts.append(text)
            for x in chosen:
                rows[x].append(states[x, pos])
    if not tokens:
        raise VLMError("the corpus gave no contexts (every token was special or a repeated prefix)")
    embeddings = {x: torch.nn.functional.normalize(torch.stack(r), dim=-1) for x, r in rows.items()}
    return ContextBank(embeddings=embeddings, tokens=tokens, contexts=contexts)


def _check_states(states: Any, dim: int) -> Any:
    torch = _torch()
    states = torch.as_tensor(states).float()
    if states.ndim == 1:
        states = states[None]
    if states.ndim != 2 or states.shape[1] != dim:
        raise VLMError(f"states must have shape (Q, {dim}); got {tuple(states.shape)}")
    return states


def latent_lens(states: Any, bank: ContextBank, top_k: int = 5,
                bank_layers: Sequence[int] | None = None) -> list[list[str]]:
    """LatentLens: the token strings of the ``top_k`` nearest bank contexts (cosine) of each state.

    ``states`` is ``(Q, D)``. Each bank layer is searched for its own top-k, then the candidates of
    all searched layers are merged by similarity (a context can appear once per layer, so a token
    string may repeat)."""
    torch = _torch()
    layers = bank.layers if bank_layers is None else sorted({int(x) for x in bank_layers})
    missing = [x for x in layers if x not in bank.embeddings]
    if missing or not layers:
        raise VLMError(f"bank_layers {missing or '[]'} not in the bank; it has layers {bank.layers}")
    dim = bank.embeddings[layers[0]].shape[1]
    query = torch.nn.functional.normalize(_check_states(states, dim), dim=-1)
    values, indices = [], []
    for x in layers:
        sim = query @ bank.embeddings[x].T
        v, i = torch.topk(sim, k=min(top_k, sim.shape[1]), dim=1)
        values.append(v)
        indices.append(i)
    merged_v = torch.cat(values, dim=1)
    merged_i = torch.cat(indices, dim=1)
    order = torch.topk(merged_v, k=min(top_k, merged_v.shape[1]), dim=1).indices
    picked = torch.gather(merged_i, 1, order)
    return [[bank.tokens[j] for j in row] for row in picked.tolist()]


def _vocab_tokens(tokenizer: Any, size: int) -> tuple[list[str], list[int]]:
    special = set(tokenizer.all_special_ids)
    keep = [i for i in range(size) if i not in special]
    return tokenizer.convert_ids_to_tokens(keep), keep


def embedding_lens(states: Any, embedding: Any, tokenizer: Any, top_k: int = 5) -> list[list[str]]:
    """EmbeddingLens: the ``top_k`` tokens whose input-embedding rows are nearest (cosine) to each
    state; ``embedding`` is the ``(V, D)`` matrix; special tokens are left out."""
    torch = _torch()
    weight = torch.as_tensor(embedding).float()
    words, keep = _vocab_tokens(tokenizer, weight.shape[0])
    query = torch.nn.functional.normalize(_check_states(states, weight.shape[1]), dim=-1)
    sim = query @ torch.nn.functional.normalize(weight[keep], dim=-1).T
    idx = torch.topk(sim, k=min(top_k, len(keep)), dim=1).indices
    return [[words[j] for j in row] for row in idx.tolist()]


def logit_lens(states: Any, norm: Any, lm_head: Any, tokenizer: Any, top_k: int = 5) -> list[list[str]]:
    """LogitLens: the ``top_k`` tokens of ``lm_head(norm(h))`` for each state; special tokens left out."""
    torch = _torch()
    with torch.inference_mode():
        logits = lm_head(norm(_check_states(states, lm_head.in_features))).float()
    words, keep = _vocab_tokens(tokenizer, logits.shape[1])
    idx = torch.topk(logits[:, keep], k=min(top_k, len(keep)), dim=1).indices
    return [[words[j] for j in row] for row in idx.tolist()]


def patch_labels(masks: np.ndarray, patch: int = 8, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``(object, background)`` boolean ``(N, P)`` arrays in row-major patch order: a patch is an
    object patch when at least ``threshold`` of its pixels are object pixels, a background patch
    when none are (patches in between are neither)."""
    m = np.asarray(masks, dtype=bool)
    if m.ndim != 3 or m.shape[1] % patch or m.shape[2] % patch:
        raise VLMError(f"masks must be (N, H, W) with H and W multiples of patch={patch}; got {m.shape}")
    n, h, w = m.shape
    cover = m.reshape(n, h // patch, patch, w // patch, patch).mean(axis=(2, 4)).reshape(n, -1)
    return cover >= threshold, cover == 0


def attribute_hit_rate(top_tokens: Sequence[Sequence[str]], truth: Sequence[set[str] | frozenset[str]],
                       select: np.ndarray | None = None,
                       attributes: Mapping[str, Sequence[str]] | None = None) -> float:
    """Share of the selected rows whose top tokens contain a word of that row's ``truth`` set
    (NaN when nothing is selected). Tokens are compared lower-cased and stripped.

    With ``attributes`` (attribute -> its words, e.g. ``captions.ATTRIBUTES``) the test is strict:
    a row counts only when, for some attribute, the top tokens name exactly one word of it and that
    word is true, so listing every word of an attribute ("small medium large") is no hit."""
    if len(top_tokens) != len(truth):
        raise VLMError(f"top_tokens has {len(top_tokens)} rows but truth has {len(truth)}")
    sel = np.ones(len(truth), bool) if select is None else np.asarray(select, bool).reshape(-1)
    if sel.shape[0] != len(truth):
        raise VLMError(f"select has {sel.shape[0]} entries but there are {len(truth)} rows")
    groups = None if attributes is None else [set(w) for w in attributes.values()]
    hits = []
    for row, words, s in zip(top_tokens, truth, sel):
        if not s:
            continue
        named = {t.strip().lower() for t in row}
        if groups is None:
            hits.append(bool(named & set(words)))
        else:
            hits.append(any(len(named & g) == 1 and named & g <= set(words) for g in groups))
    return float(np.mean(hits)) if hits else float("nan")


def random_top_tokens(vocabulary: Sequence[str], rows: int, top_k: int = 5, seed: int = 0) -> list[list[str]]:
    """``rows`` lists of ``top_k`` distinct strings drawn uniformly from ``vocabulary`` (seeded): the
    chance reference for any lens metric."""
    vocab = sorted(set(vocabulary))
    if not vocab:
        raise VLMError("vocabulary is empty")
    rng = np.random.default_rng(seed)
    k = min(top_k, len(vocab))
    return [[vocab[j] for j in rng.choice(len(vocab), size=k, replace=False)] for _ in range(rows)]


def chance_hit_rate(vocabulary: Sequence[str], truth: Sequence[set[str] | frozenset[str]], top_k: int = 5,
                    select: np.ndarray | None = None) -> float:
    """The expected :func:`attribute_hit_rate` when each row's ``top_k`` tokens are ``top_k`` distinct
    strings drawn uniformly from ``vocabulary`` (exact: ``1 - C(V - t, k) / C(V, k)``, t = true words
    in the vocabulary)."""
    vocab = {v.strip().lower() for v in vocabulary}
    v = len(vocab)
    k = min(top_k, v)
    sel = np.ones(len(truth), bool) if select is None else np.asarray(select, bool).reshape(-1)
    rates = [1.0 - comb(v - len(vocab & set(words)), k) / comb(v, k) for words, s in zip(truth, sel) if s]
    return float(np.mean(rates)) if rates else float("nan")
