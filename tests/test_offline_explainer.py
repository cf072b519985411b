"""The offline (measurement) explainer on synthetic traversals drawn here, not by the demo renderer."""

from __future__ import annotations

import colorsys
import math
import random

import numpy as np
import pytest
import torch

from latentexplainer_plugin.backends.base import BackendError
from latentexplainer_plugin.backends.measure import (
    SCALES,
    foreground,
    measure,
    relative_rotation,
    rgb_to_hsv,
    strip_effects,
    theil_sen_change,
)
from latentexplainer_plugin.backends.offline import OfflineBackend, colour_name
from latentexplainer_plugin.types import Prompt, Traversal

STEPS = 5


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is faster, and kind to a busy machine
    yield
    torch.set_num_threads(threads)


def draw(
    h: int = 64,
    w: int = 64,
    *,
    x: float = 0.5,
    y: float = 0.5,
    size: float = 0.15,
    angle: float = 0.0,
    shape: str = "square",
    aspect: float = 1.0,
    hue: float = 0.0,
    bg: float = 0.3,
    channels: int = 3,
    noise: float = 0.005,
    seed: int = 0,
    draw_object: bool = True,
) -> torch.Tensor:
    """One (C, H, W) image: an object (half-extent ``size`` of the smaller side, centred at x, y,
    turned ``angle`` degrees clockwise on screen) on a plain background, 2x2 supersampled."""
    ys = (torch.arange(2 * h, dtype=torch.float64) + 0.5) / (2 * h)
    xs = (torch.arange(2 * w, dtype=torch.float64) + 0.5) / (2 * w)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    dx, dy = (gx - x) * w, (gy - y) * h  # pixels
    t = math.radians(angle)
    u = math.cos(t) * dx + math.sin(t) * dy
    v = -math.sin(t) * dx + math.cos(t) * dy
    s = size * min(h, w)
    a, b = s / math.sqrt(aspect), s * math.sqrt(aspect)  # same area whatever the aspect
    if shape == "square":
        inside = (u.abs() <= a) & (v.abs() <= b)
    elif shape in ("disc", "ellipse"):
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    else:
        raise ValueError(shape)
    cover = inside.double().reshape(h, 2, w, 2).mean(dim=(1, 3)).float()
    if not draw_object:
        cover = torch.zeros_like(cover)
    if channels == 3:
        colour = torch.tensor(colorsys.hsv_to_rgb(hue % 1.0, 0.9, 1.0), dtype=torch.float32)
    else:
        colour = torch.tensor([0.95])
    img = cover[None] * colour[:, None, None] + (1.0 - cover[None]) * bg
    gen = torch.Generator().manual_seed(seed)
    img = img + noise * torch.randn(img.shape, generator=gen)
    return img.clamp(0.0, 1.0)


def strip(steps: int = STEPS, **ranges) -> torch.Tensor:
    """(S, C, H, W): each keyword is either a constant or a (start, end) pair swept linearly."""
    frames = []
    for i in range(steps):
        f = i / (steps - 1)
        kw = {k: (v[0] + f * (v[1] - v[0]) if isinstance(v, tuple) else v) for k, v in ranges.items()}
        frames.append(draw(seed=i, **kw))
    return torch.stack(frames)


def traversal(*rows_per_base: list[torch.Tensor], latent: str = "z3") -> Traversal:
    """Bases given as lists of row strips -> Traversal with images (B, R, S, C, H, W)."""
    images = torch.stack([torch.stack(list(rows)) for rows in rows_per_base])
    return Traversal(latent_id=latent, images=images, strengths=torch.linspace(-3, 3, images.shape[2]), rule="set", index=3)


PROMPT = Prompt(text="", images=[], bias="none")


def explain_one(*rows: torch.Tensor, backend: OfflineBackend | None = None):
    (resp,) = (backend or OfflineBackend()).explain(traversal(list(rows)), PROMPT, 1)
    assert resp.ok
    return resp


