"""Lenses for visual tokens (latentexplainer_plugin.vlm.lens): mechanics on hand-made tensors,
the ground-truth metric on hand-made cases, and one small run on the shipped demo VLM."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from latentexplainer_plugin.errors import VLMError  # noqa: E402
from latentexplainer_plugin.vlm import ATTRIBUTES, WEIGHTS_DIR  # noqa: E402
from latentexplainer_plugin.vlm.lens import (  # noqa: E402
    ContextBank,
    attribute_hit_rate,
    build_context_bank,
    chance_hit_rate,
    embedding_lens,
    image_hidden_states,
    latent_lens,
    logit_lens,
    patch_labels,
    random_top_tokens,
    text_hidden_states,
)


class _Tok:
    """A stand-in tokenizer: id i is word i, id 0 is special."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.all_special_ids = [0]

    def convert_ids_to_tokens(self, ids):
        return [self.words[i] for i in ids] if isinstance(ids, list) else self.words[ids]


def _unit(rows: np.ndarray) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


def test_latent_lens_finds_the_planted_context():
    rng = np.random.default_rng(0)
    tokens = [f"w{i}" for i in range(40)]
    bank = ContextBank(embeddings={1: _unit(rng.normal(size=(40, 16))), 2: _unit(rng.normal(size=(40, 16)))},
                       tokens=tokens)
    planted = [3, 17, 29]
    # a scaled, slightly perturbed copy of layer-2 rows: cosine ignores the scale
    query = 7.0 * bank.embeddings[2][planted] + 0.01 * torch.tensor(rng.normal(size=(3, 16)), dtype=torch.float32)
    top = latent_lens(query, bank, top_k=3)
    assert [row[0] for row in top] == ["w3", "w17", "w29"]
    assert all(len(row) == 3 for row in top)


def test_latent_lens_merges_layers_by_similarity():
    def at(cos: float) -> list[float]:  # a unit vector at cosine `cos` with the query direction (1, 0)
        return [cos, math.sqrt(1 - cos ** 2)]

    # two contexts ("x", "y"), the same rows at both layers; cosines with the query:
    # layer 1: x 0.8, y 0.0; layer 2: x 0.1, y 0.96
    bank = ContextBank(embeddings={1: torch.tensor([at(0.8), at(0.0)]), 2: torch.tensor([at(0.1), at(0.96)])},
                       tokens=["x", "y"])
    q = torch.tensor([[2.0, 0.0]])
    assert latent_lens(q, bank, top_k=2) == [["y", "x"]]        # 0.96 (layer 2), 0.8 (layer 1)
    assert latent_lens(q, bank, top_k=3) == [["y", "x", "x"]]   # then 0.1 (layer 2); y's 0.0 last
    assert latent_lens(q, bank, top_k=2, bank_layers=[1]) == [["x", "y"]]
    assert latent_lens(q, bank, top_k=1, bank_layers=[2]) == [["y"]]
    with pytest.raises(VLMError, match="not in the bank"):
        latent_lens(q, bank, bank_layers=[3])
    with pytest.raises(VLMError, match="shape"):
        latent_lens(torch.zeros(2, 3), bank)


def test_embedding_lens_is_nearest_row_by_cosine_without_special_tokens():
    words = ["<pad>", "a", "b", "c"]
    emb = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    # query along (1, 0): the special row 0 would be nearest; then "a" (cos ~0.995), "b" (0), "c" (-1)
    assert embedding_lens(torch.tensor([[3.0, 0.0]]), emb, _Tok(words), top_k=3) == [["a", "b", "c"]]


def test_logit_lens_equals_an_independent_rmsnorm_and_unembedding():
    from latentexplainer_plugin.vlm import load_demo_vlm

    model, processor = load_demo_vlm(WEIGHTS_DIR)
    norm, head = model.model.language_model.norm, model.lm_head
    h = np.random.default_rng(1).normal(size=(6, head.in_features)) * 3
    w = norm.weight.detach().numpy().astype(np.float64)
    eps = norm.variance_epsilon
    normed = h / np.sqrt((h ** 2).mean(axis=1, keepdims=True) + eps) * w
    logits = normed @ head.weight.detach().numpy().astype(np.float64).T
    special = set(processor.tokenizer.all_special_ids)
    logits[:, sorted(special)] = -np.inf
    expect_ids = np.argsort(-logits, axis=1)[:, :5]
    expect = [processor.tokenizer.convert_ids_to_tokens(row.tolist()) for row in expect_ids]
    assert logit_lens(torch.tensor(h, dtype=torch.float32), norm, head, processor.tokenizer, top_k=5) == expect


def test_patch_labels_object_and_background():
    m = np.zeros((1, 16, 16), bool)
    m[0, :8, :8] = True          # patch 0 fully object
    m[0, :4, 8:16] = True        # patch 1 half object (>= 0.5)
    m[0, 8, 0] = True            # patch 2 one pixel: neither
    obj, bg = patch_labels(m)
    assert obj.tolist() == [[True, True, False, False]]
    assert bg.tolist() == [[False, False, False, True]]
    with pytest.raises(VLMError, match="multiples"):
        patch_labels(np.zeros((1, 10, 16), bool))


