"""nnsight sites: capture and edit agree with a plain torch forward-hook reference; bad inputs fail clearly."""

import pytest
import torch
from torch import nn

from latentexplainer_plugin.hooks import (
    EditError, SiteError, capture, probe_shape, resolve_module, run_with_edit,
)
from latentexplainer_plugin.types import Edit, Site


class Decoder(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.fc = nn.Linear(d, 32)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(32, 48), nn.Tanh())

    def forward(self, z):
        return self.body(self.fc(z)).view(len(z), 3, 4, 4)


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = Decoder()

    def forward(self, z):
        return self.decoder(z)


class Loop(nn.Module):
    """A sampling-loop stand-in: the forward calls ``block`` ``steps`` times."""

    def __init__(self, steps=4):
        super().__init__()
        self.steps = steps
        self.block = nn.Sequential(nn.Linear(5, 5), nn.Tanh())

    def forward(self, x):
        for _ in range(self.steps):
            x = x + self.block(x)
        return x


def reference_edit(model, module, kind, fn, *args):
    """The independent reference: a plain torch hook that applies ``fn`` at the site."""
    if kind == "input":
        handle = module.register_forward_pre_hook(lambda m, a: (fn(a[0]),) + tuple(a[1:]))
    else:
        handle = module.register_forward_hook(lambda m, a, out: fn(out))
    try:
        with torch.no_grad():
            return model(*args)
    finally:
        handle.remove()


def test_set_edit_at_input_matches_plain_hook():
    model = VAE().eval()
    z = torch.randn(10, 6)
    strengths = torch.linspace(-3, 3, 10)
    edit = Edit("set", strengths, index=2)

    def ref(a):
        a = a.clone()
        a[:, 2] = strengths
        return a

    got = run_with_edit(model, Site("decoder", "input"), edit, z)
    want = reference_edit(model, model.decoder, "input", ref, z)
    assert (got - want).abs().max().item() <= 1e-6
    assert not torch.allclose(got, model(z))  # the edit did something


def test_add_edit_at_inner_output_matches_plain_hook():
    model = VAE().eval()
    z = torch.randn(7, 6)
    direction = torch.randn(32)
    strengths = torch.randn(7)
    got = run_with_edit(model, Site("decoder.fc", "output"), Edit("add", strengths, direction=direction), z)
    want = reference_edit(model, model.decoder.fc, "output", lambda h: h + strengths[:, None] * direction, z)
    assert (got - want).abs().max().item() <= 1e-6


def test_per_sample_direction_and_per_item_index():
    model = VAE().eval()
    z = torch.randn(4, 6)
    dirs = torch.randn(4, 6)
    s = torch.tensor([1.0, -2.0, 0.5, 3.0])
    got = run_with_edit(model, Site("decoder", "input"), Edit("add", s, direction=dirs), z)
    assert torch.allclose(got, model(z + s[:, None] * dirs), atol=1e-6)
    idx = torch.tensor([0, 1, 2, 3])
    got = run_with_edit(model, Site("decoder", "input"), Edit("set", s, index=idx), z)
    z2 = z.clone()
    z2[torch.arange(4), idx] = s
    assert torch.allclose(got, model(z2), atol=1e-6)


def test_capture_every_call_of_a_loop_matches_hooks():
    model = Loop(steps=4).eval()
    x = torch.randn(3, 5)
    got = capture(model, Site("block", "output"), x, calls=4)
    seen = []
    h = model.block.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    assert len(got) == 4
    for a, b in zip(got, seen):
        assert (a - b).abs().max().item() <= 1e-6


def test_edit_window_in_a_loop_matches_hook_loop():
    model = Loop(steps=5).eval()
    x = torch.randn(2, 5)
    v = torch.randn(5)
    s = torch.tensor([1.0, -1.0])
    edit = Edit("add", s, direction=v, calls=slice(1, 3))
    got = run_with_edit(model, Site("block", "output"), edit, x, calls=5)
    count = {"n": 0}

    def hook(m, a, out):
        k = count["n"]
        count["n"] += 1
        return out + s[:, None] * v if k in (1, 2) else out

    h = model.block.register_forward_hook(hook)
    with torch.no_grad():
        want = model(x)
    h.remove()
    assert (got - want).abs().max().item() <= 1e-6
    unedited = run_with_edit(model, Site("block", "output"), Edit("add", torch.zeros(2), direction=v), x, calls=5)
    with torch.no_grad():
        assert (unedited - model(x)).abs().max().item() == 0.0


def test_capture_fires_observer_hook():
    from latentexplainer_plugin.hookspecs import hookimpl
    from latentexplainer_plugin.plugins import register_plugin, unregister_plugin

    seen = []

    class Observer:
        @hookimpl
        def latentexplainer_latent_captured(self, site, call, activation):
            seen.append((str(site), call, tuple(activation.shape)))

    register_plugin(Observer(), name="observer")
    try:
        capture(Loop(steps=3), Site("block", "output"), torch.randn(2, 5), calls=3)
    finally:
        unregister_plugin("observer")
    assert seen == [("block.output", 0, (2, 5)), ("block.output", 1, (2, 5)), ("block.output", 2, (2, 5))]


def test_unknown_path_suggests_close_paths():
    with pytest.raises(SiteError) as err:
        resolve_module(VAE(), "decoder.fcc")
    assert "decoder.fc" in str(err.value) and "decoder.fcc" in str(err.value)
    with pytest.raises(SiteError, match="decoder"):
        run_with_edit(VAE(), Site("decodr", "input"), Edit("set", torch.zeros(2), index=0), torch.randn(2, 6))


def test_wrong_direction_shape_raises_before_forward_naming_both_shapes():
    model = VAE()
    calls = []
    model.decoder.body.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(EditError) as err:
        run_with_edit(model, Site("decoder.fc", "output"), Edit("add", torch.ones(3), direction=torch.ones(31)), torch.randn(3, 6))
    msg = str(err.value)
    assert "(31,)" in msg and "(3, 32)" in msg
    assert calls == []  # nothing past the site ran


def test_strength_count_and_index_range_are_checked():
    model = VAE()
    with pytest.raises(EditError, match="one strength per batch item"):
        run_with_edit(model, Site("decoder", "input"), Edit("set", torch.ones(4), index=0), torch.randn(3, 6))
    with pytest.raises(EditError, match="out of range"):
        run_with_edit(model, Site("decoder", "input"), Edit("set", torch.ones(3), index=6), torch.randn(3, 6))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_directions_and_strengths_are_refused(bad):
    model = VAE()
    direction = torch.ones(6)
    direction[1] = bad
    with pytest.raises(EditError, match="non-finite"):
        run_with_edit(model, Site("decoder", "input"), Edit("add", torch.ones(2), direction=direction), torch.randn(2, 6))
    with pytest.raises(EditError, match="edit strengths"):
        run_with_edit(model, Site("decoder", "input"), Edit("set", torch.tensor([0.0, bad]), index=0), torch.randn(2, 6))


def test_unknown_edit_rule_is_reported():
    with pytest.raises(EditError, match="no plugin implements the edit rule 'clamp'"):
        run_with_edit(VAE(), Site("decoder", "input"), Edit("clamp", torch.ones(2)), torch.randn(2, 6))


def test_probe_shape_stops_at_the_site():
    model = Loop(steps=3)
    assert tuple(probe_shape(model, Site("block", "input"), torch.randn(4, 5))) == (4, 5)
    assert tuple(probe_shape(VAE(), Site("decoder.body", "output"), torch.randn(2, 6))) == (2, 48)
