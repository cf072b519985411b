"""Image-side evidence: analytic traversals with known answers, the demo VAE, a random UNet, and the gate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentexplainer_plugin.evidence import (
    MIN_CHANGE,
    MIN_CONSISTENCY,
    MIN_RATIO,
    MIN_SIGNIFICANCE,
    Evidence,
    NonFiniteImagesError,
    traversal_evidence,
)
from latentexplainer_plugin.adapters.base import Adapter
from latentexplainer_plugin.backends.base import Backend, BackendError
from latentexplainer_plugin.types import Response, Traversal

STRENGTHS = torch.tensor([-3.0, -1.5, 0.0, 1.5, 3.0])
H = W = 32


def square(x: float, y: float, colour: tuple[float, float, float], bg: float = 0.2, half: int = 4) -> torch.Tensor:
    """(3, H, W): a square of half-side ``half`` px centred at pixel (x, y) on a grey background."""
    img = torch.full((3, H, W), bg)
    xi, yi = int(round(x)), int(round(y))
    img[:, yi - half : yi + half, xi - half : xi + half] = torch.tensor(colour)[:, None, None]
    return img


def traversal_of(images: torch.Tensor, latent: str = "z0") -> Traversal:
    return Traversal(latent_id=latent, images=images, strengths=STRENGTHS[: images.shape[2]], rule="set", index=0)


def moving_right(n_bases: int = 5, rows: int = 2) -> torch.Tensor:
    """Every base starts the square somewhere else (position, colour, background) and moves it 12 px right."""
    g = torch.Generator().manual_seed(0)
    out = torch.empty(n_bases, rows, 5, 3, H, W)
    for b in range(n_bases):
        for r in range(rows):
            x0 = 6 + float(torch.randint(0, 6, (1,), generator=g))
            y0 = 6 + float(torch.randint(0, 20, (1,), generator=g))
            colour = tuple(float(v) for v in 0.5 + 0.5 * torch.rand(3, generator=g))
            bg = 0.1 + 0.2 * float(torch.rand(1, generator=g))
            for s in range(5):
                out[b, r, s] = square(x0 + 3 * s, y0, colour, bg=bg)
    return out


def test_square_moving_right_in_every_base_is_consistent():
    ev = traversal_evidence(traversal_of(moving_right()))
    assert ev.visible and ev.consistent, ev
    assert ev.strips == 10 and len(ev.strip_changes) == 10
    # the square covers 64 of 1024 px; moving 12 px (> its 8 px side) it leaves its first place and
    # covers a new one: 128 px differ by |colour - bg| per channel
    assert 0.02 < ev.change < 0.15
    assert ev.descriptor_agreement > 0.9  # centroid x rises in every strip, the rest hardly moves
    assert ev.consistency >= MIN_CONSISTENCY and "consistent change" in ev.reason


def test_uniform_brightening_has_the_hand_computed_change_and_ratio():
    # base b has background 0.1 + 0.1 b at the first step and brightens by 0.4 over the strip
    images = torch.empty(5, 1, 5, 3, H, W)
    for b in range(5):
        for s in range(5):
            images[b, 0, s] = 0.1 + 0.1 * b + 0.1 * s
    ev = traversal_evidence(traversal_of(images))
    assert math.isclose(ev.change, 0.4, abs_tol=1e-6)
    # at the middle strength base i and j differ by 0.1 |i - j|: over the 10 pairs, 0.1 * 20 / 10
    assert math.isclose(ev.between, 0.2, abs_tol=1e-6)
    assert math.isclose(ev.ratio, 2.0, rel_tol=1e-5)
    assert math.isclose(ev.map_agreement, 1.0, abs_tol=1e-5) and math.isclose(ev.significance, math.sqrt(10), rel_tol=1e-4)
    assert ev.consistent


def noise_swap(n_bases: int, rows: int = 1, seed: int = 1) -> torch.Tensor:
    """Each strip fades from one random noise image to another, independent one: changes without a common direction."""
    g = torch.Generator().manual_seed(seed)
    a = 0.2 + 0.6 * torch.rand(n_bases, rows, 1, 3, H, W, generator=g)
    b = 0.2 + 0.6 * torch.rand(n_bases, rows, 1, 3, H, W, generator=g)
    f = torch.linspace(0, 1, 5).view(1, 1, 5, 1, 1, 1)
    return (1 - f) * a + f * b


def test_independent_noise_changes_are_not_consistent():
    ev = traversal_evidence(traversal_of(noise_swap(6)))
    assert ev.visible  # large changes, far above the floor...
    assert abs(ev.map_agreement) < 0.1 and abs(ev.descriptor_agreement) < 0.3  # ...each strip its own way
    assert not ev.consistent and ev.reason.startswith("inconsistent")


def test_static_traversal_shows_no_visible_change():
    images = moving_right()[:, :, :1].expand(-1, -1, 5, -1, -1, -1).clone()
    ev = traversal_evidence(traversal_of(images))
    assert ev.change == 0.0 and not ev.visible and not ev.consistent
    assert ev.reason.startswith("no visible change")


def test_change_small_against_the_variation_between_bases_is_not_visible():
    # 4 plain bases at 0.1, 0.3, 0.5, 0.7: they differ by 0.2 * mean(|i - j|) = 0.2 * 10 / 6 on average
    images = (0.1 + 0.2 * torch.arange(4.0)).view(4, 1, 1, 1, 1, 1).expand(4, 1, 5, 3, H, W).clone()
    images[:, :, -1] += 0.01  # above the absolute floor (2/255), tiny next to how the bases differ
    ev = traversal_evidence(traversal_of(images))
    assert math.isclose(ev.change, 0.01, abs_tol=1e-6) and math.isclose(ev.between, 1 / 3, abs_tol=1e-6)
    assert math.isclose(ev.ratio, 0.03, rel_tol=1e-4) and ev.change >= MIN_CHANGE and ev.ratio < MIN_RATIO
    assert not ev.visible and "variation between bases" in ev.reason


def test_one_strip_cannot_show_consistency():
    ev = traversal_evidence(traversal_of(moving_right(1, 1)))
    assert ev.visible and ev.consistency is None and ev.between is None and not ev.consistent
    assert "at least 5 strips" in ev.reason


def test_perfect_agreement_over_too_few_strips_could_be_chance():
    # 4 strips that agree perfectly: mean cosine 1, but z = sqrt(6 pairs) = 2.45 < 3 (chance: 1 in 8 sign patterns)
    ev = traversal_evidence(traversal_of(moving_right(2, 2)))
    assert ev.visible and ev.consistency > 0.9 and not ev.consistent
    assert math.isclose(ev.significance, ev.consistency / math.sqrt(6 * ev.consistency**2 / 36), rel_tol=0.05)
    assert ev.significance < MIN_SIGNIFICANCE and ev.reason.startswith("too few strips")
    five = traversal_evidence(traversal_of(moving_right(5, 1)))  # one more strip: z ~ sqrt(10) = 3.16
    assert five.consistent and five.significance >= MIN_SIGNIFICANCE


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_are_an_error_naming_latent_and_strength(bad):
    images = moving_right()
    images[2, 1, 4, 0, 3, 3] = bad
    with pytest.raises(NonFiniteImagesError, match=r"latent dir7: 1 of 50 traversal images contain NaN or inf "
                                                    r"\(at strengths 3\).*weights for NaN, or use smaller strengths"):
        traversal_evidence(traversal_of(images, latent="dir7"))


def test_to_json_is_plain_strict_json():
    ev = traversal_evidence(traversal_of(moving_right()))
    data = ev.to_json()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert set(data) == {"change", "between", "ratio", "consistency", "significance", "descriptor_agreement", "map_agreement",
                         "strips", "visible", "consistent", "reason", "strip_changes"}
    assert isinstance(data["consistent"], bool) and isinstance(data["strips"], int)
    one = traversal_evidence(traversal_of(moving_right(1, 1))).to_json()
    assert one["between"] is None and one["ratio"] is None and one["consistency"] is None and one["significance"] is None


# --- real generators ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_traversals():
    from latentexplainer_plugin.adapters.vae import VAEAdapter
    from latentexplainer_plugin.attribution import most_active_other
    from latentexplainer_plugin.demo import WEIGHTS_DIR, demo_data, load_demo_model
    from latentexplainer_plugin.models.training import latent_kl

    if not (WEIGHTS_DIR / "model.safetensors").exists():
        pytest.skip("demo weights not built")
    model = load_demo_model(device="cpu")
    kl = latent_kl(model, demo_data(256)["images"])  # 256 held-out images: KL within 5 % of the full 2000
    adapter = VAEAdapter(model)
    bases = adapter.sample_bases(5, seed=0)
    traversals = adapter.traverse(list(range(adapter.n_latents)), bases, STRENGTHS, rows=2, clamp=most_active_other(kl))
    return traversals, kl


def test_demo_vae_active_latents_pass_and_collapsed_fail(demo_traversals):
    traversals, kl = demo_traversals
    active = [i for i in range(len(kl)) if kl[i] > 0.05]
    assert len(active) == 5
    for i, t in enumerate(traversals):
        ev = traversal_evidence(t)
        assert ev.consistent == (i in active), (t.latent_id, float(kl[i]), ev)
        if i not in active:
            assert not ev.visible  # collapsed: the images hardly change


def test_random_unet_directions_are_not_consistent():
    from diffusers import DDIMScheduler, UNet2DModel

    from latentexplainer_plugin.adapters.diffusion import DDPMAdapter
    from latentexplainer_plugin.directions import pca

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()
    adapter = DDPMAdapter(unet, DDIMScheduler(num_train_timesteps=1000), steps=5, t_edit=500)
    adapter.set_directions(pca(adapter, n_directions=2, n_samples=4))
    for t in adapter.traverse([0, 1], adapter.sample_bases(5, seed=0), STRENGTHS, rows=1):
        ev = traversal_evidence(t)
        assert ev.visible and not ev.consistent, (t.latent_id, ev)  # the noise changes, each base its own way
        assert ev.consistency < 0.35


# --- the gate in LatentExplainer ----------------------------------------------------------------


class _Adapter(Adapter):
    """Latent 0 moves a square right in every base, latent 1 adds independent noise, latent 2 has a NaN."""

    name = "stub"
    default_bias = "combination"

    @property
    def n_latents(self):
        return 3

    def latent_id(self, index):
        return f"z{index}"

    def sample_bases(self, n, seed=0):
        return torch.zeros(n, 1)

    def traverse(self, indices, bases, strengths, rows=1, **options):
        out = []
        for i in indices:
            if i == 1:
                images = noise_swap(len(bases), rows, seed=3)
            else:
                images = moving_right(len(bases), rows)
                if i == 2:
                    images[0, 0, 2] = float("nan")
            out.append(traversal_of(images, f"z{i}"))
        return out


class _SameAnswer(Backend):
    """Confidently says the same thing every time (or fails)."""

    name = "stub"

    def __init__(self, fail=False):
        self.fail = fail

    def explain(self, traversal, prompt, n):
        if self.fail:
            raise BackendError("server down")
        return [Response("Increasing it moves the object from left to right.") for _ in range(n)]


def _explainer(backend):
    from latentexplainer_plugin.attribution import LatentExplainer

    return LatentExplainer(_Adapter(), backend=backend, similarity="bow", threshold=0.5)


def test_confident_answers_are_clear_only_where_the_images_agree():
    results = _explainer(_SameAnswer()).attribute(target=[0, 1, 2])
    moving, noise, nan = results
    assert moving.status == "ok" and moving.clear and moving.explanation.startswith("Increasing it moves")
    assert isinstance(moving.evidence, Evidence) and moving.evidence.consistent
    assert noise.status == "ok" and noise.certainty == pytest.approx(1.0)  # the answers agree perfectly...
    assert not noise.clear and noise.explanation is None  # ...but the images do not
    assert noise.to_json()["evidence"]["consistent"] is False and noise.to_json()["explanation"] is None
    assert nan.status == "failed" and "latent z2" in nan.error and "NaN or inf" in nan.error and nan.evidence is None


def test_evidence_is_recorded_when_the_backend_fails():
    moving, noise, _ = _explainer(_SameAnswer(fail=True)).attribute(target=[0, 1, 2])
    assert moving.status == "failed" and "server down" in moving.error
    assert moving.evidence.consistent and not noise.evidence.consistent
    # the combination bias shows 2 bases, but 5 are traversed so that the evidence can tell chance from agreement
    assert moving.to_json()["evidence"]["strips"] == 5 and moving.traversal.n_bases == 5


def test_nan_weights_fail_the_latent_with_the_cause(tiny_vae):
    from latentexplainer_plugin.attribution import LatentExplainer

    with torch.no_grad():
        next(p for n, p in tiny_vae.named_parameters() if n.startswith("dec")).fill_(float("nan"))
    results = LatentExplainer(tiny_vae, samples=2, similarity="bow", threshold=0.5).attribute(target=[0, 2])
    for r in results:
        assert r.status == "failed" and not r.clear and r.explanation is None
        assert r.error.startswith(f"latent {r.id}: ") and "NaN or inf" in r.error and "weights for NaN" in r.error
        assert r.to_json()["evidence"] is None
