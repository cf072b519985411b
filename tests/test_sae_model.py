"""The SAE object and its file layouts, checked against hand-written formulas and hand-written files.

Every layout is written here from its documented tensor names (not with ``save_sae``), and every
encode is compared with the library's own formula written out by hand.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentexplainer_plugin.errors import LatentExplainerError, LoadError
from latentexplainer_plugin.sae import SAEError, SparseAutoencoder, detect_layout, load_sae, save_sae

D_IN, D_SAE = 6, 12


def weights(seed=0, d_in=D_IN, d_sae=D_SAE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_in, d_sae, generator=g), 0.3 * torch.randn(d_sae, generator=g),
            torch.randn(d_sae, d_in, generator=g), 0.5 * torch.randn(d_in, generator=g))


def ref_encode(x, W_enc, b_enc, b_dec, arch="standard", k=None, threshold=None, apply_b_dec=True):
    """The encode of SAELens 6 (standard/topk/jumprelu), one vector at a time, by hand."""
    out = torch.zeros(x.shape[0], W_enc.shape[1])
    for i, v in enumerate(x):
        v = v - b_dec if apply_b_dec else v
        pre = torch.stack([(v * W_enc[:, j]).sum() + b_enc[j] for j in range(W_enc.shape[1])])
        acts = pre.clamp(min=0)
        if arch == "topk":
            keep = sorted(range(len(acts)), key=lambda j: -float(acts[j]))[:k]
            acts = torch.tensor([float(acts[j]) if j in keep else 0.0 for j in range(len(acts))])
        if arch == "jumprelu":
            acts = torch.tensor([float(acts[j]) if float(pre[j]) > float(threshold[j]) else 0.0 for j in range(len(acts))])
        out[i] = acts
    return out


# -- the model
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_encode_decode_match_the_formulas(arch):
    W_enc, b_enc, W_dec, b_dec = weights()
    k = 3 if arch == "topk" else None
    threshold = torch.linspace(0.0, 1.0, D_SAE) if arch == "jumprelu" else None
    sae = SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, arch, k=k, threshold=threshold)
    x = torch.randn(7, D_IN)
    want = ref_encode(x, W_enc, b_enc, b_dec, arch, k, threshold)
    f = sae.encode(x)
    assert (f - want).abs().max().item() <= 1e-5
    if arch == "topk":
        assert ((f > 0).sum(1) <= 3).all() and ((f > 0).sum(1) == 3).any()
    if arch == "jumprelu":
        assert ((f > 0) & (f <= threshold)).sum() == 0  # nothing at or under its threshold survives
    assert (sae.decode(f) - (want @ W_dec + b_dec)).abs().max().item() <= 1e-5
    assert (sae(x) - (want @ W_dec + b_dec)).abs().max().item() <= 1e-5


def test_apply_b_dec_to_input_false_does_not_subtract():
    W_enc, b_enc, W_dec, b_dec = weights(1)
    sae = SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input=False)
    x = torch.randn(4, D_IN)
    want = ref_encode(x, W_enc, b_enc, b_dec, apply_b_dec=False)
    assert (sae.encode(x) - want).abs().max().item() <= 1e-5
    assert (sae.encode(x) - ref_encode(x, W_enc, b_enc, b_dec)).abs().max().item() > 1e-3


def test_feature_axis_rules_per_position_for_conv_maps():
    W_enc, b_enc, W_dec, b_dec = weights(2)
    sae = SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, "topk", k=4)
    conv = torch.randn(2, D_IN, 3, 5)  # (B, C, H, W): features on dim 1, one SAE vector per position
    f = sae.encode(conv)
    assert f.shape == (2, D_SAE, 3, 5)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                want = ref_encode(conv[b, :, i, j][None], W_enc, b_enc, b_dec, "topk", 4)[0]
                assert (f[b, :, i, j] - want).abs().max().item() <= 1e-5
    assert sae.decode(f).shape == conv.shape
    seq = torch.randn(2, 4, D_IN)  # (B, T, D): the last dim
    assert (sae.encode(seq)[1, 2] - ref_encode(seq[1, 2][None], W_enc, b_enc, b_dec, "topk", 4)[0]).abs().max() <= 1e-5
    channels_last = conv.permute(0, 2, 3, 1)  # 4-D but (B, H, W, C): say so with feature_axis
    assert (sae.encode(channels_last, feature_axis=-1) - f.permute(0, 2, 3, 1)).abs().max().item() <= 1e-5
    assert sae.check_site((1, D_IN, 8, 8)) == 1 and sae.check_site((1, 8, D_IN)) == 2


def test_rescale_acts_by_decoder_norm_matches_saelens_topk():
    W_enc, b_enc, W_dec, b_dec = weights(3)
    sae = SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, "topk", k=2, rescale_acts_by_decoder_norm=True)
    x = torch.randn(5, D_IN)
    norms = W_dec.norm(dim=1)
    pre = ((x - b_dec) @ W_enc + b_enc) * norms
    top = pre.topk(2, dim=1)
    want = torch.zeros_like(pre).scatter_(1, top.indices, top.values.clamp(min=0))
    assert (sae.encode(x) - want).abs().max().item() <= 1e-5
    assert (sae.decode(want) - ((want / norms) @ W_dec + b_dec)).abs().max().item() <= 1e-5
    assert (sae.decoder_directions() - W_dec / norms[:, None]).abs().max().item() <= 1e-6


# -- bad input, found when the SAE is built or loaded
def test_nan_weights_are_refused_naming_the_tensor():
    W_enc, b_enc, W_dec, b_dec = weights()
    W_dec[3, 2] = float("nan")
    with pytest.raises(SAEError, match=r"W_dec contains 1 non-finite values \(1 NaN"):
        SparseAutoencoder(W_enc, b_enc, W_dec, b_dec)
    b_enc[0] = float("inf")
    with pytest.raises(SAEError, match="b_enc contains 1 non-finite"):
        SparseAutoencoder(W_enc, b_enc, W_dec.nan_to_num(), b_dec)


def test_shape_mismatch_and_unknown_architecture_are_refused():
    W_enc, b_enc, W_dec, b_dec = weights()
    with pytest.raises(SAEError, match=r"W_dec has shape \(6, 12\), expected \(12, 6\)"):
        SparseAutoencoder(W_enc, b_enc, W_dec.T, b_dec)
    with pytest.raises(SAEError, match=r"b_dec has shape \(5,\), expected \(6,\)"):
        SparseAutoencoder(W_enc, b_enc, W_dec, b_dec[:5])
    with pytest.raises(SAEError, match="unknown SAE architecture 'gated'; supported: standard, topk, jumprelu"):
        SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, "gated")
    with pytest.raises(SAEError, match=r"topk SAE needs k, an integer in 1..d_sae \(12\), got None"):
        SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, "topk")
    with pytest.raises(SAEError, match="jumprelu SAE needs a threshold"):
        SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, "jumprelu")


def test_check_site_names_both_sizes():
    sae = SparseAutoencoder(*weights())
    with pytest.raises(SAEError, match=r"the SAE has d_in=6, but the activation at site decoder.fc.1.output has 10 "
                                       r"features \(shape \(1, 10\)"):
        sae.check_site((1, 10), site="decoder.fc.1.output")
    with pytest.raises(SAEError, match=r"has 32 features \(shape \(2, 32, 4, 4\), features on channels of a \(B, C, H, W\)"):
        sae.check_site((2, 32, 4, 4))
    with pytest.raises(SAEError, match="feature_axis 0 does not fit"):
        sae.check_site((2, 6), feature_axis=0)
    with pytest.raises(SAEError, match="d_in=6"):
        sae.encode(torch.randn(3, 7))
    assert issubclass(SAEError, LatentExplainerError) and issubclass(SAEError, ValueError)


# -- layouts, each written by hand from its documentation
def write_saelens(folder, tensors, cfg):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


SAELENS_V6 = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
              "normalize_activations": "none", "reshape_activations": "none",
              "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.2.hook_resid_pre", "model_name": "gpt2"}}


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_v6_layout(tmp_path, arch):
    W_enc, b_enc, W_dec, b_dec = weights(4)
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    cfg = dict(SAELENS_V6, architecture=arch)
    threshold = None
    if arch == "topk":
        cfg["k"] = 5
    if arch == "jumprelu":
        threshold = torch.rand(D_SAE)
        tensors["threshold"] = threshold
    folder = write_saelens(tmp_path / "sae", tensors, cfg)
    assert detect_layout(folder) == "saelens"
    sae = load_sae(folder / "cfg.json")  # a file inside the folder works too
    assert sae.architecture == arch and sae.k == (5 if arch == "topk" else None)
    assert torch.equal(sae.W_enc, W_enc) and torch.equal(sae.W_dec, W_dec) and torch.equal(sae.b_dec, b_dec)
    assert sae.site == "blocks.2.hook_resid_pre" and sae.meta["layout"] == "saelens"
    x = torch.randn(9, D_IN)
    want = ref_encode(x, W_enc, b_enc, b_dec, arch, cfg.get("k"), threshold)
    assert (sae.encode(x) - want).abs().max().item() <= 1e-5


def test_saelens_pre_v6_topk_config(tmp_path):
    """Configs before SAELens 6 name the activation (activation_fn_str + activation_fn_kwargs.k), not the architecture."""
    W_enc, b_enc, W_dec, b_dec = weights(5)
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.0.hook_resid_post", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 2}, "apply_b_dec_to_input": False, "normalize_activations": False}
    folder = write_saelens(tmp_path / "old", {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, cfg)
    sae = load_sae(folder)
    assert (sae.architecture, sae.k, sae.apply_b_dec_to_input, sae.site) == ("topk", 2, False, "blocks.0.hook_resid_post")
    x = torch.randn(5, D_IN)
    assert (sae.encode(x) - ref_encode(x, W_enc, b_enc, b_dec, "topk", 2, apply_b_dec=False)).abs().max() <= 1e-5


def test_saelens_unsupported_options_are_refused(tmp_path):
    W_enc, b_enc, W_dec, b_dec = weights()
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    folder = write_saelens(tmp_path / "a", tensors, dict(SAELENS_V6, architecture="standard",
                                                         normalize_activations="layer_norm"))
    with pytest.raises(SAEError, match=r"normalize_activations='layer_norm' is not supported \(supported: 'none'\)"):
        load_sae(folder)
    folder = write_saelens(tmp_path / "b", tensors, dict(SAELENS_V6, architecture="gated"))
    with pytest.raises(SAEError, match="unknown SAE architecture 'gated'; supported: standard, topk, jumprelu"):
        load_sae(folder)
    folder = write_saelens(tmp_path / "c", {**tensors, "W_enc": W_enc.clone().fill_(float("nan"))},
                           dict(SAELENS_V6, architecture="standard"))
    with pytest.raises(SAEError, match="W_enc contains 72 non-finite"):
        load_sae(folder)
    folder = write_saelens(tmp_path / "d", tensors, dict(SAELENS_V6, architecture="standard", d_in=7))
    with pytest.raises(SAEError, match="says d_in=7, but the weights have d_in=6"):
        load_sae(folder)


def test_sparsify_layout_per_hookpoint(tmp_path):
    g = torch.Generator().manual_seed(6)
    enc_w, enc_b = torch.randn(D_SAE, D_IN, generator=g), torch.randn(D_SAE, generator=g)
    W_dec, b_dec = torch.randn(D_SAE, D_IN, generator=g), torch.randn(D_IN, generator=g)
    run = tmp_path / "run"
    for hook in ("layers.3", "layers.5"):
        (run / hook).mkdir(parents=True)
        save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
                  str(run / hook / "sae.safetensors"))
        (run / hook / "cfg.json").write_text(json.dumps({
            "activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": 0, "k": 3,
            "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}))
    with pytest.raises(SAEError, match=r"holds one SAE per hookpoint \(layers.3, layers.5\); pass hookpoint=NAME"):
        load_sae(run)
    sae = load_sae(run, hookpoint="layers.5")
    assert sae.architecture == "topk" and sae.k == 3 and sae.meta["layout"] == "sparsify"
    assert torch.equal(sae.W_enc, enc_w.T) and torch.equal(sae.W_dec, W_dec)
    x = torch.randn(8, D_IN)
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)  # sparsify: ReLU(encoder(x - b_dec)), then top-k
    top = pre.topk(3, dim=1)
    want = torch.zeros_like(pre).scatter_(1, top.indices, top.values)
    assert (sae.encode(x) - want).abs().max().item() <= 1e-5
    assert (sae.decode(want) - (want @ W_dec + b_dec)).abs().max().item() <= 1e-5


def write_dictionary_learning(folder, state, trainer):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"d_submodule": D_IN}}))
    return folder


def dl_tensors(seed=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D_SAE, D_IN, generator=g), torch.randn(D_SAE, generator=g),
            torch.randn(D_IN, D_SAE, generator=g), torch.randn(D_IN, generator=g))


def test_dictionary_learning_autoencoder_and_topk(tmp_path):
    enc_w, enc_b, dec_w, bias = dl_tensors()
    x = torch.randn(6, D_IN)
    folder = write_dictionary_learning(tmp_path / "std", {"bias": bias, "encoder.weight": enc_w, "encoder.bias": enc_b,
                                                          "decoder.weight": dec_w},
                                       {"dict_class": "AutoEncoder", "activation_dim": D_IN, "dict_size": D_SAE})
    with pytest.raises(SAEError, match="ae.pt is a pickle.*allow_pickle=True"):
        load_sae(folder)
    sae = load_sae(folder, allow_pickle=True)
    want = torch.relu((x - bias) @ enc_w.T + enc_b)  # AutoEncoder.encode: ReLU(encoder(x - bias))
    assert sae.architecture == "standard" and (sae.encode(x) - want).abs().max().item() <= 1e-5
    assert (sae.decode(want) - (want @ dec_w.T + bias)).abs().max().item() <= 1e-5  # decoder(f) + bias

    folder = write_dictionary_learning(tmp_path / "topk", {"k": torch.tensor(4, dtype=torch.int), "threshold":
                                                           torch.tensor(-1.0), "decoder.weight": dec_w,
                                                           "encoder.weight": enc_w, "encoder.bias": enc_b,
                                                           "b_dec": bias},
                                       {"dict_class": "AutoEncoderTopK", "k": 4, "activation_dim": D_IN,
                                        "dict_size": D_SAE, "submodule_name": "resid_post_layer_3"})
    sae = load_sae(folder, allow_pickle=True)
    post = torch.relu((x - bias) @ enc_w.T + enc_b)
    top = post.topk(4, dim=1)
    want = torch.zeros_like(post).scatter_(1, top.indices, top.values)
    assert (sae.architecture, sae.k) == ("topk", 4) and (sae.encode(x) - want).abs().max().item() <= 1e-5


def test_dictionary_learning_batchtopk_and_jumprelu(tmp_path):
    enc_w, enc_b, dec_w, b_dec = dl_tensors(8)
    x = torch.randn(6, D_IN)
    folder = write_dictionary_learning(tmp_path / "btk", {"k": torch.tensor(3, dtype=torch.int), "threshold":
                                                          torch.tensor(0.7), "decoder.weight": dec_w,
                                                          "encoder.weight": enc_w, "encoder.bias": enc_b, "b_dec": b_dec},
                                       {"dict_class": "BatchTopKSAE", "k": 3})
    sae = load_sae(folder, allow_pickle=True)
    post = torch.relu((x - b_dec) @ enc_w.T + enc_b)  # BatchTopKSAE.encode(use_threshold=True)
    want = post * (post > 0.7)
    assert (sae.encode(x) - want).abs().max().item() <= 1e-5 and (want > 0).any() and (post > 0).sum() > (want > 0).sum()

    W_enc, W_dec, thr = torch.randn(D_IN, D_SAE), torch.randn(D_SAE, D_IN), torch.rand(D_SAE)
    folder = write_dictionary_learning(tmp_path / "jr", {"W_enc": W_enc, "b_enc": enc_b, "W_dec": W_dec, "b_dec": b_dec,
                                                         "threshold": thr}, {"dict_class": "JumpReluAutoEncoder"})
    sae = load_sae(folder, allow_pickle=True)
    pre = x @ W_enc + enc_b  # JumpReluAutoEncoder: no b_dec on the input by default
    want = torch.relu(pre * (pre > thr))
    assert sae.architecture == "jumprelu" and (sae.encode(x) - want).abs().max().item() <= 1e-5

    folder = write_dictionary_learning(tmp_path / "gated", {"W_enc": W_enc}, {"dict_class": "GatedAutoEncoder"})
    with pytest.raises(SAEError, match="dict_class 'GatedAutoEncoder' is not supported .*AutoEncoderTopK"):
        load_sae(folder, allow_pickle=True)


def test_missing_files_list_every_layout(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "cfg.json").write_text("{}")
    with pytest.raises(SAEError) as info:
        load_sae(tmp_path / "half")
    message = str(info.value)
    for needed in ("saelens: cfg.json + sae_weights.safetensors", "sparsify: cfg.json + sae.safetensors",
                   "dictionary_learning: ae.pt + config.json", "Found: cfg.json"):
        assert needed in message
    with pytest.raises(SAEError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text(json.dumps(dict(SAELENS_V6, architecture="standard")))
    (tmp_path / "bad" / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoadError, match="not a valid safetensors file"):
        load_sae(tmp_path / "bad")
    write_saelens(tmp_path / "few", {"W_enc": torch.zeros(D_IN, D_SAE)}, dict(SAELENS_V6, architecture="standard"))
    with pytest.raises(SAEError, match="has no tensor\\(s\\) b_enc, W_dec, b_dec"):
        load_sae(tmp_path / "few")


def test_save_sae_writes_the_saelens_layout(tmp_path):
    W_enc, b_enc, W_dec, b_dec = weights(9)
    sae = SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, "jumprelu", threshold=torch.rand(D_SAE),
                            site="decoder.fc.1.output")
    folder = save_sae(sae, tmp_path / "out")
    raw = load_file(str(folder / "sae_weights.safetensors"))  # read back without the loader
    cfg = json.loads((folder / "cfg.json").read_text())
    assert sorted(raw) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert raw["W_enc"].shape == (D_IN, D_SAE) and raw["W_dec"].shape == (D_SAE, D_IN)
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"]) == ("jumprelu", 6, 12, "none")
    assert cfg["metadata"]["hook_name"] == "decoder.fc.1.output"
    back = load_sae(folder)
    x = torch.randn(5, D_IN)
    assert torch.equal(back.threshold, sae.threshold) and torch.allclose(back.encode(x), sae.encode(x))
    topk = save_sae(SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, "topk", k=3), tmp_path / "topk")
    assert json.loads((topk / "cfg.json").read_text())["k"] == 3 and load_sae(topk).k == 3


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_feature_activation_equals_the_encoded_feature(arch):
    W_enc, b_enc, W_dec, b_dec = weights(10)
    sae = SparseAutoencoder(W_enc, b_enc, W_dec, b_dec, arch, k=4 if arch == "topk" else None,
                            threshold=torch.rand(D_SAE) if arch == "jumprelu" else None)
    x = torch.randn(5, 3, 2, D_IN)  # one feature per item, every position
    features = torch.tensor([0, 11, 4, 4, 7])
    got = sae.feature_activation(x, features)
    full = sae.encode_last(x)
    assert got.shape == (5, 3, 2)
    for b in range(5):
        assert (got[b] - full[b, ..., int(features[b])]).abs().max().item() <= 1e-5
    assert (got > 0).any()
