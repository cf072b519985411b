"""Any generator ``forward(z) -> images`` (GANs and others): loaded from code, traversed, explained."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from latentexplainer_plugin.adapters.generator import GeneratorAdapter, discover_latent_shape, is_code_spec, load_generator
from latentexplainer_plugin.cli import main
from latentexplainer_plugin.safe_load import LoadError
from latentexplainer_plugin.store import read_results

SQUARE_GAN = textwrap.dedent('''
    import torch
    from torch import nn


    class SquareGAN(nn.Module):
        """z0 moves a square left/right, z1 turns it from blue to red; z2, z3 do nothing. Images in [-1, 1]."""

        nz = 4

        def __init__(self, size=32):
            super().__init__()
            self.size = size
            self.head = nn.Identity()

        def forward(self, z):
            coords = torch.arange(self.size, dtype=torch.float32)
            cx = (self.size / 2 + 3.0 * z[:, 0]).clamp(6, self.size - 6)[:, None, None]
            x, y = coords[None, None, :], coords[None, :, None]
            mask = torch.sigmoid((5 - (x - cx).abs()) * 4) * torch.sigmoid((5 - (y - self.size / 2).abs()) * 4)
            s = torch.sigmoid(z[:, 1])[:, None, None]
            colour = torch.stack([s.expand_as(mask), torch.full_like(mask, 0.2), (1 - s).expand_as(mask)], 1)
            img = 0.2 * (1 - mask[:, None]) + colour * mask[:, None]
            return self.head(img * 2 - 1)


    def make():
        return SquareGAN()


    def not_a_module():
        return 3


    class LinearSquare(SquareGAN):
        """fc reads z: its first output moves the square (along z0 + z1), its second sets the colour (z2)."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2, bias=False)
            with torch.no_grad():
                self.fc.weight.copy_(torch.tensor([[2.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))

        def forward(self, z):
            p = self.fc(z)
            return super().forward(torch.stack([p[:, 0] / 2.0, p[:, 1] * 2.0, z[:, 3], z[:, 3]], 1))


    def make_linear():
        return LinearSquare()
''')


@pytest.fixture
def gen_file(tmp_path):
    path = tmp_path / "my_gen.py"
    path.write_text(SQUARE_GAN)
    return path


def test_cli_explains_a_generator_it_has_never_seen(gen_file, tmp_path):
    out = tmp_path / "run"
    assert main(["explain", "--model", f"{gen_file}:make", "--out", str(out), "--quiet"]) == 0
    data = read_results(out / "results.json")
    assert data["adapter"]["name"] == "generator" and data["adapter"]["output_range"] == [-1.0, 1.0]
    by_id = {e["id"]: e for e in data["latents"]}
    assert by_id["z0"]["clear"] and "left to right" in by_id["z0"]["explanation"]
    assert by_id["z1"]["clear"] and "colour" in by_id["z1"]["explanation"] and "red" in by_id["z1"]["explanation"]
    for unused in ("z2", "z3"):
        assert not by_id[unused]["clear"] and by_id[unused]["explanation"] is None
        assert by_id[unused]["evidence"]["visible"] is False


def test_traversal_matches_a_plain_loop_over_the_generator(gen_file):
    model = load_generator(f"{gen_file}:make")
    adapter = GeneratorAdapter(model)
    bases = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    strengths = [-2.0, 0.0, 2.0]
    (tr,) = adapter.traverse([1], bases, strengths)
    for b in range(2):
        for k, s in enumerate(strengths):
            z = bases[b].clone()
            z[1] = s
            with torch.no_grad():
                want = ((model(z[None]) + 1) / 2).clamp(0, 1)[0]  # [-1, 1] -> [0, 1]
            assert (tr.images[b, 0, k] - want).abs().max() <= 1e-6


class LinearGen(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.fc = nn.Linear(d, 3 * 8 * 8)

    def forward(self, z):
        return torch.sigmoid(self.fc(z)).view(-1, 3, 8, 8)


class DCGen(nn.Module):
    def __init__(self, nz=5):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(nz, 3, 4), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class Opaque(nn.Module):
    def forward(self, z):
        return z.view(-1, 1, 2, 2).repeat(1, 3, 1, 1)


def test_latent_size_and_shape_are_discovered_or_asked_for():
    assert discover_latent_shape(LinearGen(6)) == (6,)
    assert discover_latent_shape(DCGen(5)) == (5, 1, 1)
    a = GeneratorAdapter(DCGen(5))
    assert a.latent_dim == 5 and a.latent_shape == (5, 1, 1) and a.output_range == (-1.0, 1.0)
    assert GeneratorAdapter(LinearGen(6)).output_range == (0.0, 1.0)  # sigmoid output
    tr = a.traverse([0], a.sample_bases(2), [-1.0, 1.0])[0]
    assert tr.images.shape == (2, 1, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="cannot tell the latent size of Opaque: pass latent_dim="):
        GeneratorAdapter(Opaque())
    assert GeneratorAdapter(Opaque(), latent_dim=4).latent_dim == 4
    with pytest.raises(ValueError, match="does not match latent_shape"):
        GeneratorAdapter(LinearGen(6), latent_dim=4, latent_shape=(6,))


def test_loading_from_code_errors_say_what_is_allowed(gen_file, tmp_path, monkeypatch):
    with pytest.raises(LoadError, match="file.py:factory or package.module:factory"):
        load_generator("no-colon-here")
    with pytest.raises(LoadError, match="no such Python file"):
        load_generator(f"{tmp_path / 'missing.py'}:make")
    with pytest.raises(LoadError, match=r"has no callable 'nope'; callables there: .*make"):
        load_generator(f"{gen_file}:nope")
    with pytest.raises(LoadError, match="returned int, not a torch nn.Module"):
        load_generator(f"{gen_file}:not_a_module")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert type(load_generator("my_gen:make")).__name__ == "SquareGAN"  # package.module:factory
    assert is_code_spec("my_gen.py:make") and is_code_spec("pkg.sub:make") and not is_code_spec("runs/model")
    assert not is_code_spec("C:model")


def test_cli_refuses_latent_dim_for_other_adapters_and_bad_specs(tmp_path, capsys):
    assert main(["explain", "--model", str(tmp_path), "--latent-dim", "3", "--out", str(tmp_path / "o")]) == 2
    assert "--latent-dim: not used by the offline backend or the vae adapter" in capsys.readouterr().err
    assert main(["explain", "--model", f"{tmp_path / 'nope.py'}:make", "--out", str(tmp_path / "o")]) == 2
    assert "no such Python file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# GAN directions: SeFa (closed form) and GANSpace (PCA of an early layer, regressed onto z)


def test_sefa_is_the_top_eigenvectors_of_the_first_weight(gen_file):
    from latentexplainer_plugin.directions import sefa

    found = sefa(GeneratorAdapter(load_generator(f"{gen_file}:make_linear")), n_directions=2)
    # by hand: A = [[2, 2, 0, 0], [0, 0, 1, 0]], A^T A has eigenvalues 8 (along (1, 1, 0, 0)) and 1 (along e2)
    assert found.provenance["eigenvalues"] == [pytest.approx(8.0), pytest.approx(1.0)]
    assert torch.allclose(found.vectors[0], torch.tensor([1.0, 1.0, 0.0, 0.0]) / 2 ** 0.5, atol=1e-6)
    assert torch.allclose(found.vectors[1], torch.tensor([0.0, 0.0, 1.0, 0.0]), atol=1e-6)


def test_sefa_on_a_dcgan_first_layer_matches_numpy_svd():
    import numpy as np

    from latentexplainer_plugin.directions import sefa

    torch.manual_seed(3)
    gen = DCGen(5)
    found = sefa(GeneratorAdapter(gen), n_directions=3)
    a = gen.net[0].weight.detach().double().reshape(5, -1).T.numpy()  # y = A z: (out * kh * kw, 5)
    _, _, vt = np.linalg.svd(a)
    for k in range(3):
        assert abs(float(np.dot(found.vectors[k].double().numpy(), vt[k]))) > 1 - 1e-6


def test_ganspace_recovers_the_dominant_input_direction():
    import numpy as np

    from latentexplainer_plugin.directions import ganspace

    torch.manual_seed(0)
    gen = LinearGen(6)
    with torch.no_grad():
        gen.fc.weight[:, 2] *= 10.0  # the first layer's output varies most along z2, then z4
        gen.fc.weight[:, 4] *= 5.0
    found = ganspace(GeneratorAdapter(gen), n_directions=2, n_samples=800)
    _, _, vt = np.linalg.svd(gen.fc.weight.detach().double().numpy())
    for k in range(2):
        assert abs(float(np.dot(found.vectors[k].double().numpy(), vt[k]))) > 0.99
    assert found.provenance["explained"][0] > found.provenance["explained"][1]


def test_cli_explains_sefa_and_ganspace_directions(gen_file, tmp_path):
    out = tmp_path / "sefa"
    assert main(["explain", "--model", f"{gen_file}:make_linear", "--direction", "sefa", "--n-directions", "2",
                 "--out", str(out), "--quiet"]) == 0
    data = read_results(out / "results.json")
    by_id = {e["id"]: e for e in data["latents"]}
    assert data["bias"] == "combination" and (out / "directions.safetensors").is_file()
    assert by_id["d0"]["clear"] and "left to right" in by_id["d0"]["explanation"]
    assert by_id["d1"]["clear"] and "colour" in by_id["d1"]["explanation"]
    out = tmp_path / "ganspace"
    assert main(["explain", "--model", f"{gen_file}:make", "--direction", "ganspace", "--n-directions", "2",
                 "--out", str(out), "--quiet"]) == 0
    named = sorted(e["explanation"] or "" for e in read_results(out / "results.json")["latents"])
    assert any("left to right" in t or "right to left" in t for t in named) and any("colour" in t for t in named)


def test_direction_errors(gen_file, tmp_path, capsys):
    adapter = GeneratorAdapter(load_generator(f"{gen_file}:make"))
    with pytest.raises(ValueError, match="directions have 3 values each, but the latent has 4"):
        adapter.set_directions(torch.ones(2, 3))
    from latentexplainer_plugin.directions import sefa

    with pytest.raises(ValueError, match="SeFa factorises the weight of the layer that reads z; use ganspace"):
        sefa(adapter)
    assert main(["explain", "--model", str(tmp_path), "--adapter", "vae", "--direction", "pca",
                 "--out", str(tmp_path / "o")]) == 2
    assert "the vae adapter explains its latent axes" in capsys.readouterr().err
