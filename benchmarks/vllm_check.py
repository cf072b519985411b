"""Helpers of ``benchmarks/check_vllm.sh`` (opt-in end-to-end check against a real vLLM server).

Only the standard library at import time, so each subcommand runs with whichever Python needs it:

* ``patch-torchvision SITE_PACKAGES``: guard torchvision's two unguarded fake-op registrations
  (``torchvision::nms``, ``torchvision::qnms``) so the CUDA build of torchvision imports next to
  CPU torch (idempotent; run with the vLLM venv's python).
* ``build-model DIR``: a tiny random LLaVA (CLIP vision tower + Llama, head_dim 32) with a
  WordLevel tokenizer, an image processor and a chat template, saved so vLLM loads it (run with
  the vLLM venv's python, so transformers matches the server's).
* ``free-port``: print a free TCP port on 127.0.0.1.
* ``wait-ready URL DEADLINE_S PID``: poll ``URL/models`` until it answers 200, the server process
  ``PID`` exits, or the deadline passes (exit 0 / 1).
* ``count-requests LOG OFFSET``: chat-completions requests (all, then by status) logged by the
  server after byte OFFSET, as JSON.
* ``metrics URL``: the server's own token counters (``vllm:prompt_tokens_total``,
  ``vllm:generation_tokens_total`` from ``/metrics``), as JSON.
* ``check-run RUN_DIR ...``: assertions on a run's ``results.json`` (see :func:`check_run`).
* ``check-usage RUN_DIR BEFORE AFTER REQUESTS``: the token totals in ``results.json`` against the
  server's counters (BEFORE/AFTER: ``metrics`` output) and its access log (see :func:`check_usage`).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# Vocabulary of the tiny model: words of an explanation, so random answers look like one.
WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", "the", "object", "moves", "left",
         "right", "up", "down", "grows", "shrinks", "colour", "changes", "red", "blue", "image", "latent",
         "z0", "z1", "z2", "square", "circle", "rotates", "size", "position", "shape", "brightness"]
# vLLM renders the chat with parts: {'type': 'text', 'text': ...} and {'type': 'image'}.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% for c in parts %}{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_GUARD = "(lambda fn: fn)"


def patch_torchvision(site_packages: str) -> int:
    """Guard ``@torch.library.register_fake("torchvision::nms"|"qnms")``; returns how many lines changed."""
    path = Path(site_packages) / "torchvision" / "_meta_registrations.py"
    if not path.is_file():
        raise SystemExit(f"patch-torchvision: {path} not found (is torchvision installed in that venv?)")
    text = path.read_text()
    changed = 0
    for op in ("nms", "qnms"):
        plain = f'@torch.library.register_fake("torchvision::{op}")\n'
        guarded = (f'@(torch.library.register_fake("torchvision::{op}") '
                   f"if torchvision.extension._has_ops() else {_GUARD})\n")
        if guarded in text:
            continue
        if plain not in text:
            raise SystemExit(f"patch-torchvision: neither the original nor the guarded {op} registration is in {path}")
        text = text.replace(plain, guarded)
        changed += 1
    if changed:
        path.write_text(text)
    return changed


def _shape_stopping(model, eos: int, after: int, never: list[int], eos_logit: float = 2.1) -> None:
    """Make a random model's answers non-empty and short, so no sample fails by chance.

    Random weights stop at random: an end-of-sequence first token is an empty (failed) answer and
    an answer that never stops is truncated (also failed). Two residual dimensions carry flags
    that no layer writes to: dim 0 is 1 on every token but ``after`` (the generation prompt's last
    token), dim 1 is 1 on ``after`` only. The end-of-sequence logit reads them: very negative right
    after ``after`` (never an empty answer), about +2 elsewhere (P(stop) about 0.2 per token).
    The tokens in ``never`` (special tokens, chat roles) are never sampled: an answer of special
    tokens decodes to nothing.
    """
    import torch

    lm = model.model.language_model
    with torch.no_grad():
        emb = lm.embed_tokens.weight
        emb[:, 0:2] = 0.0
        emb[:, 0] = 1.0
        emb[after, 0], emb[after, 1] = 0.0, 1.0
        for layer in lm.layers:  # nothing writes to the flag dimensions
            layer.self_attn.o_proj.weight[0:2, :] = 0.0
            layer.mlp.down_proj.weight[0:2, :] = 0.0
        # after RMSNorm a flag of 1 among ~0.02 noise is about sqrt(hidden) = 8
        scale = emb.shape[1] ** 0.5
        head = model.lm_head.weight
        head[:, 0:2] = 0.0
        head[eos, :] = 0.0
        head[eos, 0] = eos_logit / scale
        head[eos, 1] = -50.0 / scale
        for token in never:
            head[token, :] = 0.0
            head[token, 0:2] = -50.0 / scale


def build_model(path: str) -> None:
    """Save a tiny random LLaVA and its processor to ``path`` in the layout vLLM's loader reads."""
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_llava import tiny_llava

    out = Path(path)
    # vLLM's CPU attention needs head_dim >= 32: hidden 64 with 2 heads.
    model, processor = tiny_llava(WORDS, CHAT_TEMPLATE, hidden=64, tie_word_embeddings=False)
    _shape_stopping(model, eos=WORDS.index("</s>"), after=WORDS.index("ASSISTANT:"),
                    never=[WORDS.index(w) for w in ("<pad>", "<unk>", "<s>", "<image>", "USER:", "ASSISTANT:")])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # transformers 5 saves the CLIP tower as vision_tower.embeddings...; vLLM wants vision_tower.vision_model...
    renamed = 0
    for file in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(file))
        fixed = {}
        for key, value in tensors.items():
            new = re.sub(r"(^|\.)vision_tower\.(?!vision_model\.)", r"\1vision_tower.vision_model.", key)
            renamed += new != key
            fixed[new] = value
        if renamed:
            save_file(fixed, str(file), metadata={"format": "pt"})
    print(f"tiny LLaVA saved to {out} ({sum(p.numel() for p in model.parameters())} parameters, "
          f"{renamed} vision-tower tensors renamed to vision_tower.vision_model.*)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return True


def wait_ready(base_url: str, deadline_s: float, pid: int) -> bool:
    """Poll ``base_url/models`` until 200; False when the deadline passes or the server exits."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if pid and not _alive(pid):
            print(f"server process {pid} exited before it was ready", file=sys.stderr)
            return False
        try:
            with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=5) as reply:
                if reply.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    print(f"server at {base_url} not ready after {deadline_s:g} s", file=sys.stderr)
    return False


_ACCESS = re.compile(r'"POST /v1/chat/completions HTTP/[0-9.]+" (\d{3})')


def count_requests(log: str, offset: int) -> dict:
    """Chat-completions requests in the server's access log after byte ``offset``, by status."""
    with open(log, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    by_status: dict[str, int] = {}
    for match in _ACCESS.finditer(text):
        by_status[match.group(1)] = by_status.get(match.group(1), 0) + 1
    return {"total": sum(by_status.values()), "by_status": by_status}


def server_metrics(base_url: str) -> dict:
    """vLLM's cumulative prompt and generated token counters (summed over label sets)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    with urllib.request.urlopen(root + "/metrics", timeout=10) as reply:
        text = reply.read().decode("utf-8", "replace")
    out = {"prompt_tokens": 0, "completion_tokens": 0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = {"vllm:prompt_tokens_total": "prompt_tokens", "vllm:generation_tokens_total": "completion_tokens"}.get(name)
        if key:
            out[key] += int(float(line.rsplit(" ", 1)[1]))
    return out


def check_usage(run: str, before: dict, after: dict, requests: int) -> tuple[list[str], str]:
    """Token totals of ``results.json`` against the server's counters; (problems, summary).

    Completion tokens must equal what the server generated during the run; requests must equal the
    requests in the server's access log; the per-latent usage must add up to the run's. The server
    counts the prompt once per sample of an n-request, the API's ``usage`` once per request, so the
    prompt tokens are reported, not compared.
    """
    data = json.loads((Path(run) / "results.json").read_text())
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return [f"results.json has no usage totals (keys: {sorted(data)})"], ""
    generated = after["completion_tokens"] - before["completion_tokens"]
    prefilled = after["prompt_tokens"] - before["prompt_tokens"]
    problems = []
    if usage.get("completion_tokens") != generated:
        problems.append(f"completion_tokens {usage.get('completion_tokens')} in results.json, the server generated {generated}")
    if usage.get("requests") != requests:
        problems.append(f"requests {usage.get('requests')} in results.json, the server logged {requests}")
    if not usage.get("prompt_tokens"):
        problems.append("no prompt_tokens in results.json")
    per_latent = [e.get("usage") or {} for e in data.get("latents", [])]
    for key in ("prompt_tokens", "completion_tokens", "requests"):
        total = sum(u.get(key, 0) for u in per_latent)
        if total != usage.get(key):
            problems.append(f"per-latent {key} add up to {total}, the run says {usage.get(key)}")
    summary = (f"results.json: {usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens "
               f"in {usage.get('requests')} requests; server: {generated} generated ({prefilled} prompt tokens "
               f"prefilled, one prompt per sample), {requests} requests logged")
    return problems, summary


def check_run(run: str, *, latents: int | None, all_ok: bool, samples: int | None, status: str | None,
              not_status: str | None, prompt_source: str | None) -> list[str]:
    """What is wrong with ``run/results.json`` (empty list: nothing)."""
    path = Path(run) / "results.json"
    if not path.is_file():
        return [f"{path} does not exist"]
    data = json.loads(path.read_text())
    problems = []
    entries = data.get("latents", [])
    if latents is not None and len(entries) != latents:
        problems.append(f"{len(entries)} latents in results.json, expected {latents}")
    if all_ok:
        bad = [f"{e.get('id')}={e.get('status')} ({e.get('error')})" for e in entries if e.get("status") != "ok"]
        if bad:
            problems.append("latents not ok: " + "; ".join(bad[:5]))
    if samples is not None:
        wrong = [f"{e.get('id')}: {len(e.get('responses', []))}" for e in entries
                 if e.get("status") == "ok" and len(e.get("responses", [])) != samples]
        if wrong:
            problems.append(f"latents without {samples} responses: " + ", ".join(wrong[:5]))
        answered = [e for e in entries if e.get("status") == "ok"
                    and not any(r.get("text") for r in e.get("responses", []))]
        if answered:
            problems.append(f"{len(answered)} ok latents have no answer text")
    if status is not None and data.get("status") != status:
        problems.append(f"run status {data.get('status')!r}, expected {status!r}")
    if not_status is not None and data.get("status") == not_status:
        problems.append(f"run status is {not_status!r}")
    if prompt_source is not None:
        found = json.dumps(data).count(f'"{prompt_source}"')
        if not found:
            problems.append(f"template source {prompt_source!r} not recorded in results.json")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("patch-torchvision").add_argument("site_packages")
    sub.add_parser("build-model").add_argument("dir")
    sub.add_parser("free-port")
    p = sub.add_parser("wait-ready")
    p.add_argument("url")
    p.add_argument("deadline_s", type=float)
    p.add_argument("pid", type=int)
    p = sub.add_parser("count-requests")
    p.add_argument("log")
    p.add_argument("offset", type=int)
    sub.add_parser("metrics").add_argument("url")
    p = sub.add_parser("check-usage")
    p.add_argument("run")
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("requests", type=int)
    p = sub.add_parser("check-run")
    p.add_argument("run")
    p.add_argument("--latents", type=int)
    p.add_argument("--all-ok", action="store_true")
    p.add_argument("--samples", type=int)
    p.add_argument("--status")
    p.add_argument("--not-status")
    p.add_argument("--prompt-source")
    args = parser.parse_args(argv)
    if args.cmd == "patch-torchvision":
        changed = patch_torchvision(args.site_packages)
        print(f"torchvision fake-op registrations guarded ({changed} changed now)")
    elif args.cmd == "build-model":
        build_model(args.dir)
    elif args.cmd == "free-port":
        print(free_port())
    elif args.cmd == "wait-ready":
        return 0 if wait_ready(args.url, args.deadline_s, args.pid) else 1
    elif args.cmd == "count-requests":
        print(json.dumps(count_requests(args.log, args.offset)))
    elif args.cmd == "metrics":
        print(json.dumps(server_metrics(args.url)))
    elif args.cmd == "check-usage":
        problems, summary = check_usage(args.run, json.loads(args.before), json.loads(args.after), args.requests)
        print("; ".join(problems + [summary]))
        return 1 if problems else 0
    elif args.cmd == "check-run":
        problems = check_run(args.run, latents=args.latents, all_ok=args.all_ok, samples=args.samples,
                             status=args.status, not_status=args.not_status, prompt_source=args.prompt_source)
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
