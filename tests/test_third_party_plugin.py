"""A throw-away third-party distribution (entry point in group ``latentexplainer``) registers an adapter
with its own option, a backend that needs a key, a bias, a direction finder, an edit rule, a model
recogniser and an SAE file format; ``latentexplainer explain`` drives them with ``-o`` options and gives them the same checks,
results and report as the built-ins."""

from __future__ import annotations

import json

import pytest
import torch

from latentexplainer_plugin import plugins
from latentexplainer_plugin.cli import main

PLUGIN_SOURCE = '''
from typing import ClassVar, Optional

import torch
from pydantic import Field
from torch import nn

from latentexplainer_plugin import InductiveBias, hookimpl
from latentexplainer_plugin.adapters.generator import GeneratorAdapter
from latentexplainer_plugin.backends.offline import OfflineBackend
from latentexplainer_plugin.directions import Directions
from latentexplainer_plugin.errors import OptionError
from latentexplainer_plugin.options import ComponentOptions, PositiveInt

BUILT = []  # what the factories built, so the test can tell whether anything was loaded


class Blob(nn.Module):
    """z (B, 2) -> a bright square whose x position follows z0, brightness follows z1."""

    latent_dim = 2

    def __init__(self, wiggle):
        super().__init__()
        self.wiggle = wiggle
        self.lin = nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.eye(2))
            self.lin.bias.zero_()

    def forward(self, z):
        h = self.lin(z)
        xs = torch.linspace(-3, 3, 32)
        col = torch.exp(-((xs[None, :] - h[:, :1]) ** 2) / 0.5)             # (B, 32)
        row = torch.exp(-(xs[None, :] ** 2) / 0.5)                          # (1, 32)
        img = row[:, :, None] * col[:, None, :]                            # (B, 32, 32)
        level = torch.sigmoid(h[:, 1:2])[:, :, None] * (1 + self.wiggle)
        return (img[:, None] * level[:, None]).expand(-1, 3, -1, -1).clamp(0, 1)


class ToyAdapter(GeneratorAdapter):
    name = "toygen"
    capabilities = frozenset({"latent_axes", "directions"})

    class Options(ComponentOptions):
        wiggle: float = Field(0.0, ge=0, description="extra brightness of the blob")
        device: str = Field("cpu", description="torch device")

    def __init__(self, model, wiggle=0.0, device="cpu"):
        BUILT.append(("adapter", model, wiggle))
        super().__init__(Blob(wiggle), device=device)
        self.wiggle = wiggle

    def describe(self):
        return super().describe() | {"wiggle": self.wiggle}


class KeyedOptions(ComponentOptions):
    key_env: str = Field("TOY_KEY", description="environment variable holding the key")
    style: str = Field("plain", description="answer style")


class KeyedBackend(OfflineBackend):
    name = "keyed"
    needs_key = True
    Options = KeyedOptions

    @classmethod
    def preflight(cls, arg, options):
        import os

        env = options.get("key_env", "TOY_KEY")
        if not os.environ.get(env):
            raise OptionError("", [("key_env", f"no key: set {env} (or name another variable with {{flag}}NAME)")])


def keyed(arg=None, key_env="TOY_KEY", style="plain"):
    BUILT.append(("backend", style))
    return KeyedBackend()


keyed.Options = KeyedBackend.Options
keyed.capabilities = KeyedBackend.capabilities
keyed.preflight = KeyedBackend.preflight


class FirstOptions(ComponentOptions):
    count: PositiveInt = Field(1, description="how many axes")


def first_axes(adapter, *, seed=0, data=None, count=1):
    return Directions(torch.eye(adapter.latent_dim)[:count], {"finder": "first-axes"})


first_axes.Options = FirstOptions
first_axes.requires = frozenset({"directions"})


def double(activation, edit):
    return activation * 2


@hookimpl
def latentexplainer_register_adapters(register):
    register("toygen", ToyAdapter)


@hookimpl
def latentexplainer_register_backends(register):
    register("keyed", keyed)


@hookimpl
def latentexplainer_register_biases(register):
    register("plainspoken", lambda: InductiveBias(name="plainspoken", formula="x(z)", symbols={"x": "the image"},
                                                  template="Say what changes as {latent} moves.", rows=1))


@hookimpl
def latentexplainer_register_direction_finders(register):
    register("first-axes", first_axes)


@hookimpl
def latentexplainer_register_edit_rules(register):
    register("double", double)


@hookimpl
def latentexplainer_adapter_for(model):
    return "toygen" if str(model).startswith("toy:") else None


def load_toy_sae(folder, *, allow_pickle=False, **kwargs):
    """toy-sae layout: toy_sae.json (site) + toy_sae.safetensors with the encoder stored (d_sae, d_in)."""
    import json

    from safetensors.torch import load_file

    from latentexplainer_plugin.sae import SparseAutoencoder

    BUILT.append(("sae", str(folder)))
    t = load_file(str(folder / "toy_sae.safetensors"))
    site = json.loads((folder / "toy_sae.json").read_text())["site"]
    return SparseAutoencoder(t["enc"].T.contiguous(), t["enc_bias"], t["dec"], t["dec_bias"], "standard", site=site)


@hookimpl
def latentexplainer_register_sae_formats(register):
    from latentexplainer_plugin.sae.formats import SAEFormat, has_files

    files = ("toy_sae.json", "toy_sae.safetensors")
    register("toy-sae", SAEFormat(detect=has_files(*files), load=load_toy_sae, files=files))
'''


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    (tmp_path / "le_toy_plugin.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "le_toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: le-toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[latentexplainer]\ntoy = le_toy_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LATENTEXPLAINER_NO_PLUGINS", raising=False)
    monkeypatch.setenv("LATENTEXPLAINER_PLUGINS", "toy")
    monkeypatch.delenv("TOY_KEY", raising=False)
    plugins.reset()
    import le_toy_plugin

    le_toy_plugin.BUILT.clear()
    yield le_toy_plugin
    plugins.reset()


def explain(tmp_path, *extra):
    return main(["explain", "--model", "toy:blob", "--backend", "keyed", "--samples", "2", "--latents", "0,1",
                 "--out", str(tmp_path / "run"), "--quiet", *extra])


def test_a_plugin_backend_needing_a_key_is_refused_before_anything_loads(toy_plugin, tmp_path, capsys):
    assert explain(tmp_path, "-o", "wiggle=0.5") == 2
    err = capsys.readouterr().err
    assert "no key: set TOY_KEY (or name another variable with -o key_env NAME)" in err
    assert toy_plugin.BUILT == [] and not (tmp_path / "run").exists()


def test_plugin_options_are_validated_by_their_declarations(toy_plugin, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TOY_KEY", "k")
    assert explain(tmp_path, "-o", "wiggle=-1") == 2
    assert "-o wiggle must be greater than or equal to 0 (got '-1')" in capsys.readouterr().err
    assert explain(tmp_path, "-o", "colour=red") == 2
    err = capsys.readouterr().err
    assert "-o colour: no selected component has an option 'colour'" in err
    assert "the toygen adapter: device, wiggle" in err and "the keyed backend: key_env, style" in err
    assert explain(tmp_path, "--steps", "3") == 2  # a flag no selected component declares
    assert "--steps: not used by the keyed backend or the toygen adapter" in capsys.readouterr().err
    assert toy_plugin.BUILT == []


def test_a_plugin_adapter_backend_bias_and_finder_run_end_to_end(toy_plugin, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TOY_KEY", "k")
    code = explain(tmp_path, "-o", "wiggle=0.5", "-o", "style=terse", "--bias", "plainspoken")
    assert code == 0, capsys.readouterr().err
    assert ("adapter", "toy:blob", 0.5) in toy_plugin.BUILT and ("backend", "terse") in toy_plugin.BUILT
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["adapter"]["name"] == "toygen" and data["adapter"]["wiggle"] == 0.5
    assert data["backend"]["name"] == "keyed" and data["bias"] == "plainspoken"
    assert [e["id"] for e in data["latents"]] == ["z0", "z1"]
    assert all(e["status"] == "ok" and (tmp_path / "run" / e["strip"]).is_file() for e in data["latents"])
    assert (tmp_path / "run" / "report.html").is_file()

    out = tmp_path / "dirs"
    code = main(["explain", "--model", "toy:blob", "--backend", "keyed", "--samples", "2", "--direction", "first-axes",
                 "-o", "count=2", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert data["directions"]["finder"] == "first-axes" and [e["id"] for e in data["latents"]] == ["d0", "d1"]
    assert data["bias"] == "combination"  # directions: no other latent to clamp


def test_plugins_lists_a_plugin_s_options_and_its_edit_rule_works(toy_plugin, capsys):
    assert main(["plugins", "--options", "toygen"]) == 0
    out = capsys.readouterr().out
    assert "adapter toygen (le-toy-plugin)" in out and "-o wiggle=<float>  extra brightness of the blob (default 0.0)" in out
    assert main(["plugins", "--options", "keyed"]) == 0
    assert "needs_key" in capsys.readouterr().out
    from latentexplainer_plugin.hooks import apply_edit
    from latentexplainer_plugin.types import Edit

    assert apply_edit(torch.ones(2, 3), Edit("double", torch.zeros(2))).tolist() == [[2.0] * 3] * 2


def test_a_plugin_sae_format_is_detected_by_load_sae_and_by_explain_sae(toy_plugin, tmp_path, capsys):
    from safetensors.torch import save_file

    from latentexplainer_plugin.demo import WEIGHTS_DIR
    from latentexplainer_plugin.errors import SAEError, UnknownComponentError
    from latentexplainer_plugin.sae import load_sae, save_sae

    d, shift = 10, 4.0  # decoder rows are the demo VAE's latent axes; b_dec = -4 keeps every feature active
    g = torch.Generator().manual_seed(0)
    W_enc = torch.eye(d) + 0.01 * torch.randn(d, d, generator=g)
    folder = tmp_path / "toy-sae"
    folder.mkdir()
    save_file({"enc": W_enc.T.contiguous(), "enc_bias": torch.zeros(d), "dec": torch.eye(d), "dec_bias": torch.full((d,), -shift)},
              str(folder / "toy_sae.safetensors"))
    (folder / "toy_sae.json").write_text(json.dumps({"site": "decoder.input"}))

    sae = load_sae(folder)
    assert sae.meta["layout"] == "toy-sae" and toy_plugin.BUILT == [("sae", str(folder))]
    assert torch.equal(sae.W_enc, W_enc) and torch.equal(sae.b_dec, torch.full((d,), -shift)) and sae.site == "decoder.input"
    # the same weights written in SAELens layout (a built-in format) load to the same tensors
    back = load_sae(save_sae(sae, tmp_path / "as-saelens"))
    assert back.meta["layout"] == "saelens" and torch.equal(back.W_enc, sae.W_enc) and torch.equal(back.W_dec, sae.W_dec)
    with pytest.raises(SAEError, match="as-saelens is not in the 'toy-sae' format: it expects toy_sae.json \\+ "
                                       "toy_sae.safetensors. Found: cfg.json, sae_weights.safetensors"):
        load_sae(tmp_path / "as-saelens", format="toy-sae")
    for name in ("toy_sae.json", "toy_sae.safetensors"):  # a folder in both formats: built-ins first, format= picks
        (tmp_path / "as-saelens" / name).write_bytes((folder / name).read_bytes())
    assert load_sae(tmp_path / "as-saelens").meta["layout"] == "saelens"
    assert load_sae(tmp_path / "as-saelens", format="toy-sae").meta["layout"] == "toy-sae"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SAEError) as info:
        load_sae(empty)
    assert "saelens: cfg.json + sae_weights.safetensors" in str(info.value)
    assert "toy-sae: toy_sae.json + toy_sae.safetensors" in str(info.value)
    with pytest.raises(UnknownComponentError, match="unknown sae format 'nope'; registered: dictionary_learning, saelens, "
                                                    "sparsify, toy-sae"):
        load_sae(folder, format="nope")

    toy_plugin.BUILT.clear()
    out = tmp_path / "run"
    code = main(["explain", "--model", str(WEIGHTS_DIR), "--sae", str(folder), "--features", "1,4", "--samples", "3",
                 "--bias", "combination", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert toy_plugin.BUILT == [("sae", str(folder))]
    data = json.loads((out / "results.json").read_text())
    assert data["sae"] == str(folder) and data["adapter"]["name"] == "sae"
    assert [e["id"] for e in data["latents"]] == ["f1", "f4"] and all(e["status"] == "ok" for e in data["latents"])
    assert main(["plugins"]) == 0
    assert "toy-sae" in capsys.readouterr().out.split("sae_formats:")[1]


def test_an_sae_format_whose_detect_raises_or_load_returns_no_sae_is_named_in_the_error(tmp_path):
    from latentexplainer_plugin.errors import PluginError, SAEError
    from latentexplainer_plugin.hookspecs import hookimpl
    from latentexplainer_plugin.sae import load_sae
    from latentexplainer_plugin.sae.formats import SAEFormat, has_files

    def detect(folder):
        raise RuntimeError("cannot look")

    class Flaky:
        @hookimpl
        def latentexplainer_register_sae_formats(self, register):
            register("hollow", SAEFormat(detect=has_files("hollow.txt"), load=lambda folder, **kw: None))
            register("flaky", SAEFormat(detect=detect, load=lambda folder, **kw: None))

    plugins.reset()
    plugins.register_plugin(Flaky(), name="flaky-plugin", distribution="flaky-dist")
    try:
        with pytest.raises(PluginError, match=r"^SAE format 'flaky' \(flaky-plugin, flaky-dist\) failed in detect\(.*\): "
                                              r"RuntimeError: cannot look$"):
            load_sae(tmp_path)
        (tmp_path / "hollow.txt").write_text("")  # recognised by 'hollow' (registered first), whose load gives None
        with pytest.raises(SAEError, match=r"^SAE format 'hollow' \(flaky-plugin, flaky-dist\) returned NoneType, "
                                           r"not a SparseAutoencoder$"):
            load_sae(tmp_path)
    finally:
        plugins.reset()
