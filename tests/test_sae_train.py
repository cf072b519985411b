"""Training a TopK SAE (sparsify) recovers planted features; metrics equal hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch

from latentexplainer_plugin.sae import SparseAutoencoder, load_sae
from latentexplainer_plugin.sae.collect import collect_activations
from latentexplainer_plugin.sae.metrics import SAEMetricsError, sae_metrics
from latentexplainer_plugin.sae.train import SAETrainError, shuffled_batches, train_sae


def planted(n: int = 6000, d_in: int = 24, n_atoms: int = 32, k_true: int = 3, seed: int = 0):
    """Rows that are sparse positive mixtures of a known unit-norm dictionary (the true features)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d_in, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_atoms, generator=g).argsort(dim=1)[:, :k_true]
    codes = torch.zeros(n, n_atoms).scatter_(1, idx, torch.rand(n, k_true, generator=g) * 2 + 0.5)
    return codes @ atoms, atoms


def test_trained_sae_recovers_planted_features_and_loads_back(tmp_path):
    torch.set_num_threads(1)
    x, atoms = planted()
    sae, report = train_sae(x, d_sae=64, k=3, steps=300, batch_size=256, seed=0, out_dir=tmp_path / "sae", site="decoder.input")
    dirs = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (atoms @ dirs.T).max(dim=1).values  # each true atom's best match among learned decoder rows
    # measured (seeds 0-2, 300 steps): 32/32 atoms above 0.9 (min cosine 0.986), FVU 0.040-0.045
    assert int((best > 0.9).sum()) >= 30, best
    assert report.metrics["fvu"] < 0.1 and report.metrics["l0"] == pytest.approx(3.0, abs=0.01)
    assert report.loss_curve[-1] < report.loss_curve[0] / 3
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)  # unit-norm decoder (Gao et al.)
    # SAELens layout, read back by the project's loader
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["d_in"] == 24 and cfg["d_sae"] == 64
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    loaded = load_sae(tmp_path / "sae")
    assert torch.allclose(loaded.decode(loaded.encode(x[:50])), sae.decode(sae.encode(x[:50])), atol=1e-5)


def test_training_on_a_collection_streams_shards(tmp_path):
    torch.set_num_threads(1)
    x, atoms = planted(n=3000)
    collect_activations(torch.nn.Identity(), "", [x[i:i + 100] for i in range(0, 3000, 100)], tmp_path / "acts", shard_rows=500)
    sae, report = train_sae(tmp_path / "acts", d_sae=64, k=3, steps=300, batch_size=128, seed=1)
    assert report.d_in == 24 and report.rows_seen == 300 * 128
    best = (atoms @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T).max(dim=1).values
    assert int((best > 0.9).sum()) >= 26, best  # measured (seeds 0-2): 30, 32, 32 of 32
    assert report.metrics["n_rows"] == 3000


def test_shuffled_batches_cover_every_row_of_a_collection_once_per_epoch(tmp_path):
    x = torch.arange(30, dtype=torch.float32).repeat(2, 1).T  # row i = (i, i)
    collect_activations(torch.nn.Identity(), "", [x[i:i + 3] for i in range(0, 30, 3)], tmp_path / "a", shard_rows=4)
    from latentexplainer_plugin.sae.collect import ActivationStore

    gen = shuffled_batches(ActivationStore(tmp_path / "a"), batch_size=5, seed=0, buffer_rows=10)
    seen = torch.cat([next(gen) for _ in range(6)])[:, 0]
    assert sorted(seen.tolist()) == list(range(30)) and seen.tolist() != list(range(30))


def test_metrics_equal_hand_computed_values():
    # identity SAE on 2 dims (features = positive parts): x_hat = relu(x), so negatives are lost
    sae = SparseAutoencoder(torch.eye(2), torch.zeros(2), torch.eye(2), torch.zeros(2), "standard",
                            apply_b_dec_to_input=False)
    x = torch.tensor([[1.0, 0.0], [3.0, -2.0], [2.0, 0.0], [0.0, 0.0]])
    m = sae_metrics(sae, x, batch_size=3, dense_threshold=0.3)
    # SSE: only (-2)^2 = 4. mean = (1.5, -0.5); total var = (0.25+2.25+0.25+2.25) + (0.25+2.25+0.25+0.25) = 8
    assert m.fvu == pytest.approx(4 / 8)
    # active (> 0): feature 0 on rows 0,1,2; feature 1 never -> L0 = 3/4, dead = [1], dense (> 30 %) = [0]
    assert m.l0 == pytest.approx(0.75) and m.dead == [1] and m.dense == [0]
    assert m.frequency.tolist() == pytest.approx([0.75, 0.0]) and m.max_activation.tolist() == [3.0, 0.0]
    assert m.as_dict()["n_dead"] == 1 and m.n_rows == 4


def test_bad_input_is_refused():
    x, _ = planted(n=100)
    with pytest.raises(SAETrainError, match=r"k \(9\) must be at most d_sae \(8\)"):
        train_sae(x, d_sae=8, k=9, steps=1)
    with pytest.raises(SAETrainError, match="steps must be an int >= 1"):
        train_sae(x, d_sae=8, k=2, steps=0)
    with pytest.raises(SAETrainError, match="2-D float tensor"):
        train_sae(x[0], d_sae=8, k=2, steps=1)
    bad = x.clone()
    bad[:] = float("nan")
    with pytest.raises(SAETrainError, match="NaN or inf"):
        train_sae(bad, d_sae=8, k=2, steps=1)
    sae = SparseAutoencoder.identity(4)
    with pytest.raises(SAEMetricsError, match="d_in=4, but the activations have 24 features"):
        sae_metrics(sae, x)
    with pytest.raises(SAEMetricsError, match="dense_threshold must be in"):
        sae_metrics(sae, x[:, :4], dense_threshold=10)
