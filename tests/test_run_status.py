"""Run status (complete / incomplete / failed, with counts) and a resume that trusts nothing it did not check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latentexplainer_plugin.attribution import LatentExplainer
from latentexplainer_plugin.backends.base import Backend
from latentexplainer_plugin.report.html import render_report
from latentexplainer_plugin.run import explain_to_dir, summarize
from latentexplainer_plugin.store import RESULTS, RunStore, RunStoreError, entry_problems, read_results, run_status
from latentexplainer_plugin.types import Response


class Scripted(Backend):
    """Answers every latent, except those in ``fail`` (raises, as a broken server would)."""

    name = "scripted"

    def __init__(self, fail: set[str] | str = frozenset()):
        self.fail = fail
        self.calls: list[str] = []

    def explain(self, traversal, prompt, n):
        self.calls.append(traversal.latent_id)
        if self.fail == "all" or traversal.latent_id in self.fail:
            raise RuntimeError(f"server error for {traversal.latent_id}")
        return [Response(text=f"Increasing {traversal.latent_id} makes the circle grow.") for _ in range(n)]


def run(vae, out: Path, backend: Backend, **kw) -> dict:
    explainer = LatentExplainer(vae, backend=backend, samples=2, similarity="bow", strengths=[-2.0, 0.0, 2.0])
    return explain_to_dir(explainer, out, progress=False, **kw)


# -- run status -----------------------------------------------------------------------------------


def test_run_status_rules():
    ok, failed, skipped = ({"index": i, "status": s} for i, s in enumerate(("ok", "failed", "skipped")))
    assert run_status([ok]) == ("complete", {"ok": 1, "failed": 0, "skipped": 0, "missing": 0})
    assert run_status([ok, failed])[0] == "incomplete"
    assert run_status([{"index": 0, "status": "failed"}, {"index": 1, "status": "failed"}]) == (
        "failed", {"ok": 0, "failed": 2, "skipped": 0, "missing": 0})
    assert run_status([ok, skipped])[0] == "incomplete"
    assert run_status([ok], targets=[0, 1, 2]) == ("incomplete", {"ok": 1, "failed": 0, "skipped": 0, "missing": 2})
    assert run_status([], targets=[0]) == ("incomplete", {"ok": 0, "failed": 0, "skipped": 0, "missing": 1})


def test_every_latent_failing_is_status_failed_exit_1(tiny_vae, tmp_path):
    data = run(tiny_vae, tmp_path, Scripted("all"))
    assert data["status"] == "failed"
    assert data["counts"] == {"ok": 0, "failed": 4, "skipped": 0, "missing": 0}
    assert read_results(tmp_path / RESULTS)["status"] == "failed"
    text, code = summarize(data)
    assert code == 1 and "run failed: 0 ok, 4 failed" in text
    assert "<td>status</td><td>failed: 4 failed</td>" in (tmp_path / "report.html").read_text()


def test_mixed_run_is_incomplete_exit_1(tiny_vae, tmp_path):
    data = run(tiny_vae, tmp_path, Scripted({"z1"}))
    assert [e["status"] for e in data["latents"]] == ["ok", "failed", "ok", "ok"]
    assert data["status"] == "incomplete" and data["counts"] == {"ok": 3, "failed": 1, "skipped": 0, "missing": 0}
    text, code = summarize(data)
    assert code == 1 and "run incomplete: 3 ok, 1 failed" in text
    assert "<td>status</td><td>incomplete: 3 ok, 1 failed</td>" in (tmp_path / "report.html").read_text()
    # the failed latent is retried on resume; then the run is complete
    data = run(tiny_vae, tmp_path, Scripted(), resume=True)
    assert data["status"] == "complete" and data["counts"]["ok"] == 4
    assert summarize(data)[1] == 0 and "<td>status</td><td>complete</td>" in render_report(data)


def test_cli_exit_code_and_status_against_a_server_that_fails_every_request(tiny_trained_vae, tmp_path, capsys, monkeypatch):
    from loopback_server import LoopbackServer

    from latentexplainer_plugin.cli import main

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    out = tmp_path / "run"
    with LoopbackServer(answer="The circle grows.", fail_every=1) as server:
        code = main(["explain", "--model", str(tiny_trained_vae / "model"), "--backend", "openai:test-model", "--base-url", server.url,
                     "--samples", "2", "--latents", "0,1", "--similarity", "bow", "--out", str(out), "--quiet",
                     "--timeout", "5", "--max-retries", "0", "--no-cache"])
    assert code == 1
    data = read_results(out / RESULTS)
    assert data["status"] == "failed" and data["counts"] == {"ok": 0, "failed": 2, "skipped": 0, "missing": 0}
    assert "run failed" in capsys.readouterr().out


# -- resume checks every entry ------------------------------------------------------------------------


def tamper(out: Path, edit) -> None:
    path = out / RESULTS
    data = json.loads(path.read_text())
    edit({e["id"]: e for e in data["latents"]}, data)
    path.write_text(json.dumps(data))


def resume(vae, out: Path, capsys) -> tuple[dict, list[str], str]:
    backend = Scripted()
    data = run(vae, out, backend, resume=True)
    return data, backend.calls, capsys.readouterr().err


def test_resume_recomputes_entries_that_fail_their_checks(tiny_vae, tmp_path, capsys):
    first = run(tiny_vae, tmp_path, Scripted())
    assert first["status"] == "complete"

    def edit(by_id, data):
        by_id["z0"]["certainty"] = 1.7
        by_id["z1"]["responses"] = "not a list"
        (tmp_path / by_id["z2"]["strip"]).unlink()
        by_id["z3"]["clear"] = "yes"

    tamper(tmp_path, edit)
    data, calls, err = resume(tiny_vae, tmp_path, capsys)
    assert calls == ["z0", "z1", "z2", "z3"]
    assert data["status"] == "complete" and all(0.0 <= e["certainty"] <= 1.0 for e in data["latents"])
    notes = data["resume_notes"]
    assert len(notes) == 4 and all("computed again" in n for n in notes)
    assert "certainty is 1.7" in notes[0] and "responses is str" in notes[1]
    assert "strips/z2.png is missing" in notes[2] and "clear is 'yes'" in notes[3]
    assert all(n in err for n in notes)  # printed as well as recorded


def test_resume_drops_phantom_entries_with_a_note(tiny_vae, tmp_path, capsys):
    run(tiny_vae, tmp_path, Scripted())

    def edit(by_id, data):
        ghost = dict(by_id["z0"], id="z99", index=99)
        wrong_id = dict(by_id["z1"], id="zz", index=2)
        data["latents"] = [by_id["z0"], by_id["z1"], ghost, wrong_id, "junk"]

    tamper(tmp_path, edit)
    data, calls, err = resume(tiny_vae, tmp_path, capsys)
    assert calls == ["z2", "z3"]  # z0 and z1 were fine; the phantom z99 is not computed at all
    assert [e["id"] for e in data["latents"]] == ["z0", "z1", "z2", "z3"]
    notes = data["resume_notes"]
    assert any("'z99'" in n and "dropped" in n and "out of range" in n for n in notes)
    assert any("'zz'" in n and "dropped" in n for n in notes)
    assert any("latent entry 4 lacks id/index/status: dropped" in n for n in notes)
    assert "z99" in err


def test_resume_refuses_a_strip_that_is_a_link_or_outside_the_run(tiny_vae, tmp_path, capsys):
    run(tiny_vae, tmp_path / "run", Scripted())
    out = tmp_path / "run"
    strip = out / "strips" / "z0.png"
    (tmp_path / "copy.png").write_bytes(strip.read_bytes())
    strip.unlink()
    strip.symlink_to(tmp_path / "copy.png")

    def edit(by_id, data):
        by_id["z1"]["strip"] = "../copy.png"
        by_id["z2"]["strip"] = "strips/z3.png"  # another latent's strip

    tamper(out, edit)
    before = (tmp_path / "copy.png").read_bytes()
    with pytest.raises(RunStoreError, match="symbolic link"):  # z0 is recomputed, but its strip is not written through the link
        resume(tiny_vae, out, capsys)
    assert (tmp_path / "copy.png").read_bytes() == before and strip.is_symlink()
    notes = read_results(out / RESULTS)["resume_notes"]  # recorded before the latents were computed again
    assert "symbolic link" in notes[0] and "not a file under strips/" in notes[1] and "not this latent's strip" in notes[2]
    strip.unlink()  # what the error tells the user to do
    data, calls, _ = resume(tiny_vae, out, capsys)
    assert calls == ["z0", "z1", "z2"] and data["status"] == "complete"


def test_known_new_keys_are_checked_and_unknown_keys_kept(tmp_path):
    (tmp_path / "strips").mkdir()
    (tmp_path / "strips" / "z0.png").write_bytes(b"\x89PNG")
    good = {"id": "z0", "index": 0, "status": "ok", "explanation": "It grows.", "certainty": 0.8, "clear": True,
            "responses": [{"text": "It grows.", "abstained": False, "error": None, "finish_reason": "stop",
                           "usage": {"prompt_tokens": 10, "completion_tokens": 5}, "some_new_key": [1, 2]}],
            "strip": "strips/z0.png", "error": None, "timing": {"explain_s": 0.1},
            "evidence": {"change": 0.2, "ratio": None, "visible": True, "reason": "consistent change",
                         "strip_changes": [0.1, 0.3]},
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}, "kl": 1.2, "whatever": {"x": 1}}
    assert entry_problems(good, tmp_path, {0: "z0"}, 4) == []
    bad = {
        "usage": dict(good, usage={"prompt_tokens": -3}),
        "finish_reason": dict(good, responses=[dict(good["responses"][0], finish_reason=7)]),
        "response usage": dict(good, responses=[dict(good["responses"][0], usage={"completion_tokens": 1.5})]),
        "evidence": dict(good, evidence={"change": {"nested": 1}}),
        "certainty": dict(good, certainty=float("nan")),
        "explanation": dict(good, explanation=None),  # clear without an explanation
    }
    for what, entry in bad.items():
        assert entry_problems(entry, tmp_path, {0: "z0"}, 4), what
    assert entry_problems(dict(good, index=7, id="z7"), tmp_path, None, 4)[0].startswith("not a latent of this run")


def test_resume_notes_do_not_carry_over_to_a_clean_resume(tiny_vae, tmp_path, capsys):
    run(tiny_vae, tmp_path, Scripted())
    tamper(tmp_path, lambda by_id, data: by_id["z0"].update(certainty=-1))
    assert "resume_notes" in resume(tiny_vae, tmp_path, capsys)[0]
    data, calls, err = resume(tiny_vae, tmp_path, capsys)
    assert calls == [] and "resume_notes" not in data and err == ""


def test_store_without_targets_still_checks_entries(tmp_path, capsys):
    store = RunStore(tmp_path, {}, {"samples": 2})
    store.finish()
    tamper(tmp_path, lambda by_id, data: data["latents"].append(
        {"id": "z0", "index": 0, "status": "ok", "certainty": 2, "clear": False, "responses": [], "strip": None}))
    store = RunStore(tmp_path, {}, {"samples": 2}, resume=True)
    store.release()
    assert store.entries == {} and "certainty is 2" in store.header["resume_notes"][0]
