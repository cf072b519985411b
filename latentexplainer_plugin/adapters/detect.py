"""Choose the adapter of a saved diffusers pipeline from its ``model_index.json`` (``_class_name``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UnsupportedPipelineError  # noqa: F401 (re-exported)

#: diffusers pipeline class (``model_index.json`` ``_class_name``) -> registered adapter name.
SUPPORTED_PIPELINES: dict[str, str] = {
    "DDPMPipeline": "ddpm",
    "DDIMPipeline": "ddpm",
    "StableDiffusionPipeline": "sd",
    "DiTPipeline": "dit",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


def adapter_for_directory(path: str | Path) -> str | None:
    """The adapter name for the pipeline saved in ``path``, or None when ``path`` holds no ``model_index.json``.

    None means "not a diffusers pipeline directory" (a VAE checkpoint, a bare UNet, a hub id): the
    caller keeps its own default. A pipeline class no adapter supports raises
    :class:`UnsupportedPipelineError` listing the supported ones; a damaged ``model_index.json``
    raises one too, naming the file.
    """
    from ..safe_load import read_config

    index = Path(path).expanduser() / "model_index.json"
    if not index.is_file():
        return None
    try:
        config = read_config(index)
    except (OSError, ValueError) as exc:
        raise UnsupportedPipelineError(f"{index} cannot be read as a pipeline index: {exc}") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(kind, str) or not kind:
        raise UnsupportedPipelineError(f"{index} has no \"_class_name\" naming its diffusers pipeline class; "
                                       "save the pipeline with pipeline.save_pretrained(dir), or choose adapter= yourself")
    if kind not in SUPPORTED_PIPELINES:
        supported = ", ".join(f"{name} ({adapter})" for name, adapter in sorted(SUPPORTED_PIPELINES.items()))
        raise UnsupportedPipelineError(
            f"{index} describes a {kind}, which no built-in adapter explains. Supported pipelines (adapter): {supported}. "
            f"An adapter plugin can add {kind} (docs/plugins.md, \"Writing an adapter or backend\"); then pass adapter=NAME.")
    return SUPPORTED_PIPELINES[kind]
