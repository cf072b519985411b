"""VAE traversals: batched, equal to decoding each latent by hand, rows clamp the right latent."""

import pytest
import torch

from latentexplainer_plugin.adapters import VAEAdapter
from latentexplainer_plugin.report.strips import grid, labelled_grid, save_strip


def count_decoder_calls(model):
    calls = []
    model.decoder.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    return calls


def test_set_traversal_equals_decoding_by_hand(tiny_vae):
    adapter = VAEAdapter(tiny_vae)
    bases = adapter.sample_bases(3, seed=1)
    strengths = torch.tensor([-3.0, -1.5, 0.0, 1.5, 3.0])
    calls = count_decoder_calls(tiny_vae)
    out = adapter.traverse([0, 2, 3], bases, strengths)
    assert calls == [3 * 3 * 5]  # every latent x base x step in ONE decoder call
    assert [t.latent_id for t in out] == ["z0", "z2", "z3"]
    t = out[1]
    assert t.images.shape == (3, 1, 5, 3, 16, 16)
    with torch.no_grad():
        for b in range(3):
            for s, value in enumerate(strengths):
                z = bases[b].clone()
                z[2] = value
                want = tiny_vae.decode(z[None])[0]
                assert (t.images[b, 0, s] - want).abs().max().item() <= 1e-6


def test_rows_clamp_another_latent_at_two_values(tiny_vae):
    adapter = VAEAdapter(tiny_vae)
    bases = adapter.sample_bases(2, seed=0)
    (t,) = adapter.traverse([1], bases, [-1.0, 1.0], rows=2, clamp={1: 3}, clamp_values=(-2.0, 2.0))
    assert t.images.shape[:3] == (2, 2, 2)
    assert t.row_labels == ["z3 = -2", "z3 = +2"]
    assert t.base_latents[:, 0, 3].tolist() == [-2.0, -2.0] and t.base_latents[:, 1, 3].tolist() == [2.0, 2.0]
    with torch.no_grad():
        z = bases[1].clone()
        z[3], z[1] = 2.0, -1.0
        assert (t.images[1, 1, 0] - tiny_vae.decode(z[None])[0]).abs().max().item() <= 1e-6


def test_direction_traversal_adds_strength_times_direction(tiny_vae):
    adapter = VAEAdapter(tiny_vae)
    bases = adapter.sample_bases(2)
    dirs = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    out = adapter.traverse([], bases, [-1.0, 0.5], directions=dirs)
    assert [t.latent_id for t in out] == ["dir0", "dir1"] and out[1].rule == "add"
    with torch.no_grad():
        want = tiny_vae.decode((bases[0] + 0.5 * dirs[1])[None])[0]
    assert (out[1].images[0, 0, 1] - want).abs().max().item() <= 1e-6


def test_chunking_gives_the_same_images(tiny_vae):
    bases = torch.randn(4, 4)
    big = VAEAdapter(tiny_vae).traverse([0, 1], bases, [-1.0, 0.0, 1.0])
    calls = count_decoder_calls(tiny_vae)
    small = VAEAdapter(tiny_vae, max_batch=5).traverse([0, 1], bases, [-1.0, 0.0, 1.0])
    assert calls == [5, 5, 5, 5, 4]
    for a, b in zip(big, small):
        assert torch.allclose(a.images, b.images, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"indices": [4]}, IndexError, r"latent index 4 is out of range: this model has 4 latents \(0..3\)"),
        ({"indices": [-1]}, IndexError, "out of range"),
        ({"strengths": []}, ValueError, "at least 2 values"),
        ({"strengths": [0.0, float("nan")]}, ValueError, "finite"),
        ({"bases": torch.full((2, 4), float("inf"))}, ValueError, "non-finite"),
        ({"bases": torch.zeros(2, 5)}, ValueError, r"shape \(n, 4\)"),
        ({"directions": torch.zeros(1, 4)}, ValueError, "zero norm"),
        ({"directions": torch.ones(1, 3)}, ValueError, r"shape \(k, 4\)"),
        ({"rows": 2, "clamp": {0: 0}}, ValueError, "against itself"),
    ],
)
def test_bad_traversal_inputs(tiny_vae, kwargs, error, message):
    args = {"indices": [0], "bases": torch.zeros(2, 4), "strengths": [-1.0, 1.0]} | kwargs
    with pytest.raises(error, match=message):
        VAEAdapter(tiny_vae).traverse(args.pop("indices"), args.pop("bases"), args.pop("strengths"), **args)


def test_default_site_comes_from_the_plugin_hook(tiny_vae):
    assert str(VAEAdapter(tiny_vae).site) == "decoder.input"
    with pytest.raises(ValueError, match="closest valid module paths: decoder.fc"):
        VAEAdapter(tiny_vae, site="decoder.fcc.output")


def test_strip_png_has_labelled_grid(tiny_vae, tmp_path):
    (t,) = VAEAdapter(tiny_vae).traverse([0], torch.zeros(2, 4), [-3.0, 0.0, 3.0], rows=2)
    img = grid(t)
    assert img.size[0] > 3 * 16 and img.size[1] > 4 * 16  # 3 columns, 2 bases x 2 rows, plus labels
    path = save_strip(t, tmp_path / "strips" / "z0.png", bases=[0])
    from PIL import Image

    # one base of two: shorter than the report's grid of every base (the saved strip is enlarged, so
    # it is compared with the same renderer, not with the prompt's grid)
    assert Image.open(path).size[1] < labelled_grid(t).size[1]
    assert Image.open(path).size[0] >= 3 * 64  # enlarged to at least 64 px per cell
