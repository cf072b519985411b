"""A tiny random LLaVA (CLIP vision tower + Llama, one layer each) and its word-level processor, built
offline from configs; shared by the hf-backend tests and the real-vLLM check (benchmarks/vllm_check.py)."""

from __future__ import annotations

from typing import Any, Sequence


def tiny_llava(words: Sequence[str], chat_template: str, hidden: int = 32, tie_word_embeddings: bool = True,
               seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)``: 28x28 images in 14x14 patches; ``words`` is the whole vocabulary and must hold
    ``<pad> <unk> <s> </s> <image>`` with ``<pad>`` at 0, ``<s>`` at 2 and ``</s>`` at 3."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    words = list(words)
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=chat_template,
    )
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=hidden)
    text = LlamaConfig(vocab_size=len(words), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=tie_word_embeddings)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=words.index("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), processor
