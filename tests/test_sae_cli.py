"""``latentexplainer explain --sae``: an SAE's features as the latents, through the same command, checks and run files."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from latentexplainer_plugin.cli import main
from latentexplainer_plugin.demo import WEIGHTS_DIR

try:
    from tests.test_sae_steering import write_axis_sae
except ImportError:  # tests/ on sys.path instead of the repository root
    from test_sae_steering import write_axis_sae  # type: ignore

SHIFT = 4.0  # b_dec = -4 keeps every feature active on N(0, I) bases: f_k = z_k + 4 > 0


def axis_sae(folder, d=10):
    """SAELens layout, written by hand from its documented keys: decoder rows are the demo VAE's latent axes."""
    return write_axis_sae(folder, d, SHIFT)


def run(tmp_path, name, *argv):
    out = tmp_path / name
    code = main(["explain", "--model", str(WEIGHTS_DIR), "--samples", "3", "--bias", "combination", "--out", str(out),
                 "--quiet", *argv])
    return code, (json.loads((out / "results.json").read_text()) if code in (0, 1) else None)


def test_axis_features_are_explained_as_their_latents(tmp_path):
    sae = axis_sae(tmp_path / "sae")
    code, feats = run(tmp_path, "sae-run", "--sae", str(sae), "--features", "1,3,4", "-o", "strengths=absolute",
                      f"--strengths={','.join(str(s + SHIFT) for s in (-3, -1.5, 0, 1.5, 3))}")
    assert code == 0
    code, plain = run(tmp_path, "plain-run", "--latents", "1,3,4", "--strengths=-3,-1.5,0,1.5,3")
    assert code == 0
    assert feats["sae"] == str(sae) and feats["adapter"]["name"] == "sae"
    assert [e["id"] for e in feats["latents"]] == ["f1", "f3", "f4"]
    for f, z in zip(feats["latents"], plain["latents"]):
        assert f["clear"] == z["clear"]
        if z["clear"]:
            assert f["explanation"].replace(f["id"], z["id"]) == z["explanation"]
        assert f["dead"] is False and 0.99 <= f["frequency"] <= 1.0
    assert sum(z["clear"] for z in plain["latents"]) >= 2  # z1 and z4 of the demo are clear: else this proves nothing


def test_sae_input_errors_name_both_sizes_before_any_work(tmp_path, capsys):
    sae = tmp_path / "small"
    sae.mkdir()
    eye = torch.eye(4)
    save_file({"W_enc": eye, "b_enc": torch.zeros(4), "W_dec": eye.clone(), "b_dec": torch.zeros(4)},
              str(sae / "sae_weights.safetensors"))
    (sae / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 4, "d_sae": 4,
                                              "metadata": {"hook_name": "decoder.input"}}))
    code, _ = run(tmp_path, "bad", "--sae", str(sae))
    err = capsys.readouterr().err
    assert code == 2 and "d_in=4" in err and "10" in err, err
    assert not (tmp_path / "bad" / "results.json").exists()
    code, _ = run(tmp_path, "bad2", "--features", "1")
    assert code == 2 and "--features picks SAE features: give the SAE with --sae PATH" in capsys.readouterr().err
    code, _ = run(tmp_path, "bad3", "--sae", str(tmp_path / "nowhere"))
    assert code == 2 and "--sae" in capsys.readouterr().err


def test_sae_train_then_explain_its_features(tmp_path, capsys):
    out = tmp_path / "sae"
    code = main(["sae-train", "--model", str(WEIGHTS_DIR), "--site", "decoder.fc.1.output", "--n-features", "32", "-k", "4",
                 "--steps", "60", "--samples", "512", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["d_sae"] == 32 and cfg["metadata"]["hook_name"] == "decoder.fc.1.output"
    report = json.loads(next(line for line in printed.splitlines() if line.startswith("{")))
    assert 0.0 <= report["fvu"] < 1.0 and 0 < report["l0"] <= 4 + 1e-6
    assert (out / "activations" / "manifest.json").is_file()
    code, data = run(tmp_path, "feat-run", "--sae", str(out), "--features", "0,1")
    assert code in (0, 1) and [e["id"] for e in data["latents"]] == ["f0", "f1"]
    assert str(data["adapter"]["site"]) == "decoder.fc.1.output"
    assert all("dead" in e and "frequency" in e for e in data["latents"])


def test_sae_train_on_a_block_update_records_and_steers_the_update_site(tmp_path, capsys):
    out = tmp_path / "sae-u"
    code = main(["sae-train", "--model", str(WEIGHTS_DIR), "--site", "decoder.deconv.1", "--update", "--n-features", "16",
                 "-k", "2", "--steps", "30", "--samples", "128", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "decoder.deconv.1.update"  # where it reads, so where steering edits
    assert json.loads((out / "activations" / "manifest.json").read_text())["kind"] == "update"
    code, data = run(tmp_path, "feat-u", "--sae", str(out), "--features", "0")
    assert code in (0, 1) and str(data["adapter"]["site"]) == "decoder.deconv.1.update"
