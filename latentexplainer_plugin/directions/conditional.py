"""Conditional directions: mean(h | y = 1) - mean(h | y = 0), one per binary label (as in CSVAE).

Codes and labels can be given directly, or come from a diffusion adapter:
1. x_T: inverted from the user's ``images`` (``adapter.invert``), or noises drawn from ``seed``.
2. Codes: h at the adapter's site, averaged over the steps of the edit window (``hooks.capture``).
3. Labels: given, or ``classifier(images)`` on the images (given, or sampled from x_T).
4. Direction per label column: the difference of class means, normalized; its raw norm is kept.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .base import Directions

#: The adapters whose ``invert`` maps images back to the noises they sample from (docs/diffusion.md).
INVERTING_FAMILIES = "the diffusion adapters ddpm, sd, sdxl, dit, pixart, sd3 and flux"


def _binary_labels(labels: Any, n: int) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or len(y) != n:
        raise ValueError(f"labels must have shape ({n},) or ({n}, L) to match {n} codes, got {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.isfinite(y).all():
            raise ValueError("labels contain NaN or inf")
        if ((y != 0) & (y != 1)).any():
            y = y > 0.5  # probabilities from a classifier
    elif y.dtype != torch.bool and ((y != 0) & (y != 1)).any():
        raise ValueError(f"labels must be binary (0/1, bool, or probabilities), got values {sorted(set(y.flatten().tolist()))[:6]}")
    return y.bool()


def mean_difference(codes: torch.Tensor, labels: Any, label_names: Sequence[str] | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Per label column: mean(codes | y=1) - mean(codes | y=0) (unnormalized), and counts/norms."""
    codes = torch.as_tensor(codes).double()
    if codes.ndim < 2:
        raise ValueError(f"codes must be (n, *shape), got shape {tuple(codes.shape)}")
    y = _binary_labels(labels, len(codes))
    names = list(label_names) if label_names is not None else [f"y{j}" for j in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} label names for {y.shape[1]} label columns")
    vectors, info = [], []
    for j in range(y.shape[1]):
        pos, neg = int(y[:, j].sum()), int((~y[:, j]).sum())
        if pos == 0 or neg == 0:
            raise ValueError(f"label {names[j]!r} has {pos} samples with y=1 and {neg} with y=0; both classes are needed")
        diff = codes[y[:, j]].mean(0) - codes[~y[:, j]].mean(0)
        vectors.append(diff)
        info.append({"label": names[j], "n_pos": pos, "n_neg": neg, "norm": round(float(diff.norm()), 6)})
    return torch.stack(vectors).float(), info


def conditional(codes: torch.Tensor | None = None, labels: Any = None, *, adapter: Any = None,
                images: torch.Tensor | None = None, classifier: Callable[[torch.Tensor], Any] | None = None,
                n_samples: int = 64, seed: int = 0, label_names: Sequence[str] | None = None) -> Directions:
    """One unit direction per binary label: the difference of the class means of the codes.

    Either ``codes`` (n, *shape) and ``labels`` (n,) / (n, L), or an ``adapter`` (diffusion) with
    ``images`` (n, C, H, W) in [0, 1] (inverted to noises) or ``n_samples`` noises from ``seed``,
    labelled by ``labels`` or by ``classifier(images)``.
    """
    provenance: dict[str, Any] = {"finder": "conditional"}
    if codes is None:
        if adapter is None:
            raise ValueError("conditional() needs codes and labels, or an adapter with labelled images or a classifier")
        if labels is None and classifier is None:
            raise ValueError("conditional() needs labels, or a classifier callable that labels images")
        if images is not None:
            if "inversion" not in (getattr(adapter, "capabilities", None) or ()):
                raise ValueError(f"the {getattr(adapter, 'name', type(adapter).__name__)} adapter cannot invert images to its "
                                 f"latents (capability 'inversion'); {INVERTING_FAMILIES} can. Give codes and labels "
                                 "instead, or a classifier that labels n_samples sampled images")
            bases = adapter.invert(images)
            provenance["source"] = f"{len(images)} inverted images"
        else:
            if labels is not None:
                raise ValueError("labels without images: give the images they label, or a classifier for sampled images")
            bases = adapter.sample_bases(n_samples, seed)
            provenance |= {"source": f"{n_samples} sampled images", "seed": seed}
        if labels is None:
            labels = classifier(images if images is not None else adapter.sample(bases))
            if torch.is_tensor(labels):
                labels = labels.detach().cpu()
        codes = adapter.capture_h(bases).mean(dim=1)  # average over the edit window's steps
        provenance |= {"model": adapter.model_id, "site": str(adapter.site), "timestep": adapter.timesteps[adapter.edit_calls]}
    vectors, info = mean_difference(codes, labels, label_names)
    norms = vectors.flatten(1).norm(dim=1).clamp_min(1e-12)
    return Directions(vectors / norms.view(-1, *([1] * (vectors.ndim - 1))), provenance | {"labels": info})