# --- measurements -------------------------------------------------------------------------------


def test_rgb_to_hsv_matches_colorsys():
    rgb = torch.rand(1, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    h, s, v = rgb_to_hsv(rgb)
    for i in range(4):
        for j in range(5):
            hh, ss, vv = colorsys.rgb_to_hsv(*rgb[0, :, i, j].tolist())
            assert math.isclose(float(h[0, i, j]), hh, abs_tol=1e-5) or abs(abs(float(h[0, i, j]) - hh) - 1) < 1e-5
            assert math.isclose(float(s[0, i, j]), ss, abs_tol=1e-5)
            assert math.isclose(float(v[0, i, j]), vv, abs_tol=1e-5)


def test_measure_properties():
    imgs = torch.stack(
        [
            draw(x=0.3, y=0.7, size=0.12, hue=0.33, bg=0.2),
            draw(shape="disc", size=0.2, hue=0.66, bg=0.5),
            draw(aspect=0.15, size=0.15),
            draw(draw_object=False, bg=0.4),
        ]
    )
    m = measure(imgs)
    assert abs(float(m["x"][0]) - 0.3) < 0.02 and abs(float(m["y"][0]) - 0.7) < 0.02
    assert abs(float(m["area"][0]) - (2 * 0.12) ** 2) < 0.01
    assert colour_name(float(m["hue"][0])) == "green" and colour_name(float(m["hue"][1])) == "blue"
    assert abs(float(m["background"][0]) - 0.2) < 0.01 and abs(float(m["background"][1]) - 0.5) < 0.01
    assert float(m["compactness"][1]) > 0.9 > float(m["compactness"][0]) > 0.7 > 0.4 > float(m["compactness"][2])
    assert torch.isnan(m["x"][3]) and torch.isnan(m["area"][3])  # plain image: no object
    assert abs(float(m["intensity"][3]) - 0.4) < 0.01
    masks, _ = foreground(imgs)
    assert masks[3].sum() == 0 and masks[0].sum() > 0


def test_relative_rotation_sign_and_invariance():
    a = torch.stack([draw(shape="ellipse", aspect=0.3, angle=0.0), draw(shape="disc")])
    b = torch.stack([draw(shape="ellipse", aspect=0.3, angle=20.0, x=0.6, size=0.18), draw(shape="disc", x=0.4)])
    (ma, _), (mb, _) = foreground(a), foreground(b)
    rot = relative_rotation(ma, mb)
    assert 16 < float(rot[0]) < 24  # clockwise on screen is positive; moving and growing ignored
    assert float(rot[1]) == pytest.approx(0.0, abs=1e-9)  # a disc has no visible rotation
    assert -24 < float(relative_rotation(mb[:1], ma[:1])[0]) < -16


def test_theil_sen_ignores_one_bad_frame():
    v = torch.tensor([0.0, 1.0, 2.0, 30.0, 4.0])
    assert math.isclose(theil_sen_change(v), 4.0, abs_tol=1e-6)
    assert theil_sen_change(torch.tensor([float("nan"), 1.0, float("nan")])) == pytest.approx(0.0, abs=1e-12)


def test_strip_effects_scales():
    eff = strip_effects(strip(x=(0.25, 0.75)))
    assert math.isclose(eff["x"], 0.5 / SCALES["x"], abs_tol=0.05)
    assert abs(eff["y"]) < 0.05 and abs(eff["area"]) < 0.05 and eff["pixel_change"] > 0.01


# --- explanations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ranges, expected",
    [
        ({"x": (0.25, 0.75)}, "moves the object from left to right"),
        ({"x": (0.75, 0.25)}, "moves the object from right to left"),
        ({"y": (0.25, 0.75)}, "moves the object from top to bottom"),
        ({"y": (0.75, 0.25)}, "moves the object from bottom to top"),
        ({"shape": "disc", "size": (0.08, 0.2)}, "makes the object larger"),
        ({"shape": "disc", "size": (0.2, 0.08)}, "makes the object smaller"),
        ({"shape": "ellipse", "aspect": 0.35, "size": 0.2, "angle": (-40.0, 40.0)}, "rotates the object clockwise"),
        ({"shape": "ellipse", "aspect": 0.35, "size": 0.2, "angle": (40.0, -40.0)}, "rotates the object counterclockwise"),
        ({"hue": (0.0, 0.66)}, "changes the object's colour from red to blue"),
        ({"bg": (0.1, 0.5)}, "makes the background brighter"),
        ({"bg": (0.5, 0.1)}, "makes the background darker"),
        ({"aspect": (1.0, 0.12)}, "changes the object's shape, making it more elongated"),
        ({"aspect": (0.12, 1.0)}, "changes the object's shape, making it more compact"),
        ({"draw_object": False, "bg": (0.2, 0.6)}, "makes the whole image brighter"),
    ],
)
def test_single_change_is_named_with_direction(ranges, expected):
    resp = explain_one(strip(**ranges))
    assert not resp.abstained, resp.meta
    assert resp.text.startswith("Increasing z3 " + expected), (resp.text, resp.meta["effects"])
    assert " and " not in resp.text, resp.text  # one change, no second clause, no boilerplate
    assert resp.meta["base"] == 0 and "effects" in resp.meta


