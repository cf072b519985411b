"""Steering SAE features (h' = h + (a - f_k(h)) d_k) and SAE features as latents of the VAE / generator adapters.

References are independent of the code under test: per-item loops with the formula written out,
plain torch forward hooks instead of nnsight, and the plain latent traversal of the demo VAE.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from latentexplainer_plugin.adapters import VAEAdapter
from latentexplainer_plugin.adapters.generator import GeneratorAdapter
from latentexplainer_plugin.attribution import LatentExplainer
from latentexplainer_plugin.errors import EditError
from latentexplainer_plugin.hooks import apply_edit, run_with_edit
from latentexplainer_plugin.plugins import registry
from latentexplainer_plugin.sae import SAEEdit, SAEError, SAEFeatureAdapter, SparseAutoencoder, sae_edit
from latentexplainer_plugin.types import Edit, Site

STRENGTHS = torch.tensor([-3.0, -1.5, 0.0, 1.5, 3.0])


def random_sae(d_in, d_sae, arch="topk", seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = {"k": 3} if arch == "topk" else {}
    return SparseAutoencoder(torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, generator=g),
                             torch.randn(d_sae, d_in, generator=g), 0.1 * torch.randn(d_in, generator=g), arch, **kw)


def ref_steer(h, sae, k, a):
    """One vector h (d_in,): h + (a - f_k(h)) * W_dec[k], with f from the SAE's encode written out (topk or standard)."""
    pre = (h - sae.b_dec) @ sae.W_enc + sae.b_enc
    acts = pre.clamp(min=0)
    if sae.architecture == "topk":
        keep = set(acts.topk(sae.k).indices.tolist())
        acts = torch.tensor([float(acts[j]) if j in keep else 0.0 for j in range(len(acts))])
    return h + (a - float(acts[k])) * sae.W_dec[k]


@pytest.fixture(scope="module")
def demo():
    from latentexplainer_plugin.demo import load_demo_model

    return load_demo_model()


# -- the edit itself
def test_sae_edit_per_item_feature_and_target_matches_the_formula():
    sae = random_sae(5, 9)
    h = torch.randn(6, 5)
    features = torch.tensor([0, 3, 3, 8, 1, 0])
    targets = torch.tensor([0.0, 2.0, -1.0, 5.0, 0.5, 3.0])
    out = sae_edit(h, SAEEdit("sae", targets, index=features, sae=sae))
    for b in range(6):
        want = ref_steer(h[b], sae, int(features[b]), float(targets[b]))
        assert (out[b] - want).abs().max().item() <= 1e-5
    # the error term is kept: the edit moves h by a multiple of d_k only
    moved = out - h
    for b in range(6):
        d = sae.W_dec[int(features[b])]
        assert (moved[b] - (moved[b] @ d) / (d @ d) * d).abs().max().item() <= 1e-4


def test_sae_edit_on_conv_maps_is_per_position():
    sae = random_sae(4, 7, "standard", seed=1)
    h = torch.randn(3, 4, 2, 3)  # (B, C, H, W)
    features, targets = torch.tensor([2, 5, 6]), torch.tensor([1.0, 0.0, 4.0])
    out = sae_edit(h, SAEEdit("sae", targets, index=features, sae=sae))
    assert out.shape == h.shape
    for b in range(3):
        for i in range(2):
            for j in range(3):
                want = ref_steer(h[b, :, i, j], sae, int(features[b]), float(targets[b]))
                assert (out[b, :, i, j] - want).abs().max().item() <= 1e-5
    # with orthonormal decoder rows and W_enc = W_dec.T, the edited map reads f_k = a wherever the feature was
    # active, and ReLU(pre_k + a) where it was not (the error term, pre_k < 0, is kept)
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    ortho = SparseAutoencoder(q, torch.zeros(4), q.T.contiguous(), torch.zeros(4))
    h = torch.randn(2, 4, 3, 3)
    targets = torch.tensor([0.7, 2.0])
    edited = sae_edit(h, SAEEdit("sae", targets, index=torch.tensor([1, 3]), sae=ortho))
    for b, k in ((0, 1), (1, 3)):
        pre = torch.einsum("chw,c->hw", h[b], q[:, k])
        want = torch.where(pre >= 0, targets[b], (pre + targets[b]).clamp(min=0))
        assert (ortho.encode(edited)[b, k] - want).abs().max().item() <= 1e-5
    assert (ortho.encode(h)[0, 1] > 0).any() and (ortho.encode(h)[0, 1] == 0).any()


