"""Default latent sites of the architectures the project knows (first plugin with an answer wins)."""

from __future__ import annotations

from typing import Any

from ..hookspecs import hookimpl
from ..types import Site

#: Transformer denoisers whose blocks (``transformer_blocks``) return the image tokens' hidden states as a tensor.
TRANSFORMER_DENOISERS = ("DiTTransformer2DModel", "PixArtTransformer2DModel")
#: Joint-attention (MMDiT) denoisers whose ``transformer_blocks`` take the image tokens as ``hidden_states``.
JOINT_TRANSFORMER_DENOISERS = ("SD3Transformer2DModel",)


@hookimpl(trylast=True)
def latentexplainer_default_site(model: Any) -> Site | None:
    kind = type(model).__name__
    children = dict(model.named_children()) if hasattr(model, "named_children") else {}
    if kind in ("UNet2DModel", "UNet2DConditionModel") and "mid_block" in children:
        return Site("mid_block", "output")  # h-space (Kwon et al. 2023)
    if kind in TRANSFORMER_DENOISERS and len(children.get("transformer_blocks") or ()) > 0:
        # No bottleneck: the middle block's output hidden states (B, tokens, dim) stand in for h-space. The middle
        # layers of DiT/SiT carry the most semantic features (REPA, Yu et al. 2024, arXiv 2410.06940, linear probes
        # per layer), and DiT's hidden states admit linear semantic edits (Shuai et al. 2024, arXiv 2411.08196).
        return Site(f"transformer_blocks.{len(children['transformer_blocks']) // 2}", "output")
    if kind in JOINT_TRANSFORMER_DENOISERS and len(children.get("transformer_blocks") or ()) > 0:
        # Joint (MMDiT) blocks return (text, image) tuples; the image tokens entering the middle block (its
        # hidden_states argument) are the image stream between the two halves of the network.
        return Site(f"transformer_blocks.{len(children['transformer_blocks']) // 2}", "input")
    if kind == "FluxTransformer2DModel":  # 19 double-stream then 38 single-stream blocks: the middle of all of them
        blocks = [f"transformer_blocks.{i}" for i in range(len(children.get("transformer_blocks") or ()))]
        blocks += [f"single_transformer_blocks.{i}" for i in range(len(children.get("single_transformer_blocks") or ()))]
        return Site(blocks[len(blocks) // 2], "input") if blocks else None
    if kind == "AutoencoderKL" and "post_quant_conv" in children and children["post_quant_conv"] is not None:
        return Site("post_quant_conv", "input")
    if "decoder" in children:
        return Site("decoder", "input")  # a VAE's latent is its decoder's input
    return None