def test_static_image_abstains():
    resp = explain_one(strip(noise=0.01, x=0.4, hue=0.3))
    assert resp.abstained
    assert "no visible change" in resp.text.lower() and "z3" in resp.text


def test_plain_noise_abstains():
    resp = explain_one(strip(noise=0.02, draw_object=False))
    assert resp.abstained and "no visible change" in resp.text.lower()


@pytest.mark.parametrize("h, w", [(48, 48), (96, 128), (16, 16)])
def test_other_image_sizes(h, w):
    size = 0.25 if h == 16 else 0.12
    resp = explain_one(strip(h=h, w=w, size=size, x=(0.25, 0.75)))
    assert "from left to right" in resp.text and not resp.abstained, resp.meta["effects"]
    resp = explain_one(strip(h=h, w=w, shape="disc", size=(0.1, 0.22)))
    assert "larger" in resp.text, resp.meta["effects"]


def test_single_channel_images():
    resp = explain_one(strip(channels=1, y=(0.75, 0.25)))
    assert "from bottom to top" in resp.text
    resp = explain_one(strip(channels=1, shape="disc", size=(0.2, 0.08)))
    assert "smaller" in resp.text
    resp = explain_one(strip(channels=1, noise=0.01))
    assert resp.abstained


def test_secondary_change_only_when_comparable():
    resp = explain_one(strip(x=(0.25, 0.75), shape="disc", size=(0.08, 0.16)))  # both large
    assert "left to right" in resp.text and "larger" in resp.text, resp.meta["effects"]
    assert resp.text.count(" and ") == 1
    resp = explain_one(strip(x=(0.2, 0.8), shape="disc", size=(0.12, 0.13)))  # growth negligible
    assert "larger" not in resp.text


def test_diagonal_movement_is_one_phrase():
    resp = explain_one(strip(x=(0.7, 0.3), y=(0.3, 0.7)))
    assert resp.text == "Increasing z3 moves the object diagonally from top right to bottom left."


def test_small_hue_shift_names_the_direction():
    resp = explain_one(strip(hue=(0.33, 0.2)))  # green towards yellow, both ends still "green"
    assert "colour from green towards yellow" in resp.text


def test_robust_to_one_bad_frame():
    s = strip(x=(0.25, 0.75))
    s[2] = draw(x=0.1, seed=9)  # one frame jumps away
    assert "from left to right" in explain_one(s).text


