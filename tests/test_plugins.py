"""The plugin system: built-ins through the hooks, an external distribution via entry points, overrides."""

import sys
import textwrap

import pytest
import torch

from latentexplainer_plugin import plugins
from latentexplainer_plugin.cli import main

PLUGIN_SOURCE = '''
import torch
from latentexplainer_plugin.hookspecs import hookimpl
from latentexplainer_plugin.biases import InductiveBias
from latentexplainer_plugin.backends.offline import OfflineBackend

SYMMETRY = InductiveBias(
    name="symmetry", formula="x(-z_i) = mirror(x(z_i))",
    symbols={"z_i": "{latent}", "x": "the image", "mirror": "the mirror image of"},
    template="Explain {latent} knowing that {formula_in_words}.",
)

class LoudOffline(OfflineBackend):
    name = "loud"

@hookimpl
def latentexplainer_register_biases(register):
    register("symmetry", lambda: SYMMETRY)

@hookimpl
def latentexplainer_register_backends(register):
    register("loud", lambda arg=None, **kw: LoudOffline(**kw))
    register("offline", lambda arg=None, **kw: LoudOffline(**kw))  # clashes with the built-in

@hookimpl
def latentexplainer_edit(activation, edit):
    if edit.rule == "clamp":
        return activation.clamp(-float(edit.strengths.abs().max()), float(edit.strengths.abs().max()))
    return None

@hookimpl
def latentexplainer_default_site(model):
    from latentexplainer_plugin.types import Site
    if type(model).__name__ == "MyGenerator":
        return Site("head", "input")
    return None
'''


@pytest.fixture
def external_plugin(tmp_path, monkeypatch):
    """A real (throw-away) distribution on sys.path with an entry point in group 'latentexplainer'."""
    (tmp_path / "le_fake_plugin.py").write_text(PLUGIN_SOURCE)
    info = tmp_path / "le_fake_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: le-fake-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[latentexplainer]\nfake = le_fake_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("LATENTEXPLAINER_NO_PLUGINS", raising=False)
    plugins.reset()
    yield
    sys.modules.pop("le_fake_plugin", None)
    plugins.reset()


def test_builtins_are_registered_through_the_hooks():
    plugins.reset()
    pm = plugins.get_plugin_manager()
    for name in plugins.DEFAULT_PLUGINS:
        assert pm.get_plugin(name) is not None
    assert {"vae"} <= set(plugins.registry("adapters").names())
    assert {"offline"} <= set(plugins.registry("backends").names())
    assert {"disentanglement", "combination", "conditional"} <= set(plugins.registry("biases").names())
    assert {"axes", "given"} <= set(plugins.registry("direction_finders").names())
    entry = plugins.registry("backends").get("offline")
    assert entry.distribution == plugins.BUILTIN_DISTRIBUTION


def test_every_hookspec_has_a_builtin_or_is_an_observer():
    from latentexplainer_plugin import hookspecs

    plugins.reset()
    pm = plugins.get_plugin_manager()
    specs = [n for n in dir(hookspecs) if n.startswith("latentexplainer_")]
    assert len(specs) == 7
    for name in specs:
        impls = getattr(pm.hook, name).get_hookimpls()
        assert impls or name == "latentexplainer_latent_captured", name
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"


def test_external_plugin_is_picked_up(external_plugin, capsys):
    assert "symmetry" in plugins.registry("biases").names()
    entry = plugins.registry("backends").get("loud")
    assert entry.distribution == "le-fake-plugin"
    # the clash keeps the built-in and records the loser
    assert plugins.registry("backends").get("offline").distribution == plugins.BUILTIN_DISTRIBUTION
    conflicts = plugins.registry("backends").conflicts
    assert [(k.distribution, d.distribution) for k, d in conflicts] == [(plugins.BUILTIN_DISTRIBUTION, "le-fake-plugin")]
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "symmetry" in out and "le-fake-plugin" in out and "ignored" in out


def test_external_plugin_bias_builds_a_prompt(external_plugin):
    from latentexplainer_plugin.biases import build_prompt
    from latentexplainer_plugin.components import get_bias
    from latentexplainer_plugin.types import Traversal

    bias = get_bias("symmetry")
    t = Traversal("z1", torch.rand(1, 1, 3, 3, 16, 16), torch.tensor([-1.0, 0.0, 1.0]), "set", index=1)
    prompt = build_prompt(bias, t)
    assert prompt.text.startswith("Explain z1 knowing that the image(-z1) = the mirror image of(the image(z1)).")
    assert len(prompt.images) == 1


def test_external_edit_rule_and_default_site(external_plugin):
    from torch import nn

    from latentexplainer_plugin.hooks import run_with_edit
    from latentexplainer_plugin.plugins import hook
    from latentexplainer_plugin.types import Edit, Site

    class MyGenerator(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Identity()

        def forward(self, x):
            return self.head(x)

    assert hook().latentexplainer_default_site(model=MyGenerator()) == Site("head", "input")
    x = torch.tensor([[-5.0, 0.5, 5.0]])
    out = run_with_edit(MyGenerator(), Site("head", "input"), Edit("clamp", torch.tensor([2.0])), x)
    assert out.tolist() == [[-2.0, 0.5, 2.0]]


def test_env_var_disables_external_plugins(external_plugin, monkeypatch):
    monkeypatch.setenv("LATENTEXPLAINER_NO_PLUGINS", "1")
    plugins.reset()
    assert "symmetry" not in plugins.registry("biases").names()
    monkeypatch.delenv("LATENTEXPLAINER_NO_PLUGINS")
    monkeypatch.setenv("LATENTEXPLAINER_PLUGINS", "someone-else")
    plugins.reset()
    assert "symmetry" not in plugins.registry("biases").names()
    monkeypatch.setenv("LATENTEXPLAINER_PLUGINS", "fake")
    plugins.reset()
    assert "symmetry" in plugins.registry("biases").names()


def test_unknown_names_list_the_registered_ones():
    plugins.reset()
    with pytest.raises(ValueError) as err:
        plugins.registry("biases").get("disentanglment")
    assert "combination, conditional, disentanglement" in str(err.value)


def test_trace_env_var_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("LATENTEXPLAINER_TRACE_PLUGINS", "1")
    plugins.reset()
    try:
        plugins.hook().latentexplainer_default_site(model=torch.nn.Linear(2, 2))
        assert "latentexplainer_default_site" in capsys.readouterr().err
    finally:
        monkeypatch.delenv("LATENTEXPLAINER_TRACE_PLUGINS")
        plugins.reset()
