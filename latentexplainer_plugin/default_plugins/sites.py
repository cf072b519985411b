"""Default latent sites of the architectures the project knows (first plugin with an answer wins)."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from ..types import Site


@hookimpl(trylast=True)
def latentexplainer_default_site(model: Any) -> Site | None:
    kind = type(model).__name__
    children = dict(model.named_children()) if hasattr(model, "named_children") else {}
    if kind in ("UNet2DModel", "UNet2DConditionModel") and "mid_block" in children:
        return Site("mid_block", "output")  # h-space (Kwon et al. 2023)
    if kind == "AutoencoderKL" and "post_quant_conv" in children and children["post_quant_conv"] is not None:
        return Site("post_quant_conv", "input")
    if "decoder" in children:
        return Site("decoder", "input")  # a VAE's latent is its decoder's input
    return None