def test_rows_agree_gives_shared_change():
    row1 = strip(x=(0.25, 0.75), bg=0.2, hue=0.0)
    row2 = strip(x=(0.3, 0.7), bg=0.6, hue=0.6)
    resp = explain_one(row1, row2)
    assert resp.text == "Increasing z3 moves the object from left to right."
    assert len(resp.meta["row_effects"]) == 2
    assert math.isclose(resp.meta["effects"]["x"], min(r["x"] for r in resp.meta["row_effects"]))


def test_rows_disagree_gives_weaker_answer():
    row1 = strip(x=(0.25, 0.75), bg=0.2)
    row2 = strip(x=(0.75, 0.25), bg=0.6)
    resp = explain_one(row1, row2)
    assert "left to right" not in resp.text and "right to left" not in resp.text
    assert resp.abstained
    assert resp.meta["effects"]["x"] == pytest.approx(0.0, abs=1e-12)


def test_one_answer_per_base():
    t = traversal([strip(x=(0.25, 0.75))], [strip(shape="disc", size=(0.08, 0.2))], [strip()], latent="dir7")
    out = OfflineBackend().explain(t, PROMPT, 3)
    assert [r.meta["base"] for r in out] == [0, 1, 2]
    assert "left to right" in out[0].text and "larger" in out[1].text and out[2].abstained
    assert all(r.text.startswith(("Increasing dir7", "No visible change")) for r in out)
    assert len(OfflineBackend().explain(t, PROMPT, 2)) == 2


def test_too_few_bases_is_a_clear_error():
    t = traversal([strip(x=(0.25, 0.75))], [strip()])
    with pytest.raises(BackendError, match=r"got n=3, but the traversal has 2 bases; build it with at least n bases"):
        OfflineBackend().explain(t, PROMPT, 3)


def test_capabilities_and_describe():
    b = OfflineBackend(min_effect=0.2)
    assert b.name == "offline" and b.supports_images and b.supports_n and b.samples_from_bases
    d = b.describe()
    assert d["name"] == "offline" and d["min_effect"] == 0.2 and "secondary_ratio" in d and "scales" in d
    with pytest.raises(ValueError):
        OfflineBackend(min_effect=0)


def test_colour_names():
    names = [colour_name(h / 360) for h in (0, 30, 60, 120, 180, 230, 275, 320, 355, 360 + 120)]
    assert names == ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta", "red", "green"]


@pytest.mark.parametrize("effects, hues", [
    ({"x": 0.5}, None), ({"x": -0.5}, None), ({"y": 0.5}, None), ({"y": -0.5}, None),
    ({"area": 0.5}, None), ({"area": -0.5}, None), ({"rotation": 0.5}, None), ({"rotation": -0.5}, None),
    ({"background": 0.5}, None), ({"background": -0.5}, None), ({"compactness": 0.5}, None),
    ({"compactness": -0.5}, None), ({"hue": 0.5}, (0.62, 0.98)), ({"hue": 0.2}, (0.30, 0.33)),
    ({"x": 0.5, "area": 0.4}, None), ({"x": -0.5, "y": 0.45}, None),
])
def test_structured_claims_say_what_the_sentence_says(effects, hues):
    """The claims the offline explainer attaches are what the claim parser reads in its own sentence."""
    from latentexplainer_plugin.backends.offline import OfflineBackend, structured_claims
    from latentexplainer_plugin.uncertainty import Claim, parse_claims

    full = {k: 0.0 for k in ("x", "y", "area", "rotation", "hue", "compactness", "background", "intensity")}
    full |= effects | {"pixel_change": 0.1}
    backend = OfflineBackend()
    text, abstained, parts = backend._answer("z3", {"effects": full, "object": True, "hues": hues})
    assert not abstained and sorted(parts) == sorted(effects)
    given = sorted(Claim.from_json(c).label() for c in structured_claims(parts, full, hues))
    assert given == sorted(c.label() for c in parse_claims(text)), text