def test_sae_edit_refuses_bad_edits():
    sae = random_sae(5, 9)
    h = torch.randn(2, 5)
    with pytest.raises(EditError, match="needs an SAEEdit carrying the SAE"):
        sae_edit(h, Edit("sae", torch.zeros(2), index=0))
    with pytest.raises(EditError, match=r"feature index \[9\] is out of range: the SAE has 9 features \(0..8\)"):
        sae_edit(h, SAEEdit("sae", torch.zeros(2), index=torch.tensor([9, 9]), sae=sae))
    with pytest.raises(EditError, match=r"one target activation per batch item \(2\)"):
        sae_edit(h, SAEEdit("sae", torch.zeros(3), index=0, sae=sae))
    with pytest.raises(SAEError, match="d_in=5, but the activation has 4 features"):
        sae_edit(torch.randn(2, 4), SAEEdit("sae", torch.zeros(2), index=0, sae=sae))


def test_the_rule_is_served_through_the_edit_rule_registry():
    entry = registry("edit_rules").get("sae")  # a built-in: registered by default_plugins like add and set
    assert entry.plugin == "latentexplainer_plugin.default_plugins.edits" and callable(entry.factory.validate)
    sae = random_sae(5, 9)
    h = torch.randn(4, 5)
    edit = SAEEdit("sae", torch.full((4,), 1.5), index=2, sae=sae)
    assert (apply_edit(h, edit) - sae_edit(h, edit)).abs().max().item() == 0.0
    add = apply_edit(h, Edit("add", torch.ones(4), direction=torch.ones(5)))  # other rules still reach the built-ins
    assert (add - (h + 1)).abs().max().item() <= 1e-6
    with pytest.raises(EditError, match="one strength per batch item|strengths"):  # the registry's own check
        apply_edit(h, SAEEdit("sae", torch.zeros(3), index=0, sae=sae))


