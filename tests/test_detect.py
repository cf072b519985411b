"""Choosing the adapter from a saved pipeline's model_index.json."""

import json

import pytest
import torch

from latentexplainer_plugin.adapters.detect import SUPPORTED_PIPELINES, UnsupportedPipelineError, adapter_for_directory
from latentexplainer_plugin.errors import LatentExplainerError
from latentexplainer_plugin.plugins import registry


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                         norm_num_groups=8, sample_size=8)


def test_saved_pipelines_are_detected(tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDIMPipeline(unet, DDIMScheduler()).save_pretrained(tmp_path / "ddim")
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=4, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=10)
    DiTPipeline(transformer, tiny_vae(), DDIMScheduler()).save_pretrained(tmp_path / "dit")
    assert adapter_for_directory(tmp_path / "ddim") == "ddpm"
    assert adapter_for_directory(str(tmp_path / "dit")) == "dit"


@pytest.mark.parametrize("kind, adapter", sorted(SUPPORTED_PIPELINES.items()))
def test_every_supported_pipeline_maps_to_a_registered_adapter(tmp_path, kind, adapter):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": kind, "_diffusers_version": "0.42.1"}))
    assert adapter_for_directory(tmp_path) == adapter
    factory = registry("adapters").get(adapter).factory
    assert kind in getattr(factory, "pipeline_classes", (kind,))  # the adapter's loader accepts that class


def test_not_a_pipeline_directory_gives_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # a bare model (or a VAE checkpoint): no model_index.json
    assert adapter_for_directory(tmp_path) is None
    assert adapter_for_directory(tmp_path / "missing") is None


def test_unknown_pipeline_lists_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(UnsupportedPipelineError) as info:
        adapter_for_directory(tmp_path)
    message = str(info.value)
    assert "describes a KandinskyV22Pipeline" in message
    assert "DiTPipeline (dit)" in message and "StableDiffusionPipeline (sd)" in message and "DDIMPipeline (ddpm)" in message
    assert "docs/plugins.md" in message and message.endswith("then pass adapter=NAME.") and "--adapter" not in message
    assert isinstance(info.value, LatentExplainerError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (json.dumps({"unet": ["diffusers", "UNet2DModel"]}), "has no \"_class_name\""),
])
def test_damaged_index_is_refused_naming_the_file(tmp_path, content, message):
    (tmp_path / "model_index.json").write_text(content)
    with pytest.raises(UnsupportedPipelineError, match=message) as info:
        adapter_for_directory(tmp_path)
    assert "model_index.json" in str(info.value)
