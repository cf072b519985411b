"""The multimodal code on tiny random VLMs of three architectures (LLaVA, Gemma 3, Idefics3 / SmolVLM),
built offline from configs (tests/tiny_vlms.py) and reloaded through AutoProcessor /
AutoModelForImageTextToText: the hf backend, the lenses and the SAE activation collection must not
be tied to LLaVA. References are independent: plain torch forward hooks on hand-named module paths,
the model's own logits, the tokenizer's own image token string."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from latentexplainer_plugin.backends.hf import HFBackend  # noqa: E402
from latentexplainer_plugin.biases import DISENTANGLEMENT, build_prompt  # noqa: E402
from latentexplainer_plugin.errors import CollectError, VLMError  # noqa: E402
from latentexplainer_plugin.sae.collect import ActivationStore, collect_activations  # noqa: E402
from latentexplainer_plugin.types import Traversal  # noqa: E402
from latentexplainer_plugin.vlm.activations import collect_image_token_activations, language_layer_path  # noqa: E402
from latentexplainer_plugin.vlm.lens import (  # noqa: E402
    build_context_bank,
    embedding_lens,
    image_hidden_states,
    image_token_id,
    latent_lens,
    lens_modules,
    logit_lens,
    text_hidden_states,
)

try:
    from tests.tiny_vlms import load_tiny_vlm, save_tiny_vlm
except ImportError:  # tests/ on sys.path instead of the repository root
    from tiny_vlms import load_tiny_vlm, save_tiny_vlm  # type: ignore

ARCHS = ["llava", "gemma3", "idefics3"]
# written out by hand, not found by the code under test
LAYERS_PATH = {"llava": "model.language_model.layers", "gemma3": "model.language_model.layers",
               "idefics3": "model.text_model.layers"}
IMAGE_TOKEN = {"llava": "<image>", "gemma3": "<image_soft_token>", "idefics3": "<image>"}
IMAGE_TOKENS_PER_IMAGE = 4
MIN_NEW, MAX_NEW = 4, 6
PROMPT = "describe the image"


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny-{request.param}") / "model"
    save_tiny_vlm(request.param, path, min_new_tokens=MIN_NEW, max_new_tokens=MAX_NEW)
    return request.param, path


@pytest.fixture(scope="module")
def loaded(arch_dir):
    arch, path = arch_dir
    model, processor = load_tiny_vlm(path)
    return arch, model, processor


def _images(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 40, 40, 3)) * 255).astype(np.uint8)


def _module(model, path: str):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _reference_states(arch, model, processor, image) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per decoder layer: its input (layer 0 only) and output at the image-token positions, read with
    plain torch hooks from a single-image chat encoded by apply_chat_template."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(image)},
                                             {"type": "text", "text": PROMPT}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    layers = _module(model, LAYERS_PATH[arch])
    seen: list[torch.Tensor] = []

    def pre(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    def post(_m, _args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handles = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [layer.register_forward_hook(post) for layer in layers]
    try:
        with torch.inference_mode():
            logits = model(**inputs).logits
    finally:
        for h in handles:
            h.remove()
    mask = inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[arch])
    assert int(mask.sum()) == IMAGE_TOKENS_PER_IMAGE
    return [s[0, mask] for s in seen], logits[0, mask]


def test_image_token_id_comes_from_the_model_not_a_llava_attribute(loaded):
    arch, model, processor = loaded
    assert image_token_id(model, processor) == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[arch])
    if arch == "gemma3":  # the processor's own image_token_id is the begin-of-image token
        assert processor.image_token_id == processor.tokenizer.convert_tokens_to_ids("<start_of_image>")


def test_hf_backend_end_to_end(arch_dir):
    arch, path = arch_dir
    backend = HFBackend(str(path), min_new_tokens=MIN_NEW, max_new_tokens=MAX_NEW)
    g = torch.Generator().manual_seed(1)
    traversal = Traversal(latent_id="z0", images=torch.rand(2, 2, 5, 3, 16, 16, generator=g),
                          strengths=torch.linspace(-3, 3, 5), rule="set", index=0, row_labels=["z1=-2", "z1=+2"],
                          meta={"clamped": 1})
    prompt = build_prompt(DISENTANGLEMENT, traversal)
    torch.manual_seed(0)
    out = backend.explain(traversal, prompt, 3)
    assert backend.generate_calls == 1 and len(out) == 3
    for i, r in enumerate(out):
        assert r.ok and r.text.strip(), r
        assert r.meta["sample"] == i and MIN_NEW <= r.meta["new_tokens"] <= MAX_NEW
    assert backend.describe()["architecture"] == type(backend.model).__name__
    assert arch in type(backend.model).__name__.lower()


def test_hf_backend_caption_compare_mode(arch_dir):
    _, path = arch_dir
    backend = HFBackend(str(path), mode="caption_compare", min_new_tokens=MIN_NEW, max_new_tokens=MAX_NEW)
    g = torch.Generator().manual_seed(2)
    traversal = Traversal(latent_id="z1", images=torch.rand(2, 2, 5, 3, 16, 16, generator=g),
                          strengths=torch.linspace(-3, 3, 5), rule="set", index=1)
    torch.manual_seed(0)
    out = backend.explain(traversal, build_prompt(DISENTANGLEMENT, traversal), 3)
    assert [r.meta["base"] for r in out] == [0, 1, 0] and backend.generate_calls == 2  # greedy pass + sampled repeat
    for r in out:
        assert r.ok and r.text and len(r.meta["captions"]) == 2
        assert all(first and last for first, last in r.meta["captions"])
    usage = out[0].meta["usage"]
    assert usage["requests"] == 2 and 12 * MIN_NEW <= usage["completion_tokens"] <= 12 * MAX_NEW


def test_visual_token_states_equal_forward_hooks(loaded):
    arch, model, processor = loaded
    images = _images(3)
    states = image_hidden_states(model, processor, images, prompt=PROMPT, batch_size=2)
    n_layers = len(_module(model, LAYERS_PATH[arch]))
    assert states.shape == (n_layers + 1, 3, IMAGE_TOKENS_PER_IMAGE, 32)
    for i, image in enumerate(images):
        reference, _ = _reference_states(arch, model, processor, image)
        assert len(reference) == n_layers + 1
        for layer, ref in enumerate(reference):
            assert torch.allclose(states[layer, i], ref, atol=1e-5), (arch, layer)


def test_lenses_on_each_architecture(loaded):
    arch, model, processor = loaded
    tok = processor.tokenizer
    emb, norm, head = lens_modules(model)
    assert emb.shape == (len(tok), 32)
    # EmbeddingLens: a token's own embedding row has that token as its nearest neighbour
    words = ["red", "square", "moves", "left"]
    ids = tok.convert_tokens_to_ids(words)
    assert [row[0] for row in embedding_lens(3.0 * emb[ids], emb, tok, top_k=3)] == words

    # LogitLens on the last layer's raw state = the model's own next-token ranking there
    images = _images(2, seed=1)
    states = image_hidden_states(model, processor, images, prompt=PROMPT)
    _, logits = _reference_states(arch, model, processor, images[0])
    logits = logits.clone()
    logits[:, sorted(tok.all_special_ids)] = -float("inf")
    expect = [tok.convert_ids_to_tokens(row) for row in torch.topk(logits, 5, dim=1).indices.tolist()]
    assert logit_lens(states[-1, 0], norm, head, tok, top_k=5) == expect

    # LatentLens: a text token's own contextual state finds that token in the bank at its layer
    corpus = ["a small red square near the top", "the object moves left"]
    bank = build_context_bank(model, processor, corpus, max_contexts_per_token=5)
    assert bank.layers == [1, 2]
    (text_ids, text_states), = text_hidden_states(model, tok, corpus[:1])
    pos = text_ids.index(tok.convert_tokens_to_ids("red"))
    for layer in bank.layers:
        assert latent_lens(text_states[layer, pos], bank, top_k=1, bank_layers=[layer]) == [["red"]]
    top = latent_lens(states[1].reshape(-1, 32), bank, top_k=5)
    assert len(top) == 2 * IMAGE_TOKENS_PER_IMAGE and all(len(r) == 5 and set(r) <= set(bank.tokens) for r in top)


def test_sae_activations_at_image_tokens_equal_forward_hooks(loaded, tmp_path):
    arch, model, processor = loaded
    images = _images(3, seed=2)
    layer = 1
    assert language_layer_path(model, layer) == f"{LAYERS_PATH[arch]}.{layer}"
    assert language_layer_path(model, -1) == f"{LAYERS_PATH[arch]}.1"
    manifest = collect_image_token_activations(model, processor, images, layer, tmp_path / "acts", prompt=PROMPT,
                                               batch_size=2, shard_rows=5)
    assert manifest.positions == [2, 2] and manifest.n_items == 3 and manifest.count == 3 * IMAGE_TOKENS_PER_IMAGE
    assert manifest.site == f"{LAYERS_PATH[arch]}.{layer}.output"
    data = ActivationStore(tmp_path / "acts").load()
    assert data["item"].tolist() == [i for i in range(3) for _ in range(IMAGE_TOKENS_PER_IMAGE)]
    assert data["position"].tolist() == list(range(IMAGE_TOKENS_PER_IMAGE)) * 3
    for i, image in enumerate(images):
        reference, _ = _reference_states(arch, model, processor, image)
        got = data["activations"][data["item"] == i]
        assert torch.allclose(got, reference[layer + 1], atol=1e-5), arch


def test_bad_input_is_refused_before_work(loaded, tmp_path):
    _, model, processor = loaded
    with pytest.raises(VLMError, match="layer must be an int"):
        language_layer_path(model, 2)
    with pytest.raises(VLMError, match="images is empty"):
        collect_image_token_activations(model, processor, [], 0, tmp_path / "a")
    with pytest.raises(VLMError, match="cannot be passed"):
        collect_image_token_activations(model, processor, _images(1), 0, tmp_path / "b", layout="flat")
    with pytest.raises(CollectError, match="select must be"):
        collect_activations(model, "lm_head", [], tmp_path / "c", select="image tokens")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
