"""The command line: train-vae -> explain writes a valid run directory; bad input fails fast and clearly."""

import json

import numpy as np
import pytest

from latentexplainer_plugin.cli import main
from latentexplainer_plugin.store import read_results


@pytest.fixture(scope="module")
def tiny_model(tiny_trained_vae):
    return tiny_trained_vae


def test_train_vae_writes_safetensors_and_config(tiny_model):
    config = json.loads((tiny_model / "model" / "config.json").read_text())
    assert config["latent_dim"] == 3 and config["image_size"] == 16
    assert config["factor_names"][:3] == ["shape", "x_position", "y_position"]
    assert (tiny_model / "model" / "model.safetensors").stat().st_size > 1000


def test_explain_writes_results_strips_and_report(tiny_model, capsys):
    out = tiny_model / "run"
    code = main(["explain", "--model", str(tiny_model / "model"), "--data", str(tiny_model / "data.npz"),
                 "--out", str(out), "--samples", "2", "--similarity", "bow", "--quiet"])
    assert code == 0
    data = read_results(out / "results.json")
    assert data["status"] == "complete" and data["schema_version"] == 1
    assert data["bias"] == "disentanglement" and data["backend"]["name"] == "offline"
    assert [e["id"] for e in data["latents"]] == ["z0", "z1", "z2"]
    for e in data["latents"]:
        assert e["status"] == "ok" and 0.0 <= e["certainty"] <= 1.0
        assert len(e["responses"]) == 2
        assert (out / e["strip"]).is_file()
        assert e["explanation"] is None or e["clear"]
        assert "kl" in e and "factor" in e
    report = (out / "report.html").read_text()
    assert "z2" in report and "strips/z0.png" in report
    assert "wrote" in capsys.readouterr().out
    # the same command again is refused (a finished run is not silently overwritten)
    assert main(["explain", "--model", str(tiny_model / "model"), "--out", str(out), "--samples", "2",
                 "--similarity", "bow", "--quiet"]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backend", "gpt5"], "unknown backend 'gpt5'; registered: hf, offline, openai"),
        (["--bias", "entangled"], "unknown bias 'entangled'; registered: combination, conditional, disentanglement"),
        (["--samples", "0"], "--samples must be >= 1, got 0"),
        (["--latents", "7"], "latent index 7 is out of range: this model has 3 latents (0..2)"),
        (["--latents", "a"], "--latents must be comma-separated integers"),
        (["--strengths", "1,nan"], "strengths must be finite numbers"),
        (["--strengths", ""], "at least 2 values"),
        (["--similarity", "jaccard"], "jaccard"),
        (["--threshold", "1.5"], "--threshold must be in [0, 1], got 1.5"),
        (["--device", "cuda:0"], "CUDA is not available"),
        (["--device", "tpu"], "is not a torch device"),
        (["--adapter", "gan"], "unknown adapter 'gan'; registered:"),
    ],
)
def test_bad_explain_input(tiny_model, tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code = main(["explain", "--model", str(tiny_model / "model"), "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not (out / "results.json").exists()


def test_missing_model_and_bad_data(tmp_path, capsys):
    assert main(["explain", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "nope: no such directory" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((2, 16, 16, 3), np.uint8))
    assert main(["train-vae", "--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "m")]) == 2
    assert "has no 'images' array (found: pixels)" in capsys.readouterr().err
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 16, 16, 3), np.float32))
    assert main(["train-vae", "--data", str(tmp_path / "float.npz"), "--out", str(tmp_path / "m")]) == 2
    assert "'images' must be uint8" in capsys.readouterr().err
