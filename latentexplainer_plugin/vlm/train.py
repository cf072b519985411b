"""Seeded trainer of the demo VLM: teacher-forced caption loss on procedural shapes.

Each example is the chat ``[user: <image> "Describe the image.", assistant: caption]`` rendered
by the processor's own chat template (so the prompt at training time is byte for byte the one
``apply_chat_template(..., add_generation_prompt=True)`` builds at generation time, in the ``hf``
backend too). The loss is the language model's cross-entropy on the caption's tokens and the
closing ``</s>`` only; the prompt and image tokens are masked out (label -100).

Everything random is seeded: the model's initial weights, the training images, the batch order.
With the same seed, steps and thread count a run gives the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.shapes import ShapesSpec, make_dataset
from .build import PROMPT, DemoVLMConfig, VLMError, build_demo_vlm, caption_messages, save_demo_vlm
from .captions import caption_from_factors

__all__ = ["VLMTrainConfig", "encode_examples", "train_demo_vlm", "train_vlm"]


@dataclass(frozen=True)
class VLMTrainConfig:
    """Training settings (defaults: the shipped demo VLM's recipe)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    n_train: int = 8000
    seed: int = 0
    threads: int = 1
    model: DemoVLMConfig = field(default_factory=DemoVLMConfig)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_train", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VLMError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise VLMError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise VLMError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise VLMError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise VLMError(f"seed must be an integer, got {self.seed!r}")


def encode_examples(processor: Any, images: np.ndarray, captions: list[str], prompt: str = PROMPT,
                    chunk: int = 256) -> dict[str, Any]:
    """Tensors for teacher forcing: ``input_ids``, ``attention_mask``, ``pixel_values`` and ``labels``
    (-100 on the prompt, the caption's ids and ``</s>`` after it)."""
    import torch
    from PIL import Image

    if len(images) != len(captions):
        raise VLMError(f"got {len(images)} images and {len(captions)} captions; give one caption per image")
    first = Image.fromarray(np.asarray(images[0]))
    head = processor.apply_chat_template(caption_messages(first, prompt), add_generation_prompt=True, tokenize=False)
    prompt_len = processor(images=[first], text=[head], return_tensors="pt")["input_ids"].shape[1]
    parts: dict[str, list] = {"input_ids": [], "attention_mask": [], "pixel_values": []}
    for start in range(0, len(images), chunk):
        pil = [Image.fromarray(np.asarray(im)) for im in images[start:start + chunk]]
        texts = [processor.apply_chat_template(caption_messages(im, prompt, cap), tokenize=False)
                 for im, cap in zip(pil, captions[start:start + chunk])]
        if not all(t.startswith(head) for t in texts):
            raise VLMError("the chat template renders the prompt differently with and without the answer; "
                           "the caption loss needs the generation prompt to be a prefix of the full chat")
        enc = processor(images=pil, text=texts, return_tensors="pt", padding=True)
        for key in ("input_ids", "attention_mask", "pixel_values"):
            parts[key].append(enc[key])
    width = max(t.shape[1] for t in parts["input_ids"])
    pad = processor.tokenizer.pad_token_id

    def right_pad(t: Any, value: int) -> Any:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    input_ids = torch.cat([right_pad(t, pad) for t in parts["input_ids"]])
    attention_mask = torch.cat([right_pad(t, 0) for t in parts["attention_mask"]])
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "pixel_values": torch.cat(parts["pixel_values"]), "labels": labels}


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_vlm(model: Any, processor: Any, images: np.ndarray, captions: list[str], cfg: VLMTrainConfig,
              progress: bool = False, log_every: int = 50) -> list[dict[str, float]]:
    """Train ``model`` in place on (image, caption) pairs; return the history (``step``, ``loss``
    averaged over the last ``log_every`` steps, ``seconds``). Sets torch's thread count to
    ``cfg.threads`` while it runs and restores it afterwards."""
    import torch
    from tqdm.auto import tqdm

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        data = encode_examples(processor, images, captions)
        n = data["input_ids"].shape[0]
        generator = torch.Generator().manual_seed(cfg.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg.warmup_steps, cfg.steps))
        model.train()
        history: list[dict[str, float]] = []
        losses: list[float] = []
        order = torch.randperm(n, generator=generator)
        cursor = 0
        start = time.perf_counter()
        bar = tqdm(range(cfg.steps), desc="train-demo-vlm", disable=not progress)
        for step in bar:
            if cursor + cfg.batch_size > n:  # a new epoch: reshuffle
                order, cursor = torch.randperm(n, generator=generator), 0
            idx = order[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            out = model(**{k: v[idx] for k, v in data.items()})
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(out.loss.detach()))
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                window = losses[-log_every:]
                history.append({"step": step + 1, "loss": float(np.mean(window)),
                                "seconds": time.perf_counter() - start})
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        model.eval()
        return history
    finally:  # a process-wide setting: never leave it changed
        torch.set_num_threads(previous_threads)


def _size_bytes(path: Path) -> dict[str, int]:
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    return {"weights": files.get("model.safetensors", 0), "total": sum(files.values())}


def train_demo_vlm(out: str | Path, steps: int = 2000, seed: int = 0, progress: bool = True,
                   n_train: int = 8000, n_eval: int = 500, threads: int = 1,
                   config: VLMTrainConfig | None = None, log_every: int = 50) -> dict[str, Any]:
    """Build, train, save and evaluate the demo VLM; return a report (JSON-ready).

    ``out`` receives the model and processor (``save_pretrained``); the report has the settings,
    the loss history (mean loss per ``log_every`` steps), training seconds (wall and CPU), sizes in
    bytes and caption accuracy per attribute on ``n_eval`` held-out images (with chance), measured
    on the model reloaded from ``out`` through ``AutoProcessor`` / ``AutoModelForImageTextToText``
    (``n_eval=0`` skips it). ``steps``, ``seed``, ``n_train`` and ``threads`` override the same
    fields of ``config`` (whose other fields, e.g. ``lr`` and ``model`` sizes, are kept).
    """
    from .build import load_demo_vlm
    from .evaluate import evaluate_demo_vlm

    if not isinstance(log_every, int) or log_every < 1:
        raise VLMError(f"log_every must be an integer >= 1, got {log_every!r}")
    if not isinstance(n_eval, int) or n_eval < 0:
        raise VLMError(f"n_eval must be an integer >= 0, got {n_eval!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VLMError(f"{out} exists and is not a directory; give a new or empty directory for the model")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise VLMError(f"{out} is a non-empty directory that is not a saved model; give a new or empty directory")
    base = config or VLMTrainConfig()
    cfg = VLMTrainConfig(**(asdict(base) | {"steps": steps, "seed": seed, "n_train": n_train, "threads": threads,
                                            "model": base.model}))
    spec = ShapesSpec()
    data = make_dataset(cfg.n_train, spec, seed=cfg.seed)
    captions = caption_from_factors(data["factors"], spec)
    model, processor = build_demo_vlm(cfg.model, seed=cfg.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    history = train_vlm(model, processor, data["images"], captions, cfg, progress=progress, log_every=log_every)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    save_demo_vlm(model, processor, out)
    report: dict[str, Any] = {
        "path": str(out),
        "config": asdict(cfg),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,  # the honest cost on a shared machine
        "history": history,
        "size_bytes": _size_bytes(out),
    }
    if n_eval:
        reloaded, reprocessor = load_demo_vlm(out)
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        try:
            report["evaluation"] = evaluate_demo_vlm(reloaded, reprocessor, n=n_eval)
        finally:
            torch.set_num_threads(previous)
    return report
