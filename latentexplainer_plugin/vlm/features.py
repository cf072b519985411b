"""SAE features of a VLM's language model at the image-token positions, with ground truth.

The recipe of arXiv 2411.14982 on the demo VLM, where the renderer knows every image's attributes
and object mask:

1. Collect the output of one decoder layer at the image-token positions over training images
   (:func:`.activations.collect_image_token_activations`; 8 x 8 tokens per demo image).
2. Train a TopK SAE on them (:func:`latentexplainer_plugin.sae.train_sae`, sparsify) and report
   FVU, L0, dead and dense features on the training rows.
3. On held-out images (with object masks): each feature's activation per image is the mean over
   the image tokens (as in 2411.14982). A feature **follows** the attribute (size, colour, shape,
   vertical, horizontal, background) with the largest correlation ratio eta^2 of its per-image
   activation against the attribute's words, when that eta^2 reaches ``follow_eta2``.
4. Where it fires: IoU of each feature's activation masks on its top images against the object masks
   (:func:`latentexplainer_plugin.sae.examples.feature_iou`), and its mean activation on object
   patches vs background patches (:func:`feature_region_means`).
5. Steering (2411.14982 clamps a feature): feature k is set to ``steer_multiple`` x its max at every
   image token of the layer, keeping the SAE's error (``h' = h + (a - f_k(h)) d_k``), while the VLM
   captions ``steer_images`` images; per attribute, the share of captions whose word changed.

6. Explanation from examples: the feature's example set (top and quantile images with their
   activation maps, and images where it never fires) goes to a backend's ``explain_examples``
   (default: the offline contrastive explainer), ``n`` answers, certainty as for every latent. A
   clear explanation **names the followed attribute** when one of its claims is about it.
7. The VLM explains its own features (an LMM explaining an LMM, ``self_explain``): the same example
   sets go to the ``hf`` backend in ``caption_compare`` mode wrapping the VLM itself, which captions
   every firing and non-firing image and names the caption word over-represented where the feature
   fires (:func:`latentexplainer_plugin.backends.hf.contrast_captions`), in the claim vocabulary of
   the offline answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VLMError
from .activations import collect_image_token_activations, language_layer_path
from .captions import ATTRIBUTES, factor_words, parse_caption
from .lens import image_inputs, image_token_id, language_model, patch_labels

#: Claim attribute (uncertainty.claims' vocabulary) -> caption attribute.
CAPTION_ATTRIBUTE_OF_CLAIM = {"horizontal_position": "horizontal", "vertical_position": "vertical", "size": "size",
                              "colour": "colour", "background_brightness": "background", "shape": "shape"}

__all__ = ["CAPTION_ATTRIBUTE_OF_CLAIM", "caption_changes", "correlation_ratio", "feature_image_means", "feature_region_means", "followed_attribute",
           "steer_captions",
           "steering_hook", "train_vlm_sae", "vlm_sae_features"]


def correlation_ratio(values: np.ndarray, labels: Sequence[str]) -> float:
    """eta^2: the share of the variance of ``values`` explained by the group means of ``labels``
    (0: the groups do not differ; 1: each group is constant). 0 when ``values`` is constant."""
    v = np.asarray(values, dtype=np.float64)
    total = float(((v - v.mean()) ** 2).sum())
    if total <= 1e-12:
        return 0.0
    lab = np.asarray(labels)
    between = sum(float((lab == g).sum()) * (float(v[lab == g].mean()) - float(v.mean())) ** 2 for g in np.unique(lab))
    return between / total


def followed_attribute(values: np.ndarray, words: Sequence[dict[str, str]], follow_eta2: float) -> tuple[str | None, dict[str, float]]:
    """The attribute whose words explain most of a feature's per-image activation (eta^2 per attribute),
    or None when the best eta^2 is below ``follow_eta2``."""
    eta = {a: correlation_ratio(values, [w[a] for w in words]) for a in ATTRIBUTES}
    best = max(eta, key=eta.get)
    return (best if eta[best] >= follow_eta2 else None), eta


@torch.no_grad()
def feature_region_means(sae: Any, store: Any, regions: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Each feature's mean activation over the positions of each region: ``regions[name]`` is an
    ``(items, positions)`` bool array (e.g. object and background patches); returns ``(d_sae,)`` per name."""
    from ..sae.collect import ActivationStore

    store = ActivationStore(store) if not isinstance(store, ActivationStore) else store
    masks = {name: torch.as_tensor(np.asarray(m, dtype=bool)) for name, m in regions.items()}
    sums = {name: torch.zeros(int(sae.d_sae)) for name in masks}
    counts = {name: 0 for name in masks}
    for part in store.iter_shards(("activations", "item", "position")):
        f = sae.encode(part["activations"].float()).float()
        for name, m in masks.items():
            inside = m[part["item"], part["position"]]
            sums[name] += f[inside].sum(0)
            counts[name] += int(inside.sum())
    return {name: sums[name] / max(counts[name], 1) for name in masks}