def test_attribute_hit_rate_and_chance_on_hand_made_cases():
    top = [["small", "red", "a"], ["large", "medium", "small"], ["blue", "the", "on"], ["grey", "a", "a"]]
    truth = [frozenset({"small", "green"}), frozenset({"small"}), frozenset({"red"}), frozenset({"dark"})]
    assert attribute_hit_rate(top, truth) == pytest.approx(2 / 4)
    assert attribute_hit_rate(top, truth, select=np.array([True, False, True, True])) == pytest.approx(1 / 3)
    # strict: row 1 lists every size word, so it is no hit; row 0 names one size word, the true one
    assert attribute_hit_rate(top, truth, attributes=ATTRIBUTES) == pytest.approx(1 / 4)
    assert math.isnan(attribute_hit_rate(top, truth, select=np.zeros(4, bool)))
    with pytest.raises(VLMError, match="rows"):
        attribute_hit_rate(top[:2], truth)
    # exact chance: 4 words, 1 true, 2 drawn: 1 - C(3,2)/C(4,2) = 1/2; 2 true: 1 - C(2,2)/C(4,2) = 5/6
    vocab = ["p", "q", "r", "s"]
    assert chance_hit_rate(vocab, [frozenset({"p"})], top_k=2) == pytest.approx(0.5)
    assert chance_hit_rate(vocab, [frozenset({"p", "q"})], top_k=2) == pytest.approx(5 / 6)
    rows = random_top_tokens(vocab, 4000, top_k=2, seed=0)
    assert all(len(set(r)) == 2 for r in rows)
    assert attribute_hit_rate(rows, [frozenset({"p"})] * 4000) == pytest.approx(0.5, abs=0.03)


def test_lenses_on_the_shipped_demo_vlm():
    from latentexplainer_plugin.data.shapes import make_dataset
    from latentexplainer_plugin.vlm import caption_from_factors, factor_words, load_demo_vlm

    torch.manual_seed(0)
    model, processor = load_demo_vlm(WEIGHTS_DIR)
    tok = processor.tokenizer
    lm = model.model.language_model
    n_layers = len(lm.layers)

    # the captured last state is the raw residual stream: norm + lm_head reproduce the model's logits
    (ids, states), = text_hidden_states(model, tok, ["a small red triangle near the top left"])
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        assert torch.allclose(model.lm_head(lm.norm(states[-1])), logits, atol=1e-4)
    assert states.shape == (n_layers + 1, len(ids), lm.config.hidden_size)

    corpus = caption_from_factors(make_dataset(60, seed=0)["factors"])
    bank = build_context_bank(model, processor, corpus, max_contexts_per_token=5)
    assert bank.layers == list(range(1, n_layers + 1))
    counts = {t: bank.tokens.count(t) for t in set(bank.tokens)}
    assert max(counts.values()) <= 5 and "<s>" not in counts and "</s>" not in counts
    for x in bank.layers:
        assert torch.allclose(bank.embeddings[x].norm(dim=1), torch.ones(len(bank.tokens)), atol=1e-5)

    held = make_dataset(8, seed=7_000_001, masks=True)
    st = image_hidden_states(model, processor, held["images"], batch_size=5)
    assert st.shape == (n_layers + 1, 8, 64, lm.config.hidden_size)
    obj, bg = patch_labels(held["masks"])
    assert obj.sum() > 0 and bg.sum() > 0
    words = factor_words(held["factors"])
    truth = [frozenset(w[a] for a in ("size", "colour", "shape", "vertical", "horizontal")) for w in words
             for _ in range(64)]
    for layer in range(n_layers + 1):
        q = st[layer].reshape(-1, st.shape[-1])
        for top in (latent_lens(q, bank), embedding_lens(q, model.get_input_embeddings().weight.detach(), tok),
                    logit_lens(q, lm.norm, model.lm_head, tok)):
            assert len(top) == 8 * 64 and all(len(r) == 5 for r in top)
            for attrs in (None, ATTRIBUTES):
                rate = attribute_hit_rate(top, truth, obj.reshape(-1), attrs)
                assert 0.0 <= rate <= 1.0


def test_bad_input_is_refused_before_work():
    from latentexplainer_plugin.vlm import load_demo_vlm

    model, processor = load_demo_vlm(WEIGHTS_DIR)
    with pytest.raises(VLMError, match="corpus is empty"):
        build_context_bank(model, processor, [])
    with pytest.raises(VLMError, match="layers must be"):
        build_context_bank(model, processor, ["a red square"], layers=[7])
    with pytest.raises(VLMError, match="max_contexts_per_token"):
        build_context_bank(model, processor, ["a red square"], max_contexts_per_token=0)
    with pytest.raises(VLMError, match="images is empty"):
        image_hidden_states(model, processor, [])
