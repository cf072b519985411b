"""Filesystem safety: links and special files where the project writes are refused, untouched;
temp files never outlive a failed write; one file mode (0o666 less the umask) for everything."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import torch

from latentexplainer_plugin import safe_io
from latentexplainer_plugin.cache import ResponseCache
from latentexplainer_plugin.cli import main
from latentexplainer_plugin.directions import Directions
from latentexplainer_plugin.report.html import write_report
from latentexplainer_plugin.results import LatentResult
from latentexplainer_plugin.safe_load import LoadError, load_weights, read_config
from latentexplainer_plugin.store import LOCK, RESULTS, RunStore, RunStoreError, read_results
from latentexplainer_plugin.types import Response, Traversal

SETTINGS = {"samples": 2, "strengths": [-1.0, 1.0]}
SECRET = "outside: must stay exactly like this\n"

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")


def outside(tmp_path: Path) -> Path:
    """A file outside the run directory that a planted link points to."""
    target = tmp_path / "outside.txt"
    target.write_text(SECRET)
    return target


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.tmp")]


def traversal(latent: str = "z0") -> Traversal:
    images = torch.rand(1, 1, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return Traversal(latent_id=latent, images=images, strengths=torch.tensor([-1.0, 0.0, 1.0]), rule="add")


def result(i: int, with_strip: bool = True) -> LatentResult:
    return LatentResult(f"z{i}", i, "ok", explanation=f"latent {i} moves", certainty=0.5, clear=True,
                        traversal=traversal(f"z{i}") if with_strip else None)


def within(seconds: float, fn, *args, **kwargs):
    """Run ``fn`` in a thread; fail (instead of hanging the test run) when it takes longer."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{fn.__name__} hung for {seconds} s (blocked on a FIFO?)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- the primitives -------------------------------------------------------------------------------


def test_atomic_write_refuses_a_link_and_leaves_its_target(tmp_path):
    target = outside(tmp_path)
    link = tmp_path / "results.json"
    link.symlink_to(target)
    with pytest.raises(safe_io.UnsafePathError, match="symbolic link"):
        safe_io.atomic_write_text(link, "{}")
    assert target.read_text() == SECRET and link.is_symlink()
    with pytest.raises(safe_io.UnsafePathError, match="symbolic link"):
        safe_io.read_text(link)
    assert temp_files(tmp_path) == []


