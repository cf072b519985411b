"""The ``vlm`` adapter: SAE features of the demo VLM at image tokens, explained from their examples through
the same LatentExplainer, results.json and report as every other adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latentexplainer_plugin import LatentExplainer
from latentexplainer_plugin.cli import main
from latentexplainer_plugin.data.shapes import FACTOR_NAMES, render, sample_factors
from latentexplainer_plugin.errors import VLMError
from latentexplainer_plugin.sae import SparseAutoencoder, save_sae
from latentexplainer_plugin.vlm import WEIGHTS_DIR, load_demo_vlm
from latentexplainer_plugin.vlm.adapter import VLMFeatureAdapter
from latentexplainer_plugin.vlm.lens import image_hidden_states, patch_labels


def shapes_on_one_background(n: int, seed: int) -> dict:
    """Shapes images whose background is the same dark grey in every image (so it cannot explain a feature)."""
    factors = sample_factors(n, seed=seed)
    factors[:, FACTOR_NAMES.index("background")] = 0.1
    images, masks = render(factors, masks=True)
    return {"images": images, "masks": masks, "factors": factors, "factor_names": np.array(FACTOR_NAMES)}


def is_green(factors: np.ndarray) -> np.ndarray:
    return np.abs(factors[:, FACTOR_NAMES.index("hue")] - 1 / 3) < 1 / 12


@pytest.fixture(scope="module")
def vlm():
    return load_demo_vlm(WEIGHTS_DIR)


@pytest.fixture(scope="module")
def probe_sae(vlm):
    """Feature 0: a linear probe written by hand on layer 0's image tokens (mean object-token state of green images
    minus that of the others), firing on the tokens above the median score, so it fires on some images and not on
    others; feature 1 is dead (its bias is far below any score). (The demo VLM does not separate colour linearly per
    token at this layer, so the probe is not a clean 'green' detector: what it fires on is left to the explainer.)"""
    model, processor = vlm
    data = shapes_on_one_background(120, seed=11)
    green = torch.from_numpy(is_green(data["factors"]))
    tokens = image_hidden_states(model, processor, data["images"])[1]  # (N, 64, D): output of decoder layer 0
    on_object = torch.from_numpy(patch_labels(data["masks"])[0])
    w = tokens[green[:, None] & on_object].mean(0) - tokens[~green[:, None] & on_object].mean(0)
    d = tokens.shape[-1]
    w_enc = torch.zeros(d, 2)
    w_enc[:, 0] = w
    b_enc = torch.tensor([-float((tokens @ w).flatten().quantile(0.9)), -1e6])
    w_dec = torch.zeros(2, d)
    w_dec[0] = w / w.norm()
    return SparseAutoencoder(W_enc=w_enc, b_enc=b_enc, W_dec=w_dec, b_dec=torch.zeros(d), architecture="standard")


def test_features_are_explained_from_their_examples_alone(vlm, probe_sae, tmp_path):
    from latentexplainer_plugin.backends.offline import OfflineBackend
    from latentexplainer_plugin.biases.examples import build_example_prompt
    from latentexplainer_plugin.sae.examples import example_set, index_examples, to_example_set
    from latentexplainer_plugin.uncertainty import select_explanation
    from latentexplainer_plugin.vlm.activations import collect_image_token_activations

    data = shapes_on_one_background(160, seed=12)
    adapter = VLMFeatureAdapter(vlm, probe_sae, layer=0).attach_examples(data["images"], masks=data["masks"])
    f0, f1 = LatentExplainer(adapter, samples=5).attribute()
    assert (f0.id, f1.id) == ("f0", "f1") and f0.traversal is None and f0.status == "ok"
    # reference: the same example set built by hand from the sae.examples functions, answered by the offline
    # explainer directly, selected with the default measure
    model, processor = vlm
    collect_image_token_activations(model, processor, data["images"], 0, tmp_path / "acts")
    index = index_examples(probe_sae, tmp_path / "acts", top_k=5, reservoir=64, contrast=15)
    found, maps = example_set(probe_sae, tmp_path / "acts", index, 0, n_top=5, n_quantiles=10, n_contrast=15)
    examples = to_example_set(found, data["images"], maps, latent_id="f0", masks=data["masks"])
    answers = OfflineBackend().explain_examples(examples, build_example_prompt(examples), 5)
    expected = select_explanation(answers)
    assert [r.text for r in f0.responses] == [r.text for r in expected.responses]
    assert f0.clear == expected.clear and f0.certainty == pytest.approx(expected.certainty)
    assert f0.extras["examples"]["n_firing"] == examples.n_active > 0
    assert f0.extras["examples"]["items"] == examples.meta["items"]
    # a dead feature is reported dead and is never clear
    assert not f1.clear and f1.explanation is None and adapter.latent_extras(1)["dead"]
    assert f1.extras["examples"]["n_firing"] == 0


def test_bad_input_is_refused_before_any_work(vlm, probe_sae):
    with pytest.raises(VLMError, match="needs sae="):
        VLMFeatureAdapter(vlm)
    with pytest.raises(VLMError, match="layer must be in 0..1"):
        VLMFeatureAdapter(vlm, probe_sae, layer=2)
    wide = SparseAutoencoder(W_enc=torch.zeros(8, 2), b_enc=torch.zeros(2), W_dec=torch.zeros(2, 8), b_dec=torch.zeros(8))
    with pytest.raises(VLMError, match="d_in=8 numbers per token, but the language model's hidden states have 64"):
        VLMFeatureAdapter(vlm, wide)
    adapter = VLMFeatureAdapter(vlm, probe_sae)
    with pytest.raises(VLMError, match="no image traversal"):
        adapter.traverse([0], adapter.sample_bases(2), torch.tensor([0.0, 1.0]))
    with pytest.raises(VLMError, match="attach_examples"):
        adapter.example_set(0)
    with pytest.raises(VLMError, match="uint8"):
        adapter.attach_examples(np.zeros((4, 64, 64, 3), np.float32))


def test_cli_explains_vlm_features_with_the_standard_results_and_report(vlm, probe_sae, tmp_path):
    sae_dir = tmp_path / "sae"
    save_sae(probe_sae, sae_dir)
    data = shapes_on_one_background(160, seed=13)
    np.savez(tmp_path / "d.npz", images=data["images"], factors=data["factors"], factor_names=data["factor_names"])
    out = tmp_path / "run"
    code = main(["explain", "--model", str(WEIGHTS_DIR), "--adapter", "vlm", "-o", f"sae={sae_dir}", "-o", "layer=0",
                 "--data", str(tmp_path / "d.npz"), "--out", str(out), "--quiet"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["adapter"]["name"] == "vlm"
    by_id = {e["id"]: e for e in results["latents"]}
    assert [e["status"] for e in results["latents"]] == ["ok", "ok"] and by_id["f0"]["strip"] is None
    assert by_id["f0"]["examples"]["n_firing"] > 0 and len(by_id["f0"]["responses"]) == 5
    assert not by_id["f1"]["clear"] and by_id["f1"]["dead"]
    assert (out / "report.html").is_file() and (out / "examples" / "f0.png").is_file()


def test_cli_needs_data_for_an_examples_only_adapter(probe_sae, tmp_path, capsys):
    sae_dir = tmp_path / "sae"
    save_sae(probe_sae, sae_dir)
    code = main(["explain", "--model", str(WEIGHTS_DIR), "--adapter", "vlm", "-o", f"sae={sae_dir}", "--out",
                 str(tmp_path / "run")])
    assert code == 2
    assert "the vlm adapter explains its latents from example images only: pass --data X.npz" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("arch", ["gemma3", "idefics3"])
def test_the_adapter_is_not_tied_to_llava(arch, tmp_path):
    try:
        from tests.tiny_vlms import HIDDEN, save_tiny_vlm
    except ImportError:  # tests/ on sys.path instead of the repository root
        from tiny_vlms import HIDDEN, save_tiny_vlm  # type: ignore
    from latentexplainer_plugin.vlm.lens import image_inputs, image_token_id, language_model

    path = save_tiny_vlm(arch, tmp_path / arch)
    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(W_enc=torch.randn(HIDDEN, 4, generator=g), b_enc=torch.zeros(4),
                            W_dec=torch.randn(4, HIDDEN, generator=g), b_dec=torch.zeros(HIDDEN), architecture="standard")
    images = shapes_on_one_background(24, seed=14)["images"]
    adapter = VLMFeatureAdapter(str(path), sae, layer=1, n_top=2, n_quantiles=2, n_contrast=2).attach_examples(images)
    results = LatentExplainer(adapter, samples=2).attribute()
    assert [r.status for r in results] == ["ok"] * 4
    # reference: the share of images where each feature fires somewhere, from a plain forward hook on layer 1
    seen = {}
    layer = language_model(adapter.model).layers[1]
    handle = layer.register_forward_hook(lambda _m, _a, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    inputs = image_inputs(adapter.processor, list(images))
    try:
        with torch.inference_mode():
            adapter.model(**inputs)
    finally:
        handle.remove()
    mask = inputs["input_ids"] == image_token_id(adapter.model, adapter.processor)
    fires = torch.stack([(sae.encode(seen["h"][b][mask[b]]) > 0).any(0) for b in range(len(images))]).float().mean(0)
    assert [adapter.latent_extras(i)["frequency"] for i in range(4)] == pytest.approx(fires.tolist(), abs=1e-4)
