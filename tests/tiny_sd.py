"""A tiny Stable Diffusion built offline from configs, shared by the diffusion tests."""

from __future__ import annotations


def tiny_sd_parts() -> dict:
    """UNet2DConditionModel (a cross-attention down block), AutoencoderKL, CLIP text encoder and a
    word-level tokenizer, seeded: a tiny text-conditioned Stable Diffusion built offline from configs."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=8, attention_head_dim=4).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, max_position_embeddings=8, bos_token_id=0,
                                                eos_token_id=0, pad_token_id=0)).eval()
    words = ["<pad>", "<unk>", "a", "photo", "of", "face", "smiling"]
    vocab = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", unk_token="<unk>", model_max_length=8)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
