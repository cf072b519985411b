"""Checks made before a model is built or its weights are read: sizes in its config, and pickles.

* :func:`check_config_sizes` refuses a config whose sizes would need absurd memory (``latent_dim``
  10**9, ``sample_size`` 10**6, ``in_channels`` 0) with a message naming the field and the allowed
  range, before anything is allocated.
* :func:`check_parameter_count` builds the model on the ``meta`` device (no memory) and refuses it
  when it has more than :data:`MAX_PARAMETERS` parameters (sizes that pass one by one can still
  multiply into an absurd model).
* :func:`check_pickle_policy` applies the VAE checkpoint rule (``safe_load``) to diffusers and
  transformers component folders: weights only in pickle files (``.bin``, ``.pt``, ...) are refused
  unless ``allow_pickle``; then they are read by ``torch.load(weights_only=True)``, as for a VAE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from ..safe_load import PICKLE_SUFFIXES, LoadError

#: Most parameters a diffusers model may have (3e9, 11 GiB in float32: SDXL's UNet has 2.6e9).
MAX_PARAMETERS = 3_000_000_000
#: Most parameters of a ``train-vae`` ConvVAE (5e8, 1.9 GiB; the demo VAE has about 1e6).
MAX_CONV_VAE_PARAMETERS = 500_000_000

Limits = Mapping[str, tuple[int, int]]

#: ``train-vae`` / demo ConvVAE (config.json of ``model_type`` conv-vae).
CONV_VAE_LIMITS: Limits = {"latent_dim": (1, 4096), "image_size": (16, 4096), "channels": (1, 4),
                           "width": (1, 1024), "hidden": (1, 65536)}
#: diffusers UNet2DModel / UNet2DConditionModel and AutoencoderKL configs (lists: every element).
UNET_LIMITS: Limits = {"sample_size": (1, 4096), "in_channels": (1, 64), "out_channels": (1, 64),
                       "block_out_channels": (1, 8192), "layers_per_block": (1, 64), "norm_num_groups": (1, 1024),
                       "cross_attention_dim": (1, 16384), "attention_head_dim": (1, 4096)}
AUTOENCODER_LIMITS: Limits = {"sample_size": (1, 4096), "in_channels": (1, 64), "out_channels": (1, 64),
                              "latent_channels": (1, 64), "block_out_channels": (1, 8192),
                              "layers_per_block": (1, 64), "norm_num_groups": (1, 1024)}
#: transformers text encoders (CLIPTextModel of Stable Diffusion).
TEXT_ENCODER_LIMITS: Limits = {"vocab_size": (1, 1_000_000), "hidden_size": (1, 16384), "intermediate_size": (1, 65536),
                               "num_hidden_layers": (1, 256), "num_attention_heads": (1, 1024),
                               "max_position_embeddings": (1, 65536)}
SCHEDULER_LIMITS: Limits = {"num_train_timesteps": (1, 100_000)}
MAX_LIST = 16  # most entries in a per-block list such as block_out_channels


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config_sizes(config: Mapping[str, Any], limits: Limits, where: str | Path) -> None:
    """Raise :class:`LoadError` for the first field of ``config`` outside ``limits``.

    A field may be an integer or a list/tuple of integers (each is checked); missing fields and
    ``None`` are left to the model's own defaults.
    """
    for field, (lo, hi) in limits.items():
        value = config.get(field)
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and not 1 <= len(values) <= MAX_LIST:
            raise LoadError(f"{where}: {field} must list 1 to {MAX_LIST} sizes, got {len(values)}")
        for v in values:
            if not _is_int(v) or not lo <= v <= hi:
                shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
                raise LoadError(f"{where}: {field} must be an integer in [{lo}, {hi}], got {shown}; "
                                "the config is damaged or not meant for this model")


def check_parameter_count(build: Callable[[], Any], where: str | Path, limit: int = MAX_PARAMETERS) -> int:
    """Build a module on the meta device (no memory is allocated), count its parameters, refuse it
    above ``limit``; return the count."""
    import torch

    with torch.device("meta"):
        module = build()
    count = sum(p.numel() for p in module.parameters())
    if count > limit:
        raise LoadError(f"{where}: the config describes a model with {count:,} parameters "
                        f"({count * 4 / 2**30:.0f} GiB in float32), more than the {limit:,} allowed; "
                        "the config is damaged or the sizes in it are not what you meant")
    return count


def check_pickle_policy(folder: str | Path, allow_pickle: bool, what: str = "model") -> None:
    """Refuse a local component folder whose weights exist only as pickle files, unless ``allow_pickle``.

    The same rule as :func:`latentexplainer_plugin.safe_load.find_weights` for VAE checkpoints.
    """
    folder = Path(folder)
    if allow_pickle or not folder.is_dir():
        return
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.name.endswith(".safetensors") for p in files):
        return
    pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise LoadError(
            f"{folder} ({what}) has no .safetensors weights, only the pickle-based {pickles[0]}; pickles can run "
            "arbitrary code when loaded, so they are refused by default. Convert it to safetensors "
            "(load it once where you trust it and save_pretrained(dir, safe_serialization=True)), or pass "
            "allow_pickle=True to load it with torch.load(weights_only=True)."
        )


def use_safetensors(allow_pickle: bool, folder: str | Path | None = None) -> bool | None:
    """``from_pretrained(use_safetensors=...)``: only safetensors unless pickles are allowed; then
    either (None), or pickle straight away when the local ``folder`` has no safetensors file."""
    if not allow_pickle:
        return True
    if folder is not None and Path(folder).is_dir() and not any(Path(folder).glob("*.safetensors")):
        return False
    return None