@torch.no_grad()
def feature_image_means(sae: Any, store: Any) -> torch.Tensor:
    """``(items, d_sae)``: each feature's mean activation over each item's positions, streamed shard by shard."""
    from ..sae.collect import ActivationStore

    store = ActivationStore(store) if not isinstance(store, ActivationStore) else store
    sums = torch.zeros(store.manifest.n_items, int(sae.d_sae))
    counts = torch.zeros(store.manifest.n_items)
    for part in store.iter_shards(("activations", "item")):
        f = sae.encode(part["activations"].float()).float()
        sums.index_add_(0, part["item"], f)
        counts.index_add_(0, part["item"], torch.ones(len(f)))
    return sums / counts.clamp_min(1)[:, None]


def train_vlm_sae(model: Any, processor: Any, images: np.ndarray, layer: int, work_dir: str | Path, *, d_sae: int = 128,
                  k: int = 4, steps: int = 600, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Collect layer ``layer`` at the image tokens of ``images`` into ``work_dir/train`` and train a
    TopK SAE there (written to ``work_dir/sae`` in SAELens layout). Returns the SAE and its report."""
    from ..sae.train import train_sae

    work = Path(work_dir)
    collect_image_token_activations(model, processor, images, layer, work / "train")
    sae, report = train_sae(work / "train", d_sae=d_sae, k=k, steps=steps, seed=seed, out_dir=work / "sae",
                            site=f"layer {layer} at image tokens", batch_size=min(4096, len(images) * 64))
    return sae, report.as_dict()


def steering_hook(sae: Any, feature: int, target: float, positions: torch.Tensor) -> Any:
    """A forward hook for a decoder layer that sets SAE feature ``feature`` to ``target`` at the
    ``positions`` (a (B, T) bool mask of the prompt) of the layer's output, keeping the SAE's error:
    ``h' = h + (target - f_k(h)) d_k``. Calls whose length differs from T (generation steps) pass through."""
    if not math.isfinite(target):
        raise VLMError(f"target must be a finite activation, got {target}")
    if not 0 <= feature < int(sae.d_sae):
        raise VLMError(f"feature {feature} is out of range; the SAE has features 0..{int(sae.d_sae) - 1}")
    direction = sae.decoder_directions()[feature]

    def hook(_module: Any, _args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[:2] != positions.shape:  # a generation step: no image tokens in it
            return output
        picked = h[positions]  # (B * P, D)
        current = sae.feature_activation(picked, torch.full((len(picked),), feature, dtype=torch.long))
        edited = h.clone()
        edited[positions] = picked + ((target - current)[:, None] * direction).to(h.dtype)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    return hook


def steer_captions(model: Any, processor: Any, sae: Any, layer: int, feature: int, target: float,
                   images: Sequence[Any], max_new_tokens: int = 16) -> list[str]:
    """Greedy captions of ``images`` with SAE feature ``feature`` set to ``target`` at every image token
    of decoder layer ``layer`` (:func:`steering_hook`). The edit applies to the prompt's forward pass;
    generated tokens read the edited image tokens from the cache."""
    inputs = image_inputs(processor, list(images))
    positions = inputs["input_ids"] == image_token_id(model, processor)
    handle = language_model(model).layers[layer].register_forward_hook(steering_hook(sae, feature, target, positions))
    try:
        with torch.inference_mode():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    finally:
        handle.remove()
    tokenizer = processor.tokenizer
    return [c.strip() for c in tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def explain_feature_examples(sae: Any, store: Any, index: Any, feature: int, images: np.ndarray, masks: np.ndarray,
                             backend: Any, samples: int = 5, top: int = 5) -> dict[str, Any]:
    """Explain one feature from its example set through ``backend.explain_examples``: ``explanation``
    (None unless clear), ``clear``, ``certainty``, the caption ``attributes`` the kept answer's claims
    are about (none unless clear), and the ``answers`` (texts)."""
    from ..biases.examples import build_example_prompt
    from ..sae.examples import example_set, to_example_set
    from ..uncertainty import select_explanation

    found, maps = example_set(sae, store, index, feature, n_top=top, n_quantiles=2 * top, n_contrast=3 * top)
    examples = to_example_set(found, images, maps, latent_id=f"f{feature}", masks=masks)
    answers = backend.explain_examples(examples, build_example_prompt(examples), samples)
    chosen = select_explanation(answers)
    kept = next((r for r in chosen.responses if chosen.clear and r.text == chosen.explanation), None)
    claims = (kept.meta or {}).get("claims", []) if kept is not None else []
    return {"explanation": chosen.explanation if chosen.clear else None, "clear": bool(chosen.clear),
            "certainty": None if chosen.certainty is None else round(float(chosen.certainty), 4),
            "attributes": sorted({CAPTION_ATTRIBUTE_OF_CLAIM[c["attribute"]] for c in claims
                                  if c.get("attribute") in CAPTION_ATTRIBUTE_OF_CLAIM}),
            "answers": [r.text for r in answers]}


def caption_changes(before: Sequence[str], after: Sequence[str]) -> dict[str, float]:
    """Per attribute, the share of caption pairs whose word for it differs."""
    pb, pa = [parse_caption(c) for c in before], [parse_caption(c) for c in after]
    return {a: float(np.mean([x[a] != y[a] for x, y in zip(pb, pa)])) for a in ATTRIBUTES}


def _settings(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise VLMError(f"{name} must be an integer >= 1, got {value!r}")


def vlm_sae_features(model: Any, processor: Any, work_dir: str | Path, *, layer: int = 0, train_images: int = 600,
                     held_images: int = 200, d_sae: int = 128, k: int = 4, steps: int = 400, steer_images: int = 12,
                     steer_multiple: float = 2.0, follow_eta2: float = 0.3, top: int = 5, seed: int = 0,
                     held_seed: int = 7_000_003, backend: Any = None, samples: int = 5,
                     self_explain: bool = True) -> dict[str, Any]:
    """Steps 1-5 of the module docstring on the shapes data. Returns JSON-ready data: ``sae`` (settings
    and training metrics), ``features`` (one row per feature: ``feature``, ``dead``, ``dense``,
    ``frequency``, ``follows``, ``eta2`` per attribute, ``iou``, ``top_items``, ``steering``), ``summary``,
    and ``held_out``; the held-out collection stays in ``work_dir/held``. ``backend`` explains each live
    feature's example set with ``samples`` answers (default: the offline explainer). ``self_explain``:
    the VLM explains the same example sets too, by its captions (step 7; ``self_examples`` per feature).
    """
    from ..data.shapes import make_dataset
    from ..backends.offline import OfflineBackend
    from ..sae.examples import activation_maps, feature_iou, index_examples
    from .evaluate import generate_captions

    backend = backend if backend is not None else OfflineBackend()
    self_backend = None
    if self_explain:
        from ..backends.hf import HFBackend

        # the loaded VLM itself; its captions are short (about 14 tokens for the demo VLM)
        self_backend = HFBackend(str(getattr(model, "name_or_path", "") or "the VLM"), model=model, processor=processor,
                                 mode="caption_compare", max_new_tokens=24)

    _settings(train_images=train_images, held_images=held_images, d_sae=d_sae, k=k, steps=steps,
              steer_images=steer_images, top=top)
    if not isinstance(self_explain, bool):
        raise VLMError(f"self_explain must be True or False, got {self_explain!r}")
    if not 0 < follow_eta2 <= 1:
        raise VLMError(f"follow_eta2 must be in (0, 1], got {follow_eta2!r}")
    work = Path(work_dir)
    train = make_dataset(train_images, seed=seed)
    sae, report = train_vlm_sae(model, processor, train["images"], layer, work, d_sae=d_sae, k=k, steps=steps, seed=seed)
    held = make_dataset(held_images, seed=held_seed, masks=True)
    collect_image_token_activations(model, processor, held["images"], layer, work / "held")
    means = feature_image_means(sae, work / "held").numpy()
    obj, bg = patch_labels(held["masks"])
    regions = feature_region_means(sae, work / "held", {"object": obj, "background": bg})
    words = factor_words(held["factors"])
    index = index_examples(sae, work / "held", top_k=top, seed=seed)
    stats = index.statistics()
    dense = set(index.dense_features())
    steer_set = make_dataset(steer_images, seed=held_seed + 1)["images"]
    plain = generate_captions(model, processor, steer_set)
    rows = []
    for f in range(int(sae.d_sae)):
        row: dict[str, Any] = {"feature": f, "dead": bool(stats["dead"][f]), "dense": f in dense,
                               "frequency": round(float(stats["frequency"][f]), 4), "max": round(float(stats["max"][f]), 4)}
        if row["dead"]:
            rows.append(row | {"follows": None})
            continue
        follows, eta = followed_attribute(means[:, f], words, follow_eta2)
        items = [e.item for e in index.examples(f).top]
        maps = activation_maps(sae, work / "held", [(f, i) for i in items])
        iou = feature_iou([maps[(f, i)] for i in items], [held["masks"][i] for i in items])
        steered = steer_captions(model, processor, sae, layer, f, steer_multiple * float(stats["max"][f]), steer_set)
        changes = caption_changes(plain, steered)
        most = max(changes, key=changes.get)
        explained = explain_feature_examples(sae, work / "held", index, f, held["images"], held["masks"], backend,
                                             samples, top)
        explained["names_followed"] = bool(follows and explained["clear"] and follows in explained["attributes"])
        if self_backend is not None:
            own = explain_feature_examples(sae, work / "held", index, f, held["images"], held["masks"], self_backend,
                                           samples, top)
            own["names_followed"] = bool(follows and own["clear"] and follows in own["attributes"])
            row["self_examples"] = own
        rows.append(row | {"examples": explained, "follows": follows, "eta2": {a: round(v, 4) for a, v in eta.items()},
                           "iou": None if math.isnan(iou) else round(iou, 4), "top_items": items,
                           "mean_on_object": round(float(regions["object"][f]), 4),
                           "mean_on_background": round(float(regions["background"][f]), 4),
                           "steering": {"target": round(steer_multiple * float(stats["max"][f]), 4),
                                        "changes": {a: round(v, 4) for a, v in changes.items()},
                                        "most_changed": most if changes[most] > 0 else None,
                                        "example": steered[0] if steered else None}})
    live = [r for r in rows if not r["dead"]]
    following = [r for r in live if r["follows"]]
    agree = [r for r in following if r["steering"]["most_changed"] == r["follows"]]
    ious = [r["iou"] for r in live if r.get("iou") is not None]
    clear_followers = [r for r in following if r["examples"]["clear"]]
    summary = {"features": len(rows), "dead": len(rows) - len(live), "dense": sum(r["dense"] for r in rows),
               "live": len(live), "follow_an_attribute": len(following),
               "follows": {a: sum(r["follows"] == a for r in following) for a in ATTRIBUTES},
               "steering_changes_the_followed_attribute": len(agree),
               "followers_firing_more_on_object": sum(r["mean_on_object"] > r["mean_on_background"] for r in following),
               "examples_clear_among_followers": len(clear_followers),
               "examples_naming_the_followed_attribute": sum(r["examples"]["names_followed"] for r in clear_followers),
               "examples_clear_among_non_followers": sum(r["examples"]["clear"] for r in live if not r["follows"]),
               "iou_median": round(float(np.median(ious)), 4) if ious else None,
               "iou_over_0_5": sum(v > 0.5 for v in ious)}
    if self_backend is not None:
        own_clear = [r for r in following if r["self_examples"]["clear"]]
        summary |= {"self_examples_clear_among_followers": len(own_clear),
                    "self_examples_naming_the_followed_attribute": sum(r["self_examples"]["names_followed"]
                                                                       for r in own_clear),
                    "self_examples_clear_among_non_followers": sum(r["self_examples"]["clear"] for r in live
                                                                   if not r["follows"]),
                    # both explainers clear and about a common attribute
                    "self_and_offline_agree": sum(bool(r["examples"]["clear"] and r["self_examples"]["clear"] and
                                                       set(r["examples"]["attributes"]) & set(r["self_examples"]["attributes"]))
                                                  for r in live)}
    return {"sae": {"layer": layer, "site": language_layer_path(model, layer) + ".output", "d_sae": d_sae, "k": k,
                    "steps": steps, "train_images": train_images, "training": report.get("metrics", {})},
            "features": rows, "summary": summary,
            "held_out": {"n": held_images, "seed": held_seed}, "steer_images": {"n": steer_images, "seed": held_seed + 1,
                                                                               "multiple_of_max": steer_multiple},
            "follow_eta2": follow_eta2}
