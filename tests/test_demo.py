"""The shipped demo end to end: active latents are explained by the factor they capture, collapsed ones abstain."""

import pytest

from latentexplainer_plugin.cli import main
from latentexplainer_plugin.demo import WEIGHTS_DIR
from latentexplainer_plugin.store import read_results

# An independent judge for this test: which words name which ground-truth factor.
FACTOR_WORDS = {
    "x_position": ("left to right", "right to left", "diagonally"),
    "y_position": ("top to bottom", "bottom to top", "diagonally"),
    "scale": ("larger", "smaller"),
    "rotation": ("rotates",),
    "hue": ("colour",),
    "background": ("background",),
    "shape": ("shape",),
}

pytestmark = pytest.mark.skipif(not (WEIGHTS_DIR / "model.safetensors").exists(), reason="demo weights not built")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    code = main(["demo", "--out", str(out), "--quiet"])
    return code, read_results(out / "results.json"), out


def test_demo_explains_every_latent(demo_run):
    code, data, out = demo_run
    assert code == 0
    assert len(data["latents"]) == 10 and all(e["status"] == "ok" for e in data["latents"])
    assert (out / "report.html").is_file()
    assert data["settings"]["similarity"] == "agree" and data["settings"]["samples"] == 5


def test_active_latents_name_their_factor_and_collapsed_ones_abstain(demo_run):
    _, data, _ = demo_run
    active = [e for e in data["latents"] if e["active"] and e["factor"]["name"]]
    collapsed = [e for e in data["latents"] if not e["active"]]
    assert len(active) >= 5, "the demo model should disentangle several factors"
    for e in collapsed:
        assert not e["clear"] and e["explanation"] is None, e
    right = 0
    for e in active:
        words = FACTOR_WORDS[e["factor"]["name"]]
        if e["clear"] and any(w in e["explanation"].lower() for w in words):
            right += 1
    assert right / len(active) >= 0.8, [(e["id"], e["factor"], e["explanation"]) for e in active]
