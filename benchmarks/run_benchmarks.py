"""Run every benchmark and write docs/benchmarks.md.

1. The ground-truth evaluation (``latentexplainer evaluate``) of
   * the shipped demo model (``latentexplainer_plugin/demo/weights``) on held-out demo images, and
   * a model trained here with ``latentexplainer train-vae`` on the second procedural dataset
     (``make-data --dataset shapes2``: other shapes, a tinted gradient background, other ranges),
   with the offline backend and every ``--backend`` given, both certainty measures side by side,
   and the two models pooled with thresholds held out across models (leave one model out).
2. The timing scripts beside this one (bench_traversal.py, bench_diffusion.py, bench_openai.py),
   each run as a subprocess when present.

Every figure in the written file comes with the command that produced it. The calibration file
of the user is never read (``LATENTEXPLAINER_THRESHOLDS=none``): the benchmark measures the
default thresholds, and held-out calibrated ones.

    python benchmarks/run_benchmarks.py                       # the full recipe (hours on a 2-core CPU)
    python benchmarks/run_benchmarks.py --quick               # a smoke run: small models, few steps
    python benchmarks/run_benchmarks.py --backend openai:gpt-4o --base-url ... (extra backends)

Trained models and data are kept in ``--work`` (default
``$XDG_CACHE_HOME/latentexplainer/benchmarks``, else ``~/.cache/...``) and reused when their
recipe has not changed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
TIMING_SCRIPTS = ("bench_traversal.py", "bench_diffusion.py", "bench_openai.py")
CLI = [sys.executable, "-m", "latentexplainer_plugin.cli"]


def show(cmd: list[str]) -> str:
    """The command as a user would type it (``latentexplainer`` for the CLI module)."""
    if cmd[: len(CLI)] == CLI:
        cmd = ["latentexplainer"] + cmd[len(CLI):]
    elif cmd and cmd[0] == sys.executable:
        cmd = ["python"] + cmd[1:]
    text = []
    for part in cmd:
        try:
            part = str(Path(part).resolve().relative_to(ROOT)) if ("/" in part and Path(part).is_absolute()) else part
        except ValueError:
            pass
        text.append(part)
    return shlex.join(text)


def run(cmd: list[str], log: list[dict], env: dict | None = None, check: bool = True, timeout: float | None = None) -> dict:
    started = time.perf_counter()
    print(f"$ {show(cmd)}", flush=True)
    full_env = os.environ | {"LATENTEXPLAINER_THRESHOLDS": "none"} | (env or {})
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = 124, exc.stdout or "", f"timed out after {timeout} s"
        out = out.decode() if isinstance(out, bytes) else out
    rec = {"cmd": show(cmd), "rc": rc, "seconds": round(time.perf_counter() - started, 1), "stdout": out, "stderr": err}
    log.append(rec)
    if rc != 0:
        print(err[-2000:], file=sys.stderr)
        if check:
            raise SystemExit(f"command failed ({rc}): {show(cmd)}")
    return rec


def ensure_data(path: Path, dataset: str, n: int, seed: int, log: list[dict]) -> None:
    stamp = path.with_suffix(".recipe.json")
    recipe = {"dataset": dataset, "n": n, "seed": seed}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return
    run(CLI + ["make-data", "--dataset", dataset, "--n", str(n), "--seed", str(seed), "--out", str(path)], log)
    stamp.write_text(json.dumps(recipe))


def ensure_model(out: Path, cmd: list[str], log: list[dict]) -> dict | None:
    """Train with ``cmd`` unless ``out`` holds a model made by the same command."""
    stamp = out / "recipe.json"
    if (out / "model.safetensors").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == {"cmd": show(cmd)}:
        print(f"reusing {out}")
        return None
    rec = run(cmd, log)
    stamp.write_text(json.dumps({"cmd": show(cmd)}))
    return rec


def backend_args(spec: str, args: argparse.Namespace) -> list[str]:
    extra = ["--backend", spec]
    if spec != "offline":
        for flag in ("base_url", "api_key_env", "concurrency", "timeout"):
            value = getattr(args, flag)
            if value is not None:
                extra += [f"--{flag.replace('_', '-')}", str(value)]
    return extra


def fmt(x, nd=3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, dict) and x.get("unavailable"):
        return "unavailable"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def evaluation_section(name: str, ev: dict, cmds: list[str]) -> list[str]:
    m = ev["metrics"]
    sims = ev["similarities"]
    by = m["by_similarity"]
    lines = [f"### {name}: backend `{ev['backend']['name']}`", "", "```", *cmds, "```", "",
             f"{m['n_latents']} latents, {m['n_active']} active, {m['n_aligned']} capture a factor; "
             f"{ev['n_images']} held-out images; {ev['samples']} samples per latent.", "",
             "| | " + " | ".join(f"`{s}`" for s in sims) + " |", "|---|" + "---|" * len(sims)]
    rows = [
        ("**factor_accuracy** (threshold below)", lambda b: fmt(b["factor_accuracy"])),
        ("**abstention_auroc**", lambda b: fmt(b["auroc"])),
        ("threshold (source)", lambda b: f"{b['threshold']:.3f} ({b['threshold_source']})"),
        ("abstention accuracy / balanced", lambda b: f"{fmt(b['accuracy'])} / {fmt(b['balanced_accuracy'])}"),
        ("held-out threshold, mean ± sd (leave one latent out)", lambda b: f"{fmt(b['cv']['threshold_mean'])} ± {fmt(b['cv']['threshold_std'])}"),
        ("factor accuracy at held-out threshold", lambda b: fmt(b["cv"]["factor_accuracy"])),
        ("abstention accuracy / balanced at held-out threshold", lambda b: f"{fmt(b['cv']['accuracy'])} / {fmt(b['cv']['balanced_accuracy'])}"),
        ("BLEU / ROUGE-L / CIDEr-D (kept explanations, n)", lambda b: " / ".join(fmt(b["reference_metrics"][k], 2) for k in ("bleu", "rouge_l", "cider")) + f" (n={b['reference_metrics']['n']})"),
        ("METEOR / SPICE / BERTScore", lambda b: " / ".join(fmt(b["reference_metrics"][k]) for k in ("meteor", "spice", "bertscore"))),
    ]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(by[s]) for s in sims) + " |")
    d = m.get("disentanglement") or {}
    dci = d.get("dci") if isinstance(d.get("dci"), dict) else {}
    lines += ["", f"Model: MIG {fmt(d.get('mig'))}, DCI disentanglement {fmt(dci.get('disentanglement'))} / completeness "
              f"{fmt(dci.get('completeness'))} / informativeness {fmt(dci.get('informativeness'))}, SAP {fmt(d.get('sap'))}.", "",
              "| latent | KL | captures (NMI) | certainty " + " | certainty ".join(sims) + " | explanation | right |",
              "|---|---|---|" + "---|" * len(sims) + "---|---|"]
    for e in ev["latents"]:
        fac = f"{e['factor']} ({e['factor_score']:.2f})" if e["factor"] else "none"
        text = (e["measures"][ev["similarity"]]["candidate"] if e["clear"] else "no clear explanation") or ""
        right = "" if not (e["clear"] and e["factor"]) else ("yes" if e["correct"] else "no")
        certs = " | ".join(fmt(e["measures"][s]["certainty"]) for s in sims)
        lines.append(f"| {e['id']} | {e['kl']:.2f} | {fac} | {certs} | {text.replace('|', '/')} | {right} |")
    unavailable = {k: v["reason"] for k, v in by[sims[0]]["reference_metrics"].items() if isinstance(v, dict) and v.get("unavailable")}
    if unavailable:
        lines += [""] + [f"- {k} unavailable here: {r}" for k, r in unavailable.items()]
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    cache_dir = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    p.add_argument("--work", default=str(cache_dir / "latentexplainer" / "benchmarks"),
                   help="where data, models and runs are kept (default $XDG_CACHE_HOME/latentexplainer/benchmarks)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--backend", action="append", default=[], help="an extra backend to evaluate (repeatable)")
    p.add_argument("--base-url", default=None)
    p.add_argument("--api-key-env", default=None)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--similarity", default="agree", help="the run's certainty measure (agree, embed and bow are all reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--demo-model", default=None, help="demo model directory (default: the shipped weights)")
    p.add_argument("--eval-images", type=int, default=2000, help="held-out images per dataset")
    p.add_argument("--shapes2-train-size", type=int, default=30000)
    p.add_argument("--shapes2-steps", type=int, default=6000, help="train-vae steps (the demo recipe: 6000)")
    p.add_argument("--fallback-demo-steps", type=int, default=300,
                   help="when the demo weights are missing, train-demo with this many steps into --work")
    p.add_argument("--quick", action="store_true", help="smoke run: 5000 training images, 300 steps, 1000 eval images")
    p.add_argument("--skip-timing", action="store_true", help="do not run the timing scripts")
    p.add_argument("--timing-timeout", type=float, default=1800)
    args = p.parse_args()
    if args.quick:
        args.shapes2_train_size, args.shapes2_steps, args.eval_images = 5000, 300, 1000

    sys.path.insert(0, str(ROOT))
    from latentexplainer_plugin.demo import DEMO_EVAL_SEED, WEIGHTS_DIR
    from latentexplainer_plugin.evaluation.harness import pooled_metrics

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    started = time.perf_counter()
    notes: list[str] = []

    # -- models and data --------------------------------------------------------------------
    demo_model = Path(args.demo_model) if args.demo_model else WEIGHTS_DIR
    demo_label = "demo model (shipped weights)" if not args.demo_model else f"demo model ({args.demo_model})"
    if not (demo_model / "model.safetensors").is_file():
        demo_model = work / "demo_fallback"
        ensure_model(demo_model, CLI + ["train-demo", "--out", str(demo_model), "--steps", str(args.fallback_demo_steps), "--quiet"], log)
        demo_label = f"demo recipe, {args.fallback_demo_steps} steps (fallback: shipped weights missing)"
        notes.append(f"The shipped demo weights were missing: the demo rows use `train-demo --steps {args.fallback_demo_steps}` "
                     "(the demo recipe cut short), not the shipped model.")
    demo_eval = work / f"demo_eval_{args.eval_images}.npz"
    ensure_data(demo_eval, "shapes", args.eval_images, DEMO_EVAL_SEED, log)

    s2_train = work / f"shapes2_train_{args.shapes2_train_size}.npz"
    s2_eval = work / f"shapes2_eval_{args.eval_images}.npz"
    ensure_data(s2_train, "shapes2", args.shapes2_train_size, 0, log)
    ensure_data(s2_eval, "shapes2", args.eval_images, DEMO_EVAL_SEED, log)
    s2_model = work / f"shapes2_model_{args.shapes2_steps}"
    train_cmd = CLI + ["train-vae", "--data", str(s2_train), "--out", str(s2_model), "--steps", str(args.shapes2_steps),
                       "--latents", "10", "--beta", "6", "--seed", "0", "--quiet"]
    train_rec = ensure_model(s2_model, train_cmd, log)

    # -- evaluations ------------------------------------------------------------------------
    sections: list[str] = []
    pooled_sections: list[str] = []
    for spec in ["offline"] + [b for b in args.backend if b != "offline"]:
        evs = []
        for name, model, data, label, prep in (
            ("demo", demo_model, demo_eval, demo_label,
             [show(CLI + ["make-data", "--dataset", "shapes", "--n", str(args.eval_images), "--seed", str(DEMO_EVAL_SEED), "--out", str(demo_eval)])]),
            ("shapes2", s2_model, s2_eval, f"shapes2 model (train-vae, {args.shapes2_steps} steps)",
             [show(CLI + ["make-data", "--dataset", "shapes2", "--n", str(args.shapes2_train_size), "--seed", "0", "--out", str(s2_train)]),
              show(train_cmd),
              show(CLI + ["make-data", "--dataset", "shapes2", "--n", str(args.eval_images), "--seed", str(DEMO_EVAL_SEED), "--out", str(s2_eval)])]),
        ):
            out = work / "runs" / f"{name}-{spec.replace(':', '_').replace('/', '_')}"
            cmd = CLI + ["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), "--samples", str(args.samples),
                         "--similarity", args.similarity, "--seed", str(args.seed), "--force", "--quiet"] + backend_args(spec, args)
            rec = run(cmd, log, check=False)
            if rec["rc"] not in (0, 1) or not (out / "evaluation.json").is_file():
                sections += [f"### {label}: backend `{spec}`", "", "```", rec["cmd"], "```", "",
                             f"Failed (exit {rec['rc']}): {rec['stderr'].strip()[-400:]}", ""]
                continue
            ev = json.loads((out / "evaluation.json").read_text())
            evs.append(ev)
            sections += evaluation_section(label, ev, ["LATENTEXPLAINER_THRESHOLDS=none  # the benchmark ignores user calibrations", *prep, rec["cmd"]])
            sections += [f"(evaluate took {rec['seconds']:.0f} s wall, including the explain run.)", ""]
        if len(evs) == 2:
            pooled = pooled_metrics(evs)
            pooled_sections += [f"### Both models, backend `{spec}`", "",
                                "Thresholds held out across models: each model's latents are scored with the threshold "
                                "calibrated on the other model's latents (`evaluation.harness.pooled_metrics`, computed by "
                                "this script from the two evaluation.json files above).", "",
                                "| | " + " | ".join(f"`{s}`" for s in pooled if s != "n_models") + " |",
                                "|---|" + "---|" * (len(pooled) - 1)]
            sims = [s for s in pooled if s != "n_models"]
            pooled_sections.append("| abstention AUROC (pooled) | " + " | ".join(fmt(pooled[s]["auroc"]) for s in sims) + " |")
            pooled_sections.append("| factor accuracy at the default threshold | " + " | ".join(fmt(pooled[s]["factor_accuracy"]) for s in sims) + " |")
            pooled_sections.append("| held-out thresholds (per model) | " + " | ".join(
                ", ".join(f"{fmt(v)}" for v in pooled[s]["cv"]["thresholds_per_model"].values()) for s in sims) + " |")
            pooled_sections.append("| factor accuracy at held-out threshold | " + " | ".join(fmt(pooled[s]["cv"]["factor_accuracy"]) for s in sims) + " |")
            pooled_sections.append("| abstention accuracy / balanced at held-out threshold | " + " | ".join(
                f"{fmt(pooled[s]['cv']['accuracy'])} / {fmt(pooled[s]['cv']['balanced_accuracy'])}" for s in sims) + " |")
            pooled_sections.append("")

    # -- timing scripts ---------------------------------------------------------------------
    timing: list[str] = []
    if args.skip_timing:
        timing.append("Not run (`--skip-timing`).")
    for script in () if args.skip_timing else TIMING_SCRIPTS:
        path = HERE / script
        if not path.is_file():
            timing += [f"### {script}", "", "Not present in this checkout.", ""]
            continue
        rec = run([sys.executable, str(path)], log, check=False, timeout=args.timing_timeout)
        body = (rec["stdout"].strip() or "(no output)")
        if rec["rc"] != 0:
            body += f"\n\n[exit {rec['rc']}] {rec['stderr'].strip()[-600:]}"
        timing += [f"### {script}", "", "```", f"$ {rec['cmd']}", body, "```", f"({rec['seconds']:.0f} s wall)", ""]

    # -- write ------------------------------------------------------------------------------
    import torch

    total = time.perf_counter() - started
    head = [
        "# Benchmarks", "",
        f"Written by `{show([sys.executable, str(Path(__file__))] + sys.argv[1:])}` on "
        f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} "
        f"({platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}); "
        f"{total / 60:.1f} min in all.", "",
        "What the metrics mean, and why every threshold that is scored is held out: [evaluation.md](evaluation.md).", "",
    ]
    if train_rec is not None:
        notes.append(f"Training the shapes2 model took {train_rec['seconds'] / 60:.1f} min.")
    if args.quick:
        notes.append("`--quick`: small training sets and few steps; the numbers show that the pipeline runs, not what "
                     "the full recipe reaches.")
    body = head + ([f"- {n}" for n in notes] + [""] if notes else []) + [
        "## Ground-truth evaluation of explanations", "",
        "`factor_accuracy`: share of active, factor-aligned latents whose explanation is clear and names the "
        "factor they capture (judged by MiniLM similarity to factor descriptions). `abstention_auroc`: certainty as a "
        "detector of latents that capture a factor. Both certainty measures are computed from the same answers.", "",
        *sections, "## Across models", "", *(pooled_sections or ["Needs both models evaluated.", ""]),
        "## Timing", "", *timing,
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(body).rstrip() + "\n", encoding="utf-8")
    (work / "benchmark_log.json").write_text(json.dumps(log, indent=2))
    print(f"wrote {out} ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