class TinyDecoder(nn.Module):
    """z (B, 3) -> fc -> (B, 8, 4, 4) -> deconv -> images (B, 3, 8, 8) in [0, 1]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 8 * 16)
        self.up = nn.ConvTranspose2d(8, 8, 4, 2, 1)
        self.act = nn.SiLU()
        self.out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        h = self.act(self.up(self.fc(z).view(len(z), 8, 4, 4)))
        return torch.sigmoid(self.out(h))


def test_nnsight_edit_equals_a_plain_torch_hook_on_a_conv_site():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    sae = random_sae(8, 20, "topk", seed=2)
    z = torch.randn(6, 3)
    features = torch.tensor([0, 4, 4, 19, 7, 11])
    targets = torch.tensor([0.0, 1.0, 3.0, 2.0, 0.5, 6.0])
    edit = SAEEdit("sae", targets, index=features, sae=sae)
    got = run_with_edit(model, Site("act", "output"), edit, z)

    def hook(module, args, out):  # the same edit, position by position, with the formula written out
        edited = out.clone()
        for b in range(out.shape[0]):
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    edited[b, :, i, j] = ref_steer(out[b, :, i, j], sae, int(features[b]), float(targets[b]))
        return edited

    handle = model.act.register_forward_hook(hook)
    try:
        with torch.no_grad():
            want = model(z)
    finally:
        handle.remove()
    assert (got - want).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (want - model(z)).abs().max().item() > 1e-3  # the edit changes the images


# -- features as latents
def test_identity_sae_steering_equals_the_set_traversal(demo):
    inner = VAEAdapter(demo)
    adapter = SAEFeatureAdapter(inner, SparseAutoencoder.identity(inner.latent_dim), strengths="absolute")
    bases = inner.sample_bases(3, seed=4).abs()  # f_k = ReLU(z_k) = z_k: the feature is the coordinate itself
    ours = adapter.traverse([0, 4, 9], bases, STRENGTHS)
    plain = inner.traverse([0, 4, 9], bases, STRENGTHS)
    for a, b in zip(ours, plain):
        assert a.images.shape == b.images.shape == (3, 1, 5, 3, 64, 64)
        assert (a.images - b.images).abs().max().item() <= 1e-5
        assert a.latent_id == b.latent_id.replace("z", "f") and a.rule == "sae"
    # where z_k < 0 the ReLU feature reads 0 and the error term (z_k) is kept: z'_k = z_k + a, never a reconstruction
    negative = bases.clone()
    negative[:, 4] = -1.0
    (t,) = adapter.traverse([4], negative, STRENGTHS)
    shifted = negative[:, None, :].repeat(1, 5, 1)
    shifted[:, :, 4] = -1.0 + STRENGTHS
    with torch.no_grad():
        want = demo.decode(shifted.reshape(-1, 10)).view(3, 5, 3, 64, 64)
    assert (t.images[:, 0] - want).abs().max().item() <= 1e-5


def test_d_in_mismatch_fails_before_any_forward(demo):
    inner = VAEAdapter(demo)
    calls = []
    handle = demo.decoder.register_forward_hook(lambda m, a, out: calls.append(1))
    try:
        with pytest.raises(SAEError, match=r"the SAE has d_in=12, but the activation at site decoder.input has 10 "):
            SAEFeatureAdapter(inner, SparseAutoencoder.identity(12))
        with pytest.raises(SAEError, match=r"d_in=12, but the activation at site decoder.fc.2.output has 1024 features"):
            SAEFeatureAdapter(inner, SparseAutoencoder.identity(12), site="decoder.fc.2.output")
    finally:
        handle.remove()
    assert calls == []  # the probe stops at the site: the decoder never finished a forward pass


def write_axis_sae(folder, d, shift):
    """An SAELens-layout SAE whose decoder rows are the latent axes; b_dec = -shift keeps f_k = z_k + shift > 0."""
    folder.mkdir()
    eye = torch.eye(d)
    save_file({"W_enc": eye, "b_enc": torch.zeros(d), "W_dec": eye.clone(), "b_dec": torch.full((d,), -shift)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d, "d_sae": d, "dtype": "float32", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"hook_name": "decoder.input"}}))
    return folder


def test_saelens_axis_sae_features_are_explained_as_their_latents(demo, tmp_path):
    shift = 4.0
    inner = VAEAdapter(demo)
    adapter = SAEFeatureAdapter(inner, write_axis_sae(tmp_path / "sae", 10, shift), strengths="absolute")
    assert str(adapter.site) == "decoder.input" and adapter.sae.meta["layout"] == "saelens"
    bases = inner.sample_bases(8, seed=0)
    assert bases.min() > -shift  # every feature is active: steering to s + shift sets z_k = s
    for a, b in zip(adapter.traverse(range(10), bases[:3], STRENGTHS + shift), inner.traverse(range(10), bases[:3], STRENGTHS)):
        assert (a.images - b.images).abs().max().item() <= 1e-5

    ours = LatentExplainer(adapter, backend="offline", bias="combination", strengths=(STRENGTHS + shift).tolist()).attribute()
    plain = LatentExplainer(inner, backend="offline", bias="combination", strengths=STRENGTHS.tolist()).attribute()
    assert [r.id for r in ours] == [f"f{k}" for k in range(10)]
    clear = 0
    for a, b in zip(ours, plain):
        assert a.clear == b.clear, (a.id, a.explanation, b.explanation)
        if b.clear:
            clear += 1
            assert a.explanation.replace(a.id, b.id) == b.explanation
    assert clear >= 3  # the demo VAE has several latents with a clear factor; else this test would prove nothing


def test_quantile_strengths_and_dead_features(demo):
    inner = VAEAdapter(demo)
    d = inner.latent_dim
    b_enc = torch.zeros(d)
    b_enc[7] = -100.0  # feature 7 never fires
    eye = torch.eye(d)
    sae = SparseAutoencoder(eye, b_enc, eye.clone(), torch.zeros(d))
    adapter = SAEFeatureAdapter(inner, sae, features=[2, 7], stats_bases=64, stats_seed=3)
    assert adapter.n_latents == 2 and [adapter.latent_id(i) for i in range(2)] == ["f2", "f7"]
    z = inner.sample_bases(64, seed=3)[:, 2]  # the feature at decoder.input is ReLU(z_2): its stats by hand
    positive = z[z > 0]
    stats = adapter.feature_stats()
    assert stats[0]["dead"] is False and stats[1]["dead"] is True and adapter.dead_latents() == [1]
    assert abs(float(adapter.stats["frequency"][0]) - len(positive) / 64) <= 1e-6
    assert abs(stats[0]["max"] - float(positive.max())) <= 1e-5
    assert abs(stats[0]["median_active"] - float(positive.sort().values[(len(positive) - 1) // 2])) <= 1e-5
    t_live, t_dead = adapter.traverse([0, 1], inner.sample_bases(5), STRENGTHS)
    top = float(positive.max())
    assert torch.allclose(t_live.strengths, torch.tensor([0.0, stats[0]["median_active"], top, 2 * top]), atol=1e-5)
    assert t_dead.strengths.abs().max() == 0 and t_dead.meta["dead"] is True
    assert (t_dead.images - t_dead.images[:, :, :1]).abs().max().item() == 0.0  # a dead feature changes nothing
    results = LatentExplainer(adapter, backend="offline").attribute()
    assert results[1].clear is False and adapter.describe()["dead"] == 1
    relative = SAEFeatureAdapter(inner, sae, features=[2], stats_bases=64, stats_seed=3, strengths="relative")
    (t,) = relative.traverse([0], inner.sample_bases(2), [0.0, 0.5, 1.0])
    assert torch.allclose(t.strengths, torch.tensor([0.0, 0.5 * top, top]), atol=1e-5)


def test_generator_adapter_conv_site_features(tmp_path):
    """SAE features at a conv site inside a generator: per-position steering, checked with a torch hook."""
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    inner = GeneratorAdapter(model, latent_dim=3)
    sae = random_sae(8, 16, "topk", seed=5)
    adapter = SAEFeatureAdapter(inner, sae, site="act.output", features=[1, 5, 9])
    bases = inner.sample_bases(2, seed=1)
    out = adapter.traverse([0, 2], bases, STRENGTHS)
    for t, k in zip(out, (1, 9)):
        assert t.latent_id == f"f{k}" and t.images.shape == (2, 1, 4, 3, 8, 8)
        for b in range(2):
            for s, a in enumerate(t.strengths.tolist()):
                def hook(module, args, act, a=a):
                    edited = act.clone()
                    for i in range(act.shape[2]):
                        for j in range(act.shape[3]):
                            edited[0, :, i, j] = ref_steer(act[0, :, i, j], sae, k, a)
                    return edited

                handle = model.act.register_forward_hook(hook)
                try:
                    with torch.no_grad():
                        want = model(bases[b][None])[0]
                finally:
                    handle.remove()
                assert (t.images[b, 0, s] - want).abs().max().item() <= 1e-5


def test_bad_adapter_arguments(demo):
    inner = VAEAdapter(demo)
    sae = SparseAutoencoder.identity(10)
    with pytest.raises(ValueError, match=r"features must be SAE feature numbers in 0..9, got \[10\]"):
        SAEFeatureAdapter(inner, sae, features=[1, 10])
    with pytest.raises(ValueError, match="strengths"):
        SAEFeatureAdapter(inner, sae, strengths="sigma")
    adapter = SAEFeatureAdapter(inner, sae, stats_bases=8)
    with pytest.raises(ValueError, match="use the combination bias"):
        adapter.traverse([0], inner.sample_bases(2), STRENGTHS, rows=2)
    with pytest.raises(TypeError, match="wraps an adapter that renders edits at a site"):
        SAEFeatureAdapter(object(), sae)
    foreign = SparseAutoencoder.identity(10, site="blocks.8.hook_resid_pre")  # another library's hook name
    assert str(SAEFeatureAdapter(inner, foreign, stats_bases=8).site) == "decoder.input"


def test_docs_example_runs_and_prints_what_it_says(capsys):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "sae.md").read_text()
    block = doc.split("### Example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "docs/sae.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed == block.strip().splitlines()[-1].lstrip("# ")


def test_chunks_bounded_by_sae_size_give_the_same_images(monkeypatch):
    import latentexplainer_plugin.sae.features as features_module

    torch.manual_seed(0)
    model = TinyDecoder().eval()
    adapter = SAEFeatureAdapter(GeneratorAdapter(model, latent_dim=3), random_sae(8, 16, "standard", seed=6),
                                site="act.output", stats_bases=16)
    bases = adapter.sample_bases(3, seed=2)
    whole = adapter.traverse([0, 5], bases, STRENGTHS)
    assert adapter._chunk() == 512
    monkeypatch.setattr(features_module, "MAX_SAE_VALUES", 16 * 64 * 4)  # 4 items of 64 positions x 16 features
    assert adapter._chunk() == 4
    for a, b in zip(adapter.traverse([0, 5], bases, STRENGTHS), whole):
        assert (a.images - b.images).abs().max().item() <= 1e-6
