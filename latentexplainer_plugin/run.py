"""Explain a model into a run directory: results.json (incremental), strips/*.png, report.html."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .attribution import LatentExplainer, most_active_other
from .backends.base import FatalBackendError
from .models.statistics import KL_ACTIVE, LatentStats, latent_stats  # noqa: F401 (re-exported)
from .report.html import write_report
from .results import total_usage
from .store import RunStore, RunStoreError

def _runs_latents_concurrently(backend: Any) -> bool:
    """True for backends that explain a round's latents in parallel (network backends)."""
    from .backends.base import Backend

    for _ in range(5):  # wrappers (the response cache) keep the real backend in .backend
        inner = getattr(backend, "backend", None)
        if not isinstance(inner, Backend):
            break
        backend = inner
    return type(backend).explain_many is not Backend.explain_many and getattr(backend, "concurrency", 2) > 1


def _run_usage(store: RunStore, explainer: LatentExplainer) -> dict[str, int]:
    """Tokens of every latent in the store (its steering answers and, for SAE features given a
    dataset, its example-set answers), plus the prompt-template request of this invocation
    (``--prompt-from-llm``), which belongs to no latent."""
    entries = list(store.entries.values())
    total = total_usage(entries + [e["examples"] for e in entries if isinstance(e, dict) and isinstance(e.get("examples"), dict)])
    template = (getattr(explainer.bias, "extra", None) or {}).get("template_usage") or {}
    for key in total:
        value = template.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            total[key] += value
    return total


def explain_to_dir(explainer: LatentExplainer, out_dir: str | Path, *, target: Any = None, stats: LatentStats | None = None,
                   header: dict[str, Any] | None = None, resume: bool = False, force: bool = False,
                   progress: bool = True, chunk_size: int | None = None, extras: Any = None) -> dict[str, Any]:
    """Run ``explainer`` over ``target`` latents, writing each result as soon as it is done.

    Returns the final results.json content. Latents already finished (``resume``) are skipped:
    neither traversed nor sent to the backend again. ``header["model"]`` and ``header["data"]``
    (when given) are part of the run's settings, so a resume with another model is refused.

    ``chunk_size``: latents per round (a round is decoded in one batch, then explained, then each
    of its latents is written). None: 1 for backends that explain one latent after another (the
    offline one): every latent is on disk the moment it is done. For backends that explain a
    round's latents concurrently (OpenAI-compatible), the explainer's own ``chunk_size``: an
    interruption then loses at most the latents of the round in flight.
    """
    from tqdm.auto import tqdm

    info = explainer.describe()
    header = {"model": None} | (header or {}) | {"adapter": info["adapter"], "backend": info["backend"], "bias": info["bias"]}
    settings = {k: info[k] for k in ("bias", "samples", "similarity", "threshold", "strengths", "seed")} | {
        "threshold_source": info.get("threshold_source")} | {
        "adapter": info["adapter"], "backend": info["backend"], "model": header.get("model")}
    if header.get("data") is not None:
        settings["data"] = header["data"]
    if chunk_size is None:
        chunk_size = explainer.chunk_size if _runs_latents_concurrently(explainer.backend) else 1
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    targets = explainer.resolve_targets(target)  # bad targets fail before the run directory is touched
    store = RunStore(out_dir, header, settings, resume=resume, force=force,  # resumed entries are checked against these
                     targets={i: explainer.adapter.latent_id(i) for i in targets}, n_latents=explainer.adapter.n_latents)
    started = time.perf_counter()
    saved_chunk = explainer.chunk_size
    explainer.chunk_size = chunk_size
    try:
        done = {e["index"] for e in store.entries.values()}
        bar = tqdm(total=len(targets), initial=len(done & set(targets)), desc="explain", disable=not progress, unit="latent")

        def on_result(result) -> None:
            extra = stats.extras(result.index) if stats is not None else {}
            if extras is not None:  # extras(result) -> dict: a ranking's attribution/rank, a heat map
                try:
                    extra = extra | extras(result)
                except OSError as exc:  # e.g. disk full while writing a heat map
                    raise store.write_error(Path(out_dir) / "heatmaps", exc) from exc
            store.add(result, extra or None)
            bar.update(1)

        if stats is not None and explainer.bias.rows > 1 and explainer.clamp is None:
            explainer.clamp = most_active_other(stats.kl)
        for result in explainer.iter_results(target=targets, skip=sorted(done)):
            on_result(result)
        bar.close()
        store.header["elapsed_s"] = round(time.perf_counter() - started, 3)
        store.header["usage"] = _run_usage(store, explainer)
        data = store.finish()  # complete, incomplete or failed, from the entries
    except FatalBackendError as exc:  # every further request would fail the same way: keep what finished
        try:
            store.header["usage"] = _run_usage(store, explainer)
            store.header["stopped"] = str(exc)
            store.finish()
        except Exception:
            store.release()
        raise
    except KeyboardInterrupt:
        try:
            store.header["usage"] = _run_usage(store, explainer)
            store.finish("interrupted")
        except Exception:  # e.g. disk full: the last good results.json stays; the interrupt wins
            store.release()
        raise
    except BaseException:
        store.release()
        raise
    finally:
        explainer.chunk_size = saved_chunk
    try:
        write_report(out_dir, data)
    except OSError as exc:
        raise RunStoreError(
            f"results.json is complete, but report.html could not be written ({exc.strerror or exc}); "
            "free some space and run again with resume=True to write it"
        ) from exc
    return data


def summarize(data: dict[str, Any]) -> tuple[str, int]:
    """A one-screen summary of a run and the exit code: 0 when the run is complete (every latent
    ok), 1 when any latent failed or is missing (status ``incomplete`` or ``failed``)."""
    lines = []
    failed = 0
    for e in data["latents"]:
        cert = "" if e.get("certainty") is None else f"[{e['certainty']:.2f}] "
        factor = e.get("factor") or {}
        extra = f"  (KL {e['kl']:.2f}{', ' + factor['name'] if factor.get('name') else ''})" if "kl" in e else ""
        if e["status"] == "failed":
            failed += 1
            lines.append(f"{e['id']:>6}: FAILED {e.get('error')}")
        else:
            lines.append(f"{e['id']:>6}: {cert}{e['explanation'] if e.get('clear') else 'no clear explanation'}{extra}")
        ex = e.get("examples")
        if isinstance(ex, dict):  # an SAE feature's second evidence: the images where it fires
            if ex.get("status") == "ok":
                ex_cert = "" if ex.get("certainty") is None else f"[{ex['certainty']:.2f}] "
                lines.append(f"{'':>6}  examples: {ex_cert}{ex['explanation'] if ex.get('clear') else 'no clear explanation'}")
            else:
                lines.append(f"{'':>6}  examples: FAILED {ex.get('error')}")
    status, counts = data.get("status"), data.get("counts") or {}
    if failed:
        lines.append(f"{failed} of {len(data['latents'])} latents failed; see results.json for the errors.")
    if status in ("incomplete", "failed"):
        lines.append(f"run {status}: {counts.get('ok', 0)} ok, {counts.get('failed', failed)} failed, "
                     f"{counts.get('skipped', 0)} skipped, {counts.get('missing', 0)} missing")
    return "\n".join(lines), (1 if failed or status in ("incomplete", "failed") else 0)
