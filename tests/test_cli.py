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


# ---------------------------------------------------------------------------------------------------
# exit codes: 0 ok, 1 some latents failed, 2 bad input, 130 interrupted, 3 internal error


def test_an_internal_error_exits_3_with_a_summary_and_the_traceback_in_a_file(monkeypatch, capsys, tmp_path):
    import tempfile

    from latentexplainer_plugin import cli

    key = "sk-test-0123456789abcdef"

    def broken(args):  # stands for a bug anywhere in a command, with secrets in its message
        raise KeyError(f"no_such_key at http://user:hunter2@example.com/v1 with {key}")

    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "plugins", broken)
    assert main(["plugins"]) == cli.EXIT_INTERNAL_ERROR == 3
    err = capsys.readouterr().err
    assert err.startswith("latentexplainer plugins: internal error: KeyError: 'no_such_key at http://***@example.com/v1 with ***'\n")
    assert "Traceback" not in err
    crash = list(tmp_path.glob("latentexplainer-crash-*.txt"))
    assert len(crash) == 1 and f"the full traceback was written to {crash[0]}" in err
    text = crash[0].read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text and "KeyError: 'no_such_key at" in text
    assert "hunter2" not in err + text and key not in err + text
    assert oct(crash[0].stat().st_mode & 0o777) == oct(0o600)  # tracebacks may show paths: private to the user


@pytest.mark.parametrize("raised, code", [(KeyboardInterrupt(), 130), (MemoryError(), 3), (OSError(28, "No space left"), 3)])
def test_exit_codes_of_interrupts_and_environment_failures(monkeypatch, capsys, tmp_path, raised, code):
    import tempfile

    from latentexplainer_plugin import cli

    def command(args):
        raise raised

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "plugins", command)
    assert main(["plugins"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 3:
        assert "internal error" in err and "problem of this machine (disk, memory, permissions)" in err


def test_some_failed_latents_exit_1(tiny_model, tmp_path, monkeypatch, capsys):
    from latentexplainer_plugin.backends.offline import OfflineBackend

    def explain(self, traversal, prompt, n):
        if traversal.index == 1:
            raise RuntimeError("backend fell over")
        return original(self, traversal, prompt, n)

    original = OfflineBackend.explain
    monkeypatch.setattr(OfflineBackend, "explain", explain)
    out = tmp_path / "run"
    code = main(["explain", "--model", str(tiny_model / "model"), "--out", str(out), "--samples", "2",
                 "--similarity", "bow", "--quiet"])
    assert code == 1, capsys.readouterr().err
    status = {e["id"]: e["status"] for e in read_results(out / "results.json")["latents"]}
    assert status == {"z0": "ok", "z1": "failed", "z2": "ok"}


SEED = str(2**70)  # 1180591620717411303424


@pytest.mark.parametrize("argv, message", [
    (["demo", "--seed", SEED], f"--seed must be an integer in [0, {2**63 - 1}], got {SEED}"),
    (["demo", "--seed=-1"], f"--seed must be an integer in [0, {2**63 - 1}], got -1"),
    (["make-data", "--seed", SEED], f"--seed must be an integer in [0, {2**63 - 1}], got {SEED}"),
    (["train-vae", "--data", "x.npz", "--seed", SEED], f"--seed must be an integer in [0, {2**63 - 1}], got {SEED}"),
    (["demo", "--samples", SEED], f"--samples must be at most 1000, got {SEED}"),
    (["make-data", "--n", "10000000000"], "--n must be at most 1000000, got 10000000000"),
    (["train-vae", "--data", "x.npz", "--latents", "1000000000"], "--latents must be at most 4096, got 1000000000"),
    (["train-vae", "--data", "x.npz", "--steps", SEED], f"--steps must be at most 10000000, got {SEED}"),
    (["demo", "--top-k", SEED], f"--top-k must be at most 1000000, got {SEED}"),
    (["train-vae", "--data", "x.npz", "--warmup-steps", SEED], f"--warmup-steps must be an integer in [-2147483647, 2147483647], got {SEED}"),
])
def test_huge_integers_are_refused_with_the_allowed_range(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_train_vae_out_that_is_a_file_is_refused_before_training(tiny_model, tmp_path, capsys, monkeypatch):
    from latentexplainer_plugin.models import training as train

    monkeypatch.setattr(train, "train_vae", lambda *a, **k: pytest.fail("training started"))
    target = tmp_path / "model.txt"
    target.write_text("keep me")
    code = main(["train-vae", "--data", str(tiny_model / "data.npz"), "--out", str(target), "--steps", "2",
                 "--batch-size", "4", "--quiet"])
    assert code == 2
    assert f"--out {target} exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_make_data_creates_a_missing_directory_and_refuses_what_cannot_be_written(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "shapes.npz"
    assert main(["make-data", "--out", str(out), "--n", "3"]) == 0
    assert f"wrote {out} (3 images)" in capsys.readouterr().out
    with np.load(out) as f:
        assert f["images"].shape == (3, 64, 64, 3)
    assert main(["make-data", "--out", str(tmp_path / "plain"), "--n", "2"]) == 0  # numpy adds .npz: say so
    assert f"wrote {tmp_path / 'plain.npz'} (2 images)" in capsys.readouterr().out
    (tmp_path / "afile").write_text("x")
    for argv, message in [
        (["--out", str(tmp_path / "afile" / "d.npz")], "afile is a file, so no directory can be made under it"),
        (["--out", str(tmp_path / "new")], "is a directory; give a file name"),
        (["--out", ""], "--out ''"),
    ]:
        assert main(["make-data", "--n", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    """`latentexplainer plugins | head -1`: the reader is gone before we write; no traceback, exit 0."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as when `head` has exited
    try:
        run = subprocess.run([sys.executable, "-c", "import sys; from latentexplainer_plugin.cli import main; "
                              "sys.exit(main())", "plugins"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert run.returncode == 0, run.stderr
    for text in ("Traceback", "BrokenPipeError", "Exception ignored"):
        assert text not in run.stderr, run.stderr


def test_library_words_become_flags_only_on_the_command_line():
    from latentexplainer_plugin.cli.common import in_flag_words
    from latentexplainer_plugin.directions.finders import labelled_images

    with pytest.raises(ValueError) as info:
        labelled_images(None)
    library = str(info.value)
    assert "data=" in library and "--data" not in library
    assert in_flag_words(library).startswith("the conditional finder needs labelled data (--data): an npz with images")
    assert in_flag_words("pass resume=True to continue it or force=True to start over; use another output directory") == \
        "pass --resume to continue it or --force to start over; use another --out directory"
