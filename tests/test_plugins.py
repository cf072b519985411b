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

def clamp(activation, edit):
    return activation.clamp(-float(edit.strengths.abs().max()), float(edit.strengths.abs().max()))

@hookimpl
def latentexplainer_register_edit_rules(register):
    register("clamp", clamp)

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
    assert len(specs) == 9
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


# ---------------------------------------------------------------------------------------------------
# broken plugins are reported (plugin, distribution, what failed, how to skip) and skipped


def install_dist(root, module, source, entry_point=None, dist="le-broken-plugin"):
    """A throw-away distribution ``dist`` 1.0 on sys.path whose entry point ``broken`` loads ``module``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[latentexplainer]\nbroken = {entry_point or module}\n")
    return root


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """Install one broken plugin (source, optional entry point value); plugins are reset afterwards."""
    modules = []

    def install(source, entry_point=None, module="le_broken_plugin"):
        install_dist(tmp_path, module, source, entry_point)
        monkeypatch.syspath_prepend(str(tmp_path))
        modules.append(module)
        monkeypatch.delenv("LATENTEXPLAINER_NO_PLUGINS", raising=False)
        plugins.reset()

    yield install
    for m in modules:
        sys.modules.pop(m, None)
    plugins.reset()


BUILTINS = {"adapters": {"vae"}, "backends": {"offline"}, "biases": {"disentanglement"}, "direction_finders": {"axes"}}

REGISTER = '''
from latentexplainer_plugin.hookspecs import hookimpl
from latentexplainer_plugin.biases import InductiveBias

GOOD = InductiveBias(name="good", formula="x(z_i)", symbols={"z_i": "{latent}", "x": "the image"},
                     template="Explain {latent}: {formula_in_words}.")

@hookimpl
def latentexplainer_register_biases(register):
    register("good", lambda: GOOD)
    CALL
'''


def registering(name, factory="lambda: GOOD"):
    """Plugin source that registers a good bias, then ``register(name, factory)``."""
    return REGISTER.replace("CALL", f"register({name!r}, {factory})")

BROKEN_CASES = [
    # (id, source, entry point value, text expected in the warning, bias names registered afterwards)
    ("import-error", "import not_a_module_anywhere\n", None, "ModuleNotFoundError: No module named 'not_a_module_anywhere'", set()),
    ("raises-at-import", "raise RuntimeError('plugin exploded')\n", None, "RuntimeError: plugin exploded", set()),
    ("exits-at-import", "import sys\nsys.exit(3)\n", None, "SystemExit: 3", set()),
    ("missing-attribute", "X = 1\n", "le_broken_plugin:missing", "AttributeError", set()),
    ("bad-hook-signature", "from latentexplainer_plugin.hookspecs import hookimpl\n\n@hookimpl\n"
     "def latentexplainer_register_biases(registr):\n    pass\n", None, "PluginValidationError", set()),
    ("empty-name", registering("", "lambda: GOOD"), None, "invalid name ''", {"good"}),
    ("whitespace-name", registering("my bias", "lambda: GOOD"), None, "invalid name 'my bias'", {"good"}),
    ("blank-name", registering("   ", "lambda: GOOD"), None, "invalid name '   '", {"good"}),
    ("colon-name", registering("a:b", "lambda: GOOD"), None, "invalid name 'a:b'", {"good"}),
    ("unicode-name", registering("bïas", "lambda: GOOD"), None, "invalid name 'bïas'", {"good"}),
    ("long-name", registering("b" * 65, "lambda: GOOD"), None, "invalid name 'bbbb", {"good"}),
    ("non-string-name", REGISTER.replace("CALL", "register(42, lambda: GOOD)"), None,
     "a name must be a string, got int 42", {"good"}),
    ("non-callable-factory", registering("other", "GOOD"), None,
     "factory for 'other' is not callable (got InductiveBias)", {"good"}),
    ("sae-format-without-load", registering("good2", "lambda: GOOD") + (
        "\n@hookimpl\ndef latentexplainer_register_sae_formats(register):\n"
        "    register('half', type('Half', (), {'detect': staticmethod(lambda folder: True)})())\n"), None,
     "registered an invalid sae_formats entry: SAE format 'half' has no callable load (got Half)", {"good", "good2"}),
    ("hook-raises", registering("other", "lambda: GOOD").replace(
        'register("good", lambda: GOOD)', 'register("good", lambda: GOOD); 1 / 0'), None,
     "failed in latentexplainer_register_biases: ZeroDivisionError: division by zero", set()),
]


IMPORT_FAILURES = {"import-error", "raises-at-import", "exits-at-import", "missing-attribute", "bad-hook-signature"}


@pytest.mark.parametrize("case, source, entry_point, expected, registered", BROKEN_CASES, ids=[c[0] for c in BROKEN_CASES])
def test_a_broken_plugin_is_reported_and_skipped(broken_plugin, case, source, entry_point, expected, registered):
    broken_plugin(source, entry_point)
    with pytest.warns(plugins.PluginWarning) as record:
        names = {kind: set(plugins.registry(kind).names()) for kind in plugins.KINDS}
    for kind, builtins in BUILTINS.items():
        assert builtins <= names[kind], kind
    assert names["biases"] - {"combination", "conditional", "disentanglement"} == registered
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    message = messages[0]
    dist = "le-broken-plugin 1.0" if case in IMPORT_FAILURES else "le-broken-plugin"  # a loaded one has no version
    assert message.startswith(f"plugin 'broken' ({dist}) "), message
    assert expected in message and "skipped" in message and "LATENTEXPLAINER_NO_PLUGINS=1" in message
    assert [(p, d) for p, d, _ in plugins.failures()] == [("broken", dist)]


def test_the_name_rule_accepts_every_builtin_and_refuses_the_rest():
    plugins.reset()
    for kind in plugins.KINDS:
        for name in plugins.registry(kind).names():
            assert plugins.check_name(name) is None, name
    for ok in ("a", "my-bias", "v2.1", "x_y", "B" * 64):
        assert plugins.check_name(ok) is None, ok
    for bad in ("", " ", "a b", "a:b", "-a", ".a", "a/b", "a\n", "é", "B" * 65, None, 3, b"ab"):
        assert plugins.check_name(bad) is not None, bad


def test_every_command_keeps_working_with_a_broken_plugin(broken_plugin, tiny_trained_vae, tmp_path, capsys):
    broken_plugin("raise RuntimeError('plugin exploded')\n")
    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    assert "disentanglement" in captured.out and "offline" in captured.out
    assert ("latentexplainer: warning: plugin 'broken' (le-broken-plugin 1.0) failed to load (le_broken_plugin): "
            "RuntimeError: plugin exploded; skipped") in captured.err
    assert "Traceback" not in captured.err
    plugins.reset()
    out = tmp_path / "run"
    code = main(["explain", "--model", str(tiny_trained_vae / "model"), "--out", str(out), "--latents", "0",
                 "--samples", "2", "--similarity", "bow", "--strengths=-2,0,2", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "plugin 'broken'" in captured.err and (out / "results.json").is_file()


def test_a_broken_plugin_in_a_real_process(tmp_path):
    """The installed console script: a warning line on stderr, no traceback, exit 0; NO_PLUGINS silences it."""
    import os
    import subprocess

    install_dist(tmp_path, "le_broken_plugin", "raise ImportError('needs libfoo')\n")
    env = {k: v for k, v in os.environ.items() if k != "LATENTEXPLAINER_NO_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-c", "import sys; from latentexplainer_plugin.cli import main; sys.exit(main())", "plugins"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "latentexplainer: warning: plugin 'broken' (le-broken-plugin 1.0) failed to load" in run.stderr
    assert "ImportError: needs libfoo" in run.stderr and "Traceback" not in run.stderr
    assert "offline" in run.stdout
    run = subprocess.run(cmd, env=env | {"LATENTEXPLAINER_NO_PLUGINS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "broken" not in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_plugin_factory_that_raises_is_named_in_the_error(broken_plugin, tiny_trained_vae, tmp_path, capsys):
    from latentexplainer_plugin.components import PluginError, get_backend

    broken_plugin('''
        from latentexplainer_plugin.hookspecs import hookimpl

        def make(arg=None, **options):
            raise RuntimeError("cannot open /dev/gpu0")

        @hookimpl
        def latentexplainer_register_backends(register):
            register("flaky", make)
    ''')
    with pytest.raises(PluginError) as err:
        get_backend("flaky")
    assert str(err.value).startswith("backend 'flaky' from plugin broken (le-broken-plugin) failed: "
                                     "RuntimeError: cannot open /dev/gpu0; it is the plugin's error")
    code = main(["explain", "--model", str(tiny_trained_vae / "model"), "--out", str(tmp_path / "run"),
                 "--backend", "flaky", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "backend 'flaky' from plugin broken (le-broken-plugin) failed" in err and "Traceback" not in err


def test_plugins_shows_the_sae_feature_source_selected_by_a_flag(capsys):
    from latentexplainer_plugin.cli import main
    from latentexplainer_plugin.sae import SAEFeatureAdapter

    assert main(["plugins", "--options", "sae"]) == 0
    out = capsys.readouterr().out
    assert "feature source, selected by --sae PATH: sae; capabilities: sae_features" in out
    for option in SAEFeatureAdapter.Options.model_fields:  # every declared option, with its help
        assert f"  -o {option}=<" in out
    assert "edit rule sae (latentexplainer-plugin)" in out  # the edit rule of the same name is still shown
    assert main(["plugins"]) == 0
    assert "sae              feature source, selected by --sae PATH" in capsys.readouterr().out.split("selected by a flag:")[1]
