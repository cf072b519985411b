"""Direction finders: PCA, Jacobian pull-back and conditional mean differences, checked against
explicit computations (numpy SVD, a dense Jacobian, hand-computed means) on tiny random UNets."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from latentexplainer_plugin.adapters.diffusion import DDPMAdapter
from latentexplainer_plugin.directions import Directions, PullbackDirections, conditional, pca, pullback
from latentexplainer_plugin.directions.pullback import site_function
from latentexplainer_plugin.hookspecs import hookimpl
from latentexplainer_plugin.plugins import register_plugin, registry, unregister_plugin

STEPS = 4  # timesteps 750, 500, 250, 0


def make_adapter(size, channels, **options):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=size, block_out_channels=channels, layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()
    return DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=STEPS, t_edit=500, **options)


@pytest.fixture(scope="module")
def adapter():
    return make_adapter(16, (16, 32))  # h: (32, 8, 8)


def orthonormal(vectors, tol=1e-4):
    flat = vectors.flatten(1).double()
    return torch.allclose(flat @ flat.T, torch.eye(len(flat), dtype=torch.float64), atol=tol)


def cos_principal_angles(a, b):
    """Cosines of the principal angles between the row spaces of a and b."""
    qa = torch.linalg.qr(a.flatten(1).double().T)[0]
    qb = torch.linalg.qr(b.flatten(1).double().T)[0]
    return torch.linalg.svdvals(qa.T @ qb)


def test_finders_are_registered(monkeypatch):
    assert {"pca", "pullback", "conditional", "axes", "given"} <= set(registry("direction_finders").names())
    finder = registry("direction_finders").get("pca").factory
    calls = []
    expected = Directions(torch.ones(2, 3), {"finder": "pca"})
    import sys

    monkeypatch.setattr(sys.modules["latentexplainer_plugin.directions.pca"], "pca", lambda *a, **k: calls.append((a, k)) or expected)

    class Loop:  # what the registered finder checks before it delegates: an adapter with a sampling loop
        name, capabilities = "loop", frozenset({"sampling_loop", "directions"})

    adapter = Loop()
    assert finder(adapter, seed=7, n_directions=3, n_samples=4) is expected
    assert calls == [((adapter,), {"n_directions": 3, "n_samples": 4, "seed": 7})]
    Loop.capabilities = frozenset({"latent_axes"})
    with pytest.raises(ValueError, match="needs an adapter with sampling_loop"):
        finder(Loop(), seed=0)


class CaptureCounter:
    def __init__(self):
        self.calls = []

    @hookimpl
    def latentexplainer_latent_captured(self, site, call, activation):
        self.calls.append((str(site), call, tuple(activation.shape)))


def test_pca_matches_numpy_svd_of_captured_h(adapter):
    counter = CaptureCounter()
    register_plugin(counter, name="capture-counter")
    try:
        found = pca(adapter, n_directions=3, n_samples=6, seed=1)
    finally:
        unregister_plugin("capture-counter")
    assert [c[1] for c in counter.calls] == list(range(STEPS))  # the capture hook saw every step
    assert counter.calls[0] == ("mid_block.output", 0, (6, 32, 8, 8))
    assert found.vectors.shape == (3, 32, 8, 8) and orthonormal(found.vectors)

    # the same h, captured with a plain forward hook, and numpy's SVD of it
    h = []
    handle = adapter.unet.mid_block.register_forward_hook(lambda m, a, out: h.append(out.detach().clone()))
    try:
        adapter.sample(adapter.sample_bases(6, seed=1))
    finally:
        handle.remove()
    x = torch.stack(h[:2], dim=1).flatten(2).double().numpy()  # edit window: t >= 500 -> first 2 steps
    x = (x - x.mean(axis=0, keepdims=True)).reshape(12, -1)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    cos = np.abs(np.sum(vt[:3] * found.vectors.flatten(1).double().numpy(), axis=1))
    assert cos.min() > 0.999, cos
    assert found.provenance["explained_variance_ratio"] == pytest.approx(list(s[:3] ** 2 / (s ** 2).sum()), abs=1e-5)
    expected = {"finder": "pca", "site": "mid_block.output", "timestep": [750, 500], "seed": 1}
    assert {k: found.provenance[k] for k in expected} == expected


def test_pca_refuses_more_directions_than_data(adapter):
    with pytest.raises(ValueError, match="at most 2 principal directions"):
        pca(adapter, n_directions=3, n_samples=2)


def test_pullback_matches_dense_jacobian():
    adapter = make_adapter(8, (8, 16), scale=1.0)  # x: 3x8x8 = 192, h: 16x4x4 = 256
    found = pullback(adapter, n_directions=3, n_iter=30, seed=0)
    assert isinstance(found, PullbackDirections)
    assert orthonormal(found.vectors) and orthonormal(found.x_vectors)
    assert found.provenance["timestep"] == 750 and found.provenance["finder"] == "pullback"

    # the dense Jacobian at the same x_t: one backward pass per h coordinate, batched
    x_t = adapter.sample_bases(1, seed=0)  # t = 750 is the first step: x_t = x_T
    f = site_function(adapter.unet, adapter.unet.mid_block, "output", 750)
    d_h = 16 * 4 * 4
    xs = x_t.expand(d_h, 3, 8, 8).clone().requires_grad_(True)
    with torch.enable_grad():
        rows = torch.autograd.grad(f(xs), xs, torch.eye(d_h).view(d_h, 16, 4, 4))[0]
    jacobian = rows.flatten(1).double()  # (d_h, d_x)
    u, s, vt = torch.linalg.svd(jacobian, full_matrices=False)
    assert found.singular_values.double() == pytest.approx(s[:3], rel=1e-3)
    assert cos_principal_angles(found.x_vectors, vt[:3]).min() > 0.999  # right singular vectors: x-space
    assert cos_principal_angles(found.vectors, u[:, :3].T).min() > 0.999  # left singular vectors: h-space
    # u_i = J v_i / s_i: the h-space direction is where the x-space direction moves h
    moved = (jacobian @ found.x_vectors.flatten(1).double().T).T / found.singular_values.double()[:, None]
    assert torch.allclose(moved, found.vectors.flatten(1).double(), atol=1e-3)


def test_conditional_is_the_mean_difference():
    codes = torch.randn(10, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 0, 1])
    found = conditional(codes, labels, label_names=["smiling"])
    by_hand = codes[labels == 1].mean(0) - codes[labels == 0].mean(0)
    assert torch.allclose(found.vectors[0], by_hand / by_hand.norm(), atol=1e-6)
    info = found.provenance["labels"][0]
    assert info == {"label": "smiling", "n_pos": 5, "n_neg": 5, "norm": pytest.approx(float(by_hand.norm()), abs=1e-5)}
    two = conditional(codes, torch.stack([labels, 1 - labels], dim=1))  # one direction per label column
    assert torch.allclose(two.vectors[1], -two.vectors[0], atol=1e-6)
    with pytest.raises(ValueError, match="both classes are needed"):
        conditional(codes, torch.ones(10))
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\)"):
        conditional(codes, torch.ones(3))


def test_conditional_from_adapter_and_classifier(adapter):
    def brighter_than_average(images):  # a classifier on generated images
        mean = images.mean(dim=(1, 2, 3))
        return mean > mean.median()

    found = conditional(adapter=adapter, classifier=brighter_than_average, n_samples=6, seed=2)
    assert found.vectors.shape == (1, 32, 8, 8)
    assert found.provenance["finder"] == "conditional" and found.provenance["timestep"] == [750, 500]
    assert found.provenance["labels"][0]["n_pos"] == 3


def test_directions_provenance_round_trips(adapter, tmp_path):
    found = pca(adapter, n_directions=2, n_samples=4, seed=3)
    path = found.save(tmp_path / "pca.safetensors")
    loaded = Directions.load(path)
    assert torch.equal(loaded.vectors, found.vectors)
    assert {k: loaded.provenance[k] for k in found.provenance} == found.provenance
    small = make_adapter(8, (8, 16))
    pulled = pullback(small, n_directions=2, n_iter=3)
    again = PullbackDirections.load(pulled.save(tmp_path / "pullback.safetensors"))
    assert torch.equal(again.x_vectors, pulled.x_vectors) and torch.equal(again.singular_values, pulled.singular_values)
    assert again.provenance["singular_values"] == pulled.provenance["singular_values"]
    assert Directions.load(tmp_path / "pullback.safetensors").vectors.shape == (2, 16, 4, 4)  # plain readers still work
