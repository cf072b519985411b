"""W and W+ of a generator with a mapping / synthesis split, checked against the edit written out by hand."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from latentexplainer_plugin.adapters.stylegan import StyleGANAdapter, parse_layers
from latentexplainer_plugin.cli import main

GENERATOR = '''
import torch
from torch import nn


class Synthesis(nn.Module):
    num_ws = 3

    def __init__(self, w_dim=6, size=16):
        super().__init__()
        self.size = size
        self.layers = nn.ModuleList(nn.Linear(w_dim, 3 * size * size) for _ in range(self.num_ws))

    def forward(self, ws):  # ws: (B, num_ws, w_dim); each layer adds its own pattern
        out = sum(layer(ws[:, i]) for i, layer in enumerate(self.layers))
        return torch.sigmoid(out).view(len(ws), 3, self.size, self.size)


class Gen(nn.Module):
    z_dim = 4

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mapping = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))
        self.synthesis = Synthesis()

    def forward(self, z):
        w = self.mapping(z)
        return self.synthesis(w[:, None, :].expand(-1, 3, -1))


def make():
    return Gen()
'''
STRENGTHS = torch.tensor([-2.0, 0.0, 2.0])


@pytest.fixture(scope="module")
def gen_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sg") / "sg.py"
    path.write_text(GENERATOR)
    return path


@pytest.fixture(scope="module")
def gen(gen_file):
    namespace: dict = {}
    exec(compile(GENERATOR, str(gen_file), "exec"), namespace)
    return namespace["make"]()


def by_hand(gen, w, step, layers):
    """synthesis(ws) with ``step`` added to the listed layers' copies of w."""
    ws = w[:, None, :].repeat(1, 3, 1)
    ws[:, layers] += step
    with torch.no_grad():
        return gen.synthesis(ws)


def test_w_axes_and_the_strength_unit(gen):
    a = StyleGANAdapter(gen, stats_samples=500)
    assert (a.w_dim, a.num_ws, a.z_dim, a.n_latents) == (6, 3, 4, 6) and a.latent_id(2) == "w2"
    bases = a.sample_bases(2, seed=5)
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(bases, gen.mapping(z), atol=1e-6)  # bases are mapped z, not Gaussian w
    (t,) = a.traverse([2], bases, STRENGTHS)
    w_samples = gen.mapping(torch.randn(500, 4, generator=torch.Generator().manual_seed(1))).detach()
    std = float(w_samples[:, 2].std())
    for k, s in enumerate(STRENGTHS):
        step = torch.zeros(6)
        step[2] = float(s) * std
        assert (t.images[:, 0, k] - by_hand(gen, bases, step, [0, 1, 2])).abs().max().item() <= 1e-5
    with torch.no_grad():  # strength 0 is the generator's own image of z
        assert (t.images[:, 0, 1] - gen(z)).abs().max().item() <= 1e-6


def test_w_plus_edits_only_the_chosen_layers(gen):
    a = StyleGANAdapter(gen, space="w+", layers="1-2", stats_samples=500)
    assert a.layers == [1, 2] and a.latent_dim == 18
    v = torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, 0.0])
    a.set_directions(v[None])
    bases = a.sample_bases(3, seed=2)
    (t,) = a.traverse([0], bases, STRENGTHS)
    assert t.latent_id == "d0" and t.meta["layers"] == [1, 2]
    unit = v / v.norm()
    w_samples = gen.mapping(torch.randn(500, 4, generator=torch.Generator().manual_seed(1))).detach()
    std = float(((w_samples - w_samples.mean(0)) @ unit).std())
    w = bases.view(3, 3, 6)[:, 0]
    for k, s in enumerate(STRENGTHS):
        expected = by_hand(gen, w, float(s) * std * unit, [1, 2])
        assert (t.images[:, 0, k] - expected).abs().max().item() <= 1e-5
    other = by_hand(gen, w, 2.0 * std * unit, [0])  # editing layer 0 instead gives another image
    assert (t.images[:, 0, 2] - other).abs().max().item() > 1e-3


def test_sefa_and_ganspace_find_directions_in_w(gen):
    from latentexplainer_plugin.directions.find import find_directions

    a = StyleGANAdapter(gen, stats_samples=200)
    found = find_directions(a, "sefa", n_directions=2)
    first = a.driver.synthesis.layers[0].weight.detach()  # SeFa: top eigenvectors of A^T A of the layer reading w
    top = torch.linalg.eigh(first.T @ first).eigenvectors[:, -1]
    assert abs(float(found.vectors[0].flatten() @ top)) >= 0.999
    assert a.n_latents == 2 and a.latent_id(0) == "d0"


def test_bad_input():
    with pytest.raises(ValueError, match="has no mapping and synthesis submodules"):
        StyleGANAdapter(nn.Sequential(nn.Linear(4, 12)))
    with pytest.raises(ValueError, match=r"layers must be synthesis layers in 0..2, got \[3\]"):
        parse_layers("1-3", 3)
    with pytest.raises(ValueError, match="layers must be numbers or ranges"):
        parse_layers("top", 3)


def test_cli_explains_w_plus_of_a_generator_in_code(gen_file, tmp_path):
    out = tmp_path / "run"
    code = main(["explain", "--model", f"{gen_file}:make", "--adapter", "stylegan", "-o", "space=w+", "-o", "layers=0",
                 "--latents", "0,1", "--samples", "2", "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["adapter"]["space"] == "w+" and data["adapter"]["layers"] == [0] and data["bias"] == "combination"
    assert [e["id"] for e in data["latents"]] == ["w0", "w1"]


def test_sefa_in_w_plus_finds_directions_in_w(gen_file, tmp_path):
    out = tmp_path / "run"
    code = main(["explain", "--model", f"{gen_file}:make", "--adapter", "stylegan", "-o", "space=w+", "-o", "layers=0",
                 "--direction", "sefa", "--n-directions", "2", "--samples", "2", "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["directions"]["finder"] == "sefa" and [e["id"] for e in data["latents"]] == ["d0", "d1"]