@needs_fifo
def test_atomic_write_and_read_refuse_a_fifo_without_hanging(tmp_path):
    fifo = tmp_path / "results.json"
    os.mkfifo(fifo)
    with pytest.raises(safe_io.UnsafePathError, match="FIFO"):
        within(10, safe_io.atomic_write_text, fifo, "{}")
    with pytest.raises(safe_io.UnsafePathError, match="FIFO"):
        within(10, safe_io.read_text, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and temp_files(tmp_path) == []


@pytest.mark.parametrize("interrupt", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_temp_file_is_removed_when_a_write_fails_midway(tmp_path, interrupt):
    path = tmp_path / "report.html"
    path.write_text("old")
    with pytest.raises(type(interrupt)):
        with safe_io.atomic_writer(path) as f:
            f.write(b"half of the new")
            assert len(temp_files(tmp_path)) == 1  # the temp file exists while writing
            raise interrupt
    assert temp_files(tmp_path) == [] and path.read_text() == "old"


def test_temp_names_are_unique_and_hidden(tmp_path):
    names = {safe_io.temp_name(tmp_path / "results.json").name for _ in range(200)}
    assert len(names) == 200 and all(n.startswith(".results.json.") and n.endswith(".tmp") for n in names)


def test_one_file_mode_for_everything_written(tmp_path):
    """results.json, strips, report.html, cache entries, directions and the lock: 0o666 less the umask."""
    old = os.umask(0o027)
    try:
        run = tmp_path / "run"
        store = RunStore(run, {"model": "m"}, SETTINGS)
        store.add(result(0))
        assert stat.S_IMODE(os.stat(run / LOCK).st_mode) == 0o640
        data = store.finish()
        write_report(run, data)
        cache = ResponseCache(tmp_path / "cache")
        key = "ab" + "0" * 62
        assert cache.put(key, Response(text="The circle grows."))
        Directions(torch.ones(1, 3)).save(run / "directions.safetensors")
        files = [run / RESULTS, run / "strips" / "z0.png", run / "report.html", tmp_path / "cache" / "ab" / f"{key}.json",
                 run / "directions.safetensors"]
    finally:
        os.umask(old)
    assert {f.name: oct(stat.S_IMODE(os.stat(f).st_mode)) for f in files} == {f.name: oct(0o640) for f in files}


# -- the run directory ------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_link_at_results_json_is_refused_and_its_target_untouched(tmp_path, force):
    target = outside(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / RESULTS).symlink_to(target)
    with pytest.raises(RunStoreError, match="symbolic link"):
        RunStore(run, {}, SETTINGS, force=force)
    assert target.read_text() == SECRET and (run / RESULTS).is_symlink()
    assert not (run / LOCK).exists() and temp_files(run) == []
    RunStore(tmp_path / "elsewhere", {}, SETTINGS).release()  # the lock was released: nothing is stuck


@needs_fifo
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_fifo_at_results_json_is_a_clear_error_not_a_hang(tmp_path, force):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / RESULTS)
    with pytest.raises(RunStoreError, match="FIFO"):
        within(10, RunStore, run, {}, SETTINGS, force=force)
    assert stat.S_ISFIFO(os.lstat(run / RESULTS).st_mode)
    with pytest.raises(ValueError, match="FIFO"):
        within(10, read_results, run / RESULTS)


def test_link_at_a_strip_path_is_refused_and_its_target_untouched(tmp_path):
    target = outside(tmp_path)
    run = tmp_path / "run"
    store = RunStore(run, {}, SETTINGS)
    (run / "strips").mkdir()
    (run / "strips" / "z0.png").symlink_to(target)
    with pytest.raises(RunStoreError, match="symbolic link"):
        store.add(result(0))
    store.release()
    assert target.read_text() == SECRET
    assert read_results(run / RESULTS)["latents"] == []  # no entry names a strip that was not written
    assert temp_files(run) == []


def test_strips_folder_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    store = RunStore(run, {}, SETTINGS)
    (run / "strips").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(RunStoreError, match="symbolic link"):
        store.add(result(0))
    store.release()
    assert list(elsewhere.iterdir()) == []


def test_link_at_the_lock_is_refused_and_its_target_untouched(tmp_path):
    target = outside(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).symlink_to(target)
    with pytest.raises(RunStoreError, match="cannot lock .*symbolic link"):
        RunStore(run, {}, SETTINGS)
    assert target.read_text() == SECRET and not (run / RESULTS).exists()


def test_temp_files_are_removed_when_a_strip_write_fails(tmp_path, monkeypatch):
    from latentexplainer_plugin import store as store_mod

    class Exploding:
        def save(self, f, format):
            f.write(b"\x89PNG half")
            raise KeyboardInterrupt

    store = RunStore(tmp_path, {}, SETTINGS)
    monkeypatch.setattr(store_mod, "grid", lambda traversal: Exploding())
    with pytest.raises(KeyboardInterrupt):
        store.add(result(0))
    store.release()
    assert temp_files(tmp_path) == [] and not (tmp_path / "strips" / "z0.png").exists()


def test_link_at_report_heatmap_and_directions_is_refused(tmp_path):
    from latentexplainer_plugin.report.heatmaps import save_heatmap

    target = outside(tmp_path)
    run = tmp_path / "run"
    (run / "heatmaps").mkdir(parents=True)
    for name in ("report.html", "directions.safetensors", "heatmaps/z0.png"):
        (run / name).symlink_to(target)
    with pytest.raises(safe_io.UnsafePathError):
        write_report(run, {"latents": []})
    with pytest.raises(safe_io.UnsafePathError):
        Directions(torch.ones(1, 3)).save(run / "directions.safetensors")
    with pytest.raises(safe_io.UnsafePathError):
        save_heatmap(traversal(), run / "heatmaps" / "z0.png")
    assert target.read_text() == SECRET and temp_files(run) == []


# -- the response cache ---------------------------------------------------------------------------------


def test_link_at_a_cache_entry_is_never_followed(tmp_path):
    cache = ResponseCache(tmp_path / "cache")
    key = "cd" + "1" * 62
    planted = tmp_path / "planted.json"  # a valid cache record somewhere else
    elsewhere = ResponseCache(tmp_path / "other")
    assert elsewhere.put(key, Response(text="Injected answer."))
    planted.write_bytes((tmp_path / "other" / "cd" / f"{key}.json").read_bytes())
    (tmp_path / "cache" / "cd").mkdir(parents=True)
    entry = tmp_path / "cache" / "cd" / f"{key}.json"
    entry.symlink_to(planted)
    assert cache.get(key) is None  # not read through the link
    before = planted.read_bytes()
    with pytest.warns(Warning):
        assert cache.put(key, Response(text="The circle grows.")) is False  # refused: a warning, not a failure
    assert planted.read_bytes() == before and entry.is_symlink() and temp_files(tmp_path / "cache") == []


# -- loading and the CLI ---------------------------------------------------------------------------------


@needs_fifo
def test_fifo_where_a_model_file_should_be_is_a_clear_error(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(LoadError, match="FIFO"):
        within(10, load_weights, tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="FIFO"):
        within(10, read_config, tmp_path / "config.json")


@pytest.mark.parametrize("out", ["", "   "], ids=["empty", "blank"])
@pytest.mark.parametrize("command", [["explain", "--model", "m"], ["train-vae", "--data", "d.npz"], ["make-data"]])
def test_empty_out_is_an_error(command, out, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "empty" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written into the current directory


def test_cli_refuses_a_link_at_results_json_with_force(tiny_trained_vae, tmp_path, capsys):
    target = outside(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / RESULTS).symlink_to(target)
    code = main(["explain", "--model", str(tiny_trained_vae / "model"), "--out", str(run), "--samples", "2",
                 "--similarity", "bow", "--strengths=-2,0,2", "--latents", "0", "--force", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "Traceback" not in err
    assert target.read_text() == SECRET and not (run / "strips").exists()


# -- make-data and the evaluation harness -----------------------------------------------------------


@pytest.mark.parametrize("out_arg", ["d.npz", "d"], ids=["with-suffix", "suffix-added"])
def test_make_data_refuses_a_link_at_its_file(out_arg, tmp_path, capsys):
    target = outside(tmp_path)
    (tmp_path / "d.npz").symlink_to(target)  # where the file goes, also when numpy would add the suffix
    assert main(["make-data", "--out", str(tmp_path / out_arg), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'd.npz'} is a symbolic link" in err and "Traceback" not in err
    assert target.read_text() == SECRET and (tmp_path / "d.npz").is_symlink() and temp_files(tmp_path) == []


def test_make_data_still_writes_the_npz_numpy_would_have_written(tmp_path, capsys):
    import numpy as np

    from latentexplainer_plugin.data.shapes import make_dataset

    assert main(["make-data", "--out", str(tmp_path / "d"), "--n", "3", "--seed", "4"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'd.npz'} (3 images)"
    assert [p.name for p in tmp_path.iterdir()] == ["d.npz"]
    expected = make_dataset(3, seed=4)
    with np.load(tmp_path / "d.npz") as f:
        assert sorted(f.files) == sorted(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(f[key], value)
    assert stat.S_IMODE(os.stat(tmp_path / "d.npz").st_mode) == safe_io.FILE_MODE & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _letter_embed(texts):
    """Unit-norm letter-count vectors: a cheap stand-in for the sentence model."""
    import numpy as np

    out = np.array([[t.lower().count(ch) for ch in "abcdefghijklmnopqrstuvwxyz"] for t in texts], dtype=float) + 1e-6
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A small explained and evaluated run (random VAE, offline backend): its folder, model, data and evaluation."""
    from latentexplainer_plugin.models.conv_vae import ConvVAE, ConvVAEConfig
    from latentexplainer_plugin.data.shapes import ShapesSpec, make_dataset
    from latentexplainer_plugin.evaluation import harness
    from latentexplainer_plugin.evaluation.judge import FactorJudge

    torch.manual_seed(0)
    d = make_dataset(40, ShapesSpec(size=16), seed=2)
    data = {"images": d["images"], "factors": d["factors"][:, 3:4], "factor_names": ["scale"]}
    vae = ConvVAE(ConvVAEConfig(latent_dim=2, image_size=16, width=8, hidden=16)).eval()
    run = tmp_path_factory.mktemp("evaluated") / "run"
    ev = harness.evaluate(vae, data, run, samples=2, similarity="bow", similarities=("bow",), disentanglement=False,
                          judge=FactorJudge(["scale"], embed=_letter_embed))
    return run, vae, data, ev


@pytest.mark.parametrize("name", ["evaluation.json", "evaluation.md", "roc.png"])
def test_evaluate_run_refuses_a_link_at_any_output_and_writes_none(name, evaluated_run, tmp_path):
    import shutil

    from latentexplainer_plugin.evaluation import harness
    from latentexplainer_plugin.evaluation.judge import FactorJudge

    src, vae, data, _ = evaluated_run
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("evaluation.*", "roc.png"))
    target = outside(tmp_path)
    (run / name).symlink_to(target)
    with pytest.raises(safe_io.UnsafePathError, match="symbolic link"):
        harness.evaluate_run(run, vae, data, similarities=("bow",), disentanglement=False,
                             judge=FactorJudge(["scale"], embed=_letter_embed))
    assert target.read_text() == SECRET and (run / name).is_symlink() and temp_files(run) == []
    assert sorted(p.name for p in run.iterdir() if p.name in {"evaluation.json", "evaluation.md", "roc.png"}) == [name]


def test_write_markdown_and_write_roc_refuse_a_link_and_write_atomically(evaluated_run, tmp_path):
    from latentexplainer_plugin.evaluation import harness

    ev = evaluated_run[3]
    target = outside(tmp_path)
    for name, write in (("evaluation.md", harness.write_markdown), ("roc.png", harness.write_roc)):
        (tmp_path / name).symlink_to(target)
        with pytest.raises(safe_io.UnsafePathError, match="symbolic link"):
            write(ev, tmp_path / name)
        assert target.read_text() == SECRET and (tmp_path / name).is_symlink()
        (tmp_path / name).unlink()
        write(ev, tmp_path / name)  # a regular file (or nothing) there: written as before
    assert temp_files(tmp_path) == []
    assert (tmp_path / "evaluation.md").read_text(encoding="utf-8") == harness.markdown(ev)
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    harness.write_roc(ev, tmp_path / "roc.svg")  # the format still follows the file name, as with savefig(path)
    assert b"<svg" in (tmp_path / "roc.svg").read_bytes()[:400]


def test_cli_evaluate_refuses_a_link_at_roc_png_with_exit_2(tiny_trained_vae, tmp_path, capsys):
    target = outside(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "roc.png").symlink_to(target)
    code = main(["evaluate", "--model", str(tiny_trained_vae / "model"), "--data", str(tiny_trained_vae / "data.npz"),
                 "--out", str(run), "--samples", "2", "--similarity", "bow", "--latents", "0", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{run / 'roc.png'} is a symbolic link" in err and "Traceback" not in err
    assert target.read_text() == SECRET and not (run / "evaluation.json").exists() and temp_files(run) == []


def test_pullback_directions_file_refuses_a_link(tmp_path):
    import torch

    from latentexplainer_plugin.directions import PullbackDirections
    from latentexplainer_plugin.directions.base import Directions

    found = PullbackDirections(torch.eye(2, 3), {"finder": "pullback"}, x_vectors=torch.eye(2, 4),
                               singular_values=torch.tensor([2.0, 1.0]))
    target = tmp_path / "outside.txt"
    target.write_text(SECRET)
    link = tmp_path / "directions.safetensors"
    link.symlink_to(target)
    with pytest.raises(Exception, match="link"):
        found.save(link)
    assert target.read_text() == SECRET and link.is_symlink()
    link.unlink()
    found.save(link)
    assert torch.equal(Directions.load(link).vectors, torch.eye(2, 3))
