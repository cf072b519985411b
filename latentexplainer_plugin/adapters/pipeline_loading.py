"""Load a saved diffusers pipeline (``model_index.json``) after checking it, for the transformer-diffusion adapters."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch

from ..safe_load import LoadError
from .diffusion import parse_dtype

#: Sizes a transformer denoiser's config may hold (DiT-XL/2: 28 layers, 16 heads of 72; PixArt: caption_channels 4096).
TRANSFORMER_LIMITS = {"sample_size": (1, 4096), "in_channels": (1, 256), "out_channels": (1, 512), "num_layers": (1, 256),
                      "num_single_layers": (1, 256), "num_attention_heads": (1, 1024), "attention_head_dim": (1, 4096),
                      "patch_size": (1, 64), "cross_attention_dim": (1, 65536), "caption_channels": (1, 65536),
                      "num_embeds_ada_norm": (1, 1_000_000)}
#: T5 encoders (PixArt: t5-v1_1-xxl has d_model 4096, d_ff 10240, 24 layers, 64 heads).
T5_LIMITS = {"vocab_size": (1, 1_000_000), "d_model": (1, 16384), "d_kv": (1, 4096), "d_ff": (1, 131072),
             "num_layers": (1, 256), "num_heads": (1, 1024)}


def _dtype_keyword() -> str:
    """``dtype`` where diffusers deprecates ``torch_dtype`` (recent versions), else ``torch_dtype``."""
    return "dtype" if importlib.util.find_spec("diffusers.utils.deprecation_utils") is not None and hasattr(
        importlib.import_module("diffusers.utils.deprecation_utils"), "_resolve_dtype") else "torch_dtype"


def _pipeline_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


def load_pipeline(path_or_id: str | Path, pipeline_classes: tuple[str, ...], device: str | torch.device = "cpu",
                  dtype: str | torch.dtype | None = None, allow_pickle: bool = False) -> Any:
    """A diffusers pipeline of one of ``pipeline_classes`` from a saved directory (``model_index.json``) or hub id.

    Checked before any weight is read, for a local directory: the pipeline class in
    ``model_index.json``; the sizes in the transformer / UNet, VAE and text-encoder configs; the
    denoiser's parameter count (built on the meta device); the pickle rule (weights only as
    ``.bin`` are refused unless ``allow_pickle``).
    """
    from ..safe_load import read_config
    from .diffusion import check_unet_parameters
    from .loading import AUTOENCODER_LIMITS, SCHEDULER_LIMITS, TEXT_ENCODER_LIMITS, UNET_LIMITS, check_config_sizes
    from .loading import check_pickle_policy
    from .loading import use_safetensors

    dtype = parse_dtype(dtype) or torch.float32
    source = str(path_or_id)
    local = Path(source).expanduser()
    wanted = " or ".join(pipeline_classes)
    if local.exists() or source.startswith((".", "/", "~")):
        index_file = local / "model_index.json"
        if not index_file.is_file():
            raise LoadError(f"{local} is not a diffusers pipeline directory: it has no model_index.json (a {wanted} "
                            "directory is written by pipeline.save_pretrained(dir))")
        index = read_config(index_file)
        kind = index.get("_class_name")
        if kind not in pipeline_classes:
            raise LoadError(f"{index_file} describes a {kind}, not a {wanted}; leave out adapter= to choose the adapter "
                            "from model_index.json")
        components = {name: spec for name, spec in index.items() if not name.startswith("_") and isinstance(spec, list)}
        for name, limits in (("transformer", TRANSFORMER_LIMITS), ("unet", UNET_LIMITS), ("vae", AUTOENCODER_LIMITS),
                             ("scheduler", SCHEDULER_LIMITS)):
            file = local / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
            if file.is_file():
                check_config_sizes(read_config(file), limits, file)
        for name in ("text_encoder", "text_encoder_2"):
            encoder = local / name / "config.json"
            if encoder.is_file():
                config = read_config(encoder)
                check_config_sizes(config, T5_LIMITS if config.get("model_type") in ("t5", "umt5") else TEXT_ENCODER_LIMITS, encoder)
        for name in ("transformer", "unet"):  # the denoiser's parameter count, on the meta device
            spec = components.get(name)
            if spec and spec[0] == "diffusers" and (local / name / "config.json").is_file():
                check_unet_parameters(_pipeline_class(spec[1]), local / name / "config.json")
        for name in components:
            check_pickle_policy(local / name, allow_pickle, name)
        root = str(local)
    else:
        from ..hub import hub_problem

        problem = hub_problem(source, "model_index.json")
        if problem is not None:  # seconds, not the minutes of diffusers' retries
            raise LoadError(f"model={source!r} {problem}; give the local directory of a {wanted} (pipeline.save_pretrained(dir))")
        root = source
        index = None
    cls = _pipeline_class(pipeline_classes[0] if index is None else index["_class_name"])
    low_memory = importlib.util.find_spec("accelerate") is not None  # else diffusers warns on every load
    try:
        pipeline = cls.from_pretrained(root, **{_dtype_keyword(): dtype}, use_safetensors=use_safetensors(allow_pickle),
                                       low_cpu_mem_usage=low_memory)
    except (OSError, ValueError, TypeError) as exc:
        raise LoadError(f"could not load a {wanted} from {source}: {exc}") from exc
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
