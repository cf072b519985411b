"""Caption accuracy of the demo VLM per attribute, on held-out shapes images.

Captions are generated greedily through ``model.generate`` from the processor's chat template
(the prompt the model was trained on), parsed back to one word per attribute
(:func:`.captions.parse_caption`) and compared with the words of the factors that rendered each
image. Chance is the accuracy of always answering the most frequent true word of the held-out set
(at least ``1 / number of words``, more where the words' bins have unequal shares, as colour does).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data.shapes import ShapesSpec, make_dataset
from .build import PROMPT, caption_messages
from .captions import ATTRIBUTES, caption_from_words, factor_words, parse_caption

__all__ = ["HELD_OUT_SEED", "caption_accuracy", "evaluate_demo_vlm", "generate_captions"]

#: Seed of the held-out images (the trainer draws its images with the run's own seed, far from this).
HELD_OUT_SEED = 7_000_001
#: Joint scores: ``position`` (both position words right), ``all`` (every attribute right).
JOINT = {"position": ("vertical", "horizontal"), "all": tuple(ATTRIBUTES)}


def generate_captions(model: Any, processor: Any, images: np.ndarray | Sequence[Any], prompt: str = PROMPT,
                      batch_size: int = 64, max_new_tokens: int | None = None) -> list[str]:
    """Greedy captions for ``images`` (uint8 ``(N, H, W, 3)`` or PIL images), one ``generate`` call per batch."""
    import torch
    from PIL import Image

    pil = [Image.fromarray(np.asarray(im)) if not hasattr(im, "convert") else im.convert("RGB") for im in images]
    if not pil:
        return []
    text = processor.apply_chat_template(caption_messages(pil[0], prompt), add_generation_prompt=True, tokenize=False)
    tokenizer = processor.tokenizer
    out: list[str] = []
    for start in range(0, len(pil), batch_size):
        chunk = pil[start:start + batch_size]
        # every chat has the same text, so the batch needs no padding
        inputs = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt")
        with torch.inference_mode():
            ids = model.generate(**inputs, do_sample=False,
                                 max_new_tokens=max_new_tokens or model.generation_config.max_new_tokens or 16)
        out += tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [c.strip() for c in out]


def caption_accuracy(captions: Sequence[str], factors: np.ndarray, spec: ShapesSpec = ShapesSpec()) -> dict[str, dict]:
    """Per attribute (and ``position`` / ``all`` jointly): ``accuracy``, ``chance`` (most frequent
    true word's share), ``uniform`` (1 / number of words), ``unparsed`` (share of captions naming
    no single word of it) and ``n``."""
    truth = factor_words(factors, spec)
    if len(captions) != len(truth):
        raise ValueError(f"got {len(captions)} captions for {len(truth)} factor rows; give one caption per row")
    if not truth:
        raise ValueError("caption_accuracy needs at least one caption")
    parsed = [parse_caption(c) for c in captions]
    n = len(truth)
    report: dict[str, dict] = {}
    groups = {a: (a,) for a in ATTRIBUTES} | JOINT
    for name, attributes in groups.items():
        true_keys = [tuple(t[a] for a in attributes) for t in truth]
        got_keys = [tuple(p[a] for a in attributes) for p in parsed]
        correct = sum(t == g for t, g in zip(true_keys, got_keys))
        uniform = 1.0 / float(np.prod([len(ATTRIBUTES[a]) for a in attributes]))
        report[name] = {
            "accuracy": correct / n,
            "chance": Counter(true_keys).most_common(1)[0][1] / n,
            "uniform": uniform,
            "unparsed": sum(any(w is None for w in g) for g in got_keys) / n,
            "n": n,
        }
    return report


def evaluate_demo_vlm(model: Any, processor: Any, n: int = 500, seed: int = HELD_OUT_SEED,
                      spec: ShapesSpec = ShapesSpec()) -> dict[str, Any]:
    """Caption ``n`` held-out images (drawn with ``seed``) and score them: ``{"accuracy": ...,
    "examples": [{"caption", "truth"} x 5]}``."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (held-out images) must be an integer >= 1, got {n!r}")
    data = make_dataset(n, spec, seed=seed)
    captions = generate_captions(model, processor, data["images"])
    truth = factor_words(data["factors"][:5], spec)
    return {
        "accuracy": caption_accuracy(captions, data["factors"], spec),
        "held_out": {"n": n, "seed": seed},
        "examples": [{"caption": c, "truth": caption_from_words(t)} for c, t in zip(captions[:5], truth)],
    }
