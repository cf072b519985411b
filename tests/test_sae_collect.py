"""Collecting activations at a site, streamed to shards: equal to a plain torch hook loop, bounded memory."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from latentexplainer_plugin.hookspecs import hookimpl
from latentexplainer_plugin.models.conv_vae import ConvVAE, ConvVAEConfig
from latentexplainer_plugin.plugins import get_plugin_manager
from latentexplainer_plugin.sae.collect import ActivationStore, CollectError, collect_activations, to_rows
from latentexplainer_plugin.types import Site


def _vae() -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(ConvVAEConfig(latent_dim=4, image_size=16, width=8, hidden=32)).eval()


def _latent_batches(n_batches: int, batch: int = 5, dim: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g) for _ in range(n_batches)]


def _reference(module: nn.Module, model: nn.Module, batches, kind: str) -> list[torch.Tensor]:
    """What a plain forward hook sees: input, output or output - input of ``module`` per batch."""
    seen: list[torch.Tensor] = []

    def fn(m, args, out):
        value = args[0] if kind == "input" else out if kind == "output" else out - args[0]
        seen.append(value.detach().clone())

    handle = module.register_forward_hook(fn)
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return seen


def test_conv_site_equals_torch_hook_reference_with_positions(tmp_path):
    vae = _vae()
    batches = _latent_batches(3)
    manifest = collect_activations(vae.decoder, "deconv.0.output", batches, tmp_path / "c", shard_rows=37)
    ref = torch.cat(_reference(vae.decoder.deconv[0], vae.decoder, batches, "output"))  # (15, C, 8, 8)
    assert manifest.positions == [8, 8] and manifest.d_in == ref.shape[1] and manifest.n_items == 15
    assert manifest.count == 15 * 64 and len(manifest.shards) == -(-15 * 64 // 37)
    data = ActivationStore(tmp_path / "c").load()
    # row r is item i at position (h, w) = divmod(position, 8): rebuild the map and compare
    rebuilt = torch.zeros_like(ref)
    rebuilt[data["item"], :, data["position"] // 8, data["position"] % 8] = data["activations"]
    assert torch.allclose(rebuilt, ref, atol=1e-6, rtol=0)
    assert torch.equal(data["item"], torch.arange(15).repeat_interleave(64))
    on_disk = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert on_disk["site"] == "deconv.0.output" and on_disk["dtype"] == "float32" and on_disk["count"] == 960


def test_update_is_output_minus_input_and_input_site(tmp_path):
    vae = _vae()
    batches = _latent_batches(2)
    m = collect_activations(vae.decoder, "deconv.1", batches, tmp_path / "u", update=True)  # a SiLU: same shape in and out
    assert (m.site, m.kind) == ("deconv.1.update", "update")  # recorded as the update site it is
    ref = torch.cat(_reference(vae.decoder.deconv[1], vae.decoder, batches, "update"))
    got = ActivationStore(tmp_path / "u").load()["activations"]
    assert torch.allclose(got, ref.movedim(1, -1).reshape(-1, ref.shape[1]), atol=1e-6, rtol=0)
    assert got.abs().max() > 0.01  # a real update, not zeros

    m = collect_activations(vae.decoder, Site("fc", "input"), batches, tmp_path / "i")
    assert m.positions == [] and m.d_in == 4
    ref = torch.cat(_reference(vae.decoder.fc, vae.decoder, batches, "input"))
    assert torch.equal(ref, torch.cat(batches))
    assert torch.allclose(ActivationStore(tmp_path / "i").load()["activations"], ref, atol=1e-6, rtol=0)


def test_update_refuses_a_module_that_changes_shape(tmp_path):
    vae = _vae()
    with pytest.raises(CollectError, match=r"input \(5, 4\) and output \(5, 32\)"):
        collect_activations(vae.decoder, "fc.0", _latent_batches(1), tmp_path / "x", update=True)


def test_sequence_layout_and_many_calls(tmp_path):
    class Loop(nn.Module):  # a sampling loop: the block runs 3 times per forward
        def __init__(self):
            super().__init__()
            self.block = nn.Linear(6, 6)

        def forward(self, x):
            for _ in range(3):
                x = x + self.block(x)
            return x

    torch.manual_seed(0)
    model = Loop()
    batches = [torch.randn(2, 5, 6) for _ in range(2)]  # (B, T, D): channels_last
    m = collect_activations(model, "block", batches, tmp_path / "s", calls=3, shard_rows=7)
    assert m.positions == [5] and m.d_in == 6 and m.calls == 3 and m.layout == "channels_last"
    data = ActivationStore(tmp_path / "s").load()
    ref = _reference(model.block, model, batches, "output")  # batch0 call0..2, batch1 call0..2
    expected = torch.cat([r.reshape(-1, 6) for r in ref])
    assert torch.allclose(data["activations"], expected, atol=1e-6, rtol=0)
    assert data["call"].tolist()[:30] == [0] * 10 + [1] * 10 + [2] * 10


def test_memory_held_does_not_grow_with_the_number_of_shards(tmp_path):
    vae = _vae()
    held = {}
    for n_batches in (4, 40):
        m = collect_activations(vae.decoder, "deconv.0", _latent_batches(n_batches, batch=2), tmp_path / str(n_batches), shard_rows=200)
        held[n_batches] = (len(m.shards), m.max_rows_held)
    batch_rows = 2 * 64
    assert held[40][0] >= 10 * held[4][0] // 2  # many more shards...
    assert held[4][1] <= 200 + batch_rows and held[40][1] <= 200 + batch_rows  # ...same bound on rows held
    # reading back streams one shard at a time, in fixed-size batches
    store = ActivationStore(tmp_path / "40")
    sizes = [len(b["activations"]) for b in store.iter_batches(300)]
    assert sum(sizes) == len(store) == 40 * batch_rows and set(sizes[:-1]) == {300}


def test_latent_captured_hook_sees_every_batch(tmp_path):
    seen = []

    class Observer:
        @hookimpl
        def latentexplainer_latent_captured(self, site, call, activation):
            seen.append((str(site), call, tuple(activation.shape)))

    pm = get_plugin_manager()
    plugin = Observer()
    pm.register(plugin)
    try:
        vae = _vae()
        collect_activations(vae.decoder, "deconv.0", _latent_batches(3), tmp_path / "h")
        collect_activations(vae.decoder, "deconv.1", _latent_batches(1), tmp_path / "h2", update=True)
    finally:
        pm.unregister(plugin)
    assert seen[:3] == [("deconv.0.output", 0, (5, 8, 8, 8))] * 3
    assert [s[0] for s in seen[3:]] == ["deconv.1.input", "deconv.1.output"]


def test_bad_input_is_refused_before_any_forward(tmp_path):
    vae = _vae()
    calls = []

    def source():
        calls.append(1)
        yield torch.zeros(1, 4)

    with pytest.raises(ValueError, match="closest valid module paths"):
        collect_activations(vae.decoder, "deconv.9", source, tmp_path / "a")
    with pytest.raises(CollectError, match="layout must be one of auto, channels_first"):
        collect_activations(vae.decoder, "deconv.0", source, tmp_path / "b", layout="nchw")
    with pytest.raises(CollectError, match="shard_rows must be an int >= 1"):
        collect_activations(vae.decoder, "deconv.0", source, tmp_path / "c", shard_rows=0)
    assert calls == []
    collect_activations(vae.decoder, "deconv.0", source, tmp_path / "d")
    with pytest.raises(CollectError, match="already holds a collection"):
        collect_activations(vae.decoder, "deconv.0", source, tmp_path / "d")
    with pytest.raises(CollectError, match="yielded no batches"):
        collect_activations(vae.decoder, "deconv.0", [], tmp_path / "e")
    with pytest.raises(CollectError, match="holds no manifest.json"):
        ActivationStore(tmp_path / "e")


def test_to_rows_layouts():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    rows, pos = to_rows(x, "channels_first")
    assert pos == [4] and rows.shape == (8, 3) and rows[1].tolist() == [1.0, 5.0, 9.0]
    rows, pos = to_rows(x, "channels_last")
    assert pos == [3] and rows.shape == (6, 4) and rows[1].tolist() == [4.0, 5.0, 6.0, 7.0]
    rows, pos = to_rows(x, "flat")
    assert pos == [] and rows.shape == (2, 12)
