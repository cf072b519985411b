"""Tiny random VLMs of several transformers architectures, built offline from configs and saved with
``save_pretrained`` so that tests load them through ``AutoProcessor`` / ``AutoModelForImageTextToText``
(the real path), as ``tests/tiny_llava.py`` does for LLaVA.

Each builder gives ``(model, processor)`` with a word-level tokenizer (``WORDS`` plus the
architecture's own image tokens), a PIL image processor (torchvision is not needed) and a chat
template that puts the architecture's image placeholder where a message has an image part.

Architectures: ``llava`` (CLIP + Llama), ``gemma3`` (SigLIP + Gemma 3, image tokens framed by
begin/end-of-image tokens, the processor's ``image_token_id`` is the begin token, not the soft image
token), ``idefics3`` (SmolVLM: SigLIP-style encoder + pixel-shuffle connector + Llama, 5-D pixel
values). Qwen2-VL / Qwen2.5-VL are left out: their processors require a video processor, which
needs torchvision (not installed here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

#: Shared words of every tiny VLM (ids 0-3 are <pad> <unk> <s> </s>).
WORDS = ["<pad>", "<unk>", "<s>", "</s>", "user:", "assistant:", "the", "object", "moves", "left", "right", "up",
         "down", "grows", "shrinks", "colour", "changes", "red", "blue", "green", "image", "latent", "z0", "z1",
         "square", "circle", "describe", "a", "small", "large", "near", "top", "bottom", "."]
HIDDEN = 32
TEXT_LAYERS = 2

# "{IMAGE}" is replaced by each architecture's image placeholder (what its processor expands).
_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}{% for c in parts %}{{ c['text'] }} {% endfor %}"
    "{% elif message['role'] == 'user' %}user: {% for c in parts %}"
    "{% if c['type'] == 'image' %}{IMAGE} {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% else %}assistant: {% for c in parts %}{{ c['text'] }} {% endfor %}</s> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def chat_template(image_placeholder: str) -> str:
    """The shared chat template with ``image_placeholder`` for every image part."""
    return _TEMPLATE.replace("{IMAGE}", image_placeholder)


def _tokenizer(words: list[str], extra: dict[str, str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens=extra)


def _text_kwargs(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=TEXT_LAYERS,
                num_attention_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def tiny_llava_arch(seed: int = 0) -> tuple[Any, Any]:
    """LLaVA: CLIP vision (28x28 images, 14x14 patches: 4 image tokens) + Llama."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    words = WORDS + ["<image>"]
    processor = LlavaProcessor(
        image_processor=LlavaImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=_tokenizer(words, {"image_token": "<image>"}), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=chat_template("<image>"))
    vision = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                              num_attention_heads=2, image_size=28, patch_size=14, projection_dim=HIDDEN)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(num_key_value_heads=2, **_text_kwargs(len(words))),
                         image_token_index=words.index("<image>"), vision_feature_select_strategy="default",
                         vision_feature_layer=-1)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval(), processor


def tiny_gemma3(seed: int = 0) -> tuple[Any, Any]:
    """Gemma 3: SigLIP vision (28x28 images, 7x7 patches pooled to 4 soft tokens) + Gemma 3 text."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig,
                              SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    words = WORDS + ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tokenizer = _tokenizer(words, {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                   "eoi_token": "<end_of_image>"})
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}),
                                tokenizer=tokenizer, chat_template=chat_template("<start_of_image>"), image_seq_length=4)
    text = Gemma3TextConfig(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                            **_text_kwargs(len(words)))
    vision = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=7)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=words.index("<start_of_image>"), eoi_token_index=words.index("<end_of_image>"),
                          image_token_index=words.index("<image_soft_token>"))
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config).eval(), processor


def tiny_idefics3(seed: int = 0) -> tuple[Any, Any]:
    """Idefics3 (SmolVLM): SigLIP-style vision (56x56 images, 14x14 patches, pixel shuffle x2: 4 image
    tokens, no image splitting) + Llama."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    words = WORDS + ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 56},
                                                max_image_size={"longest_edge": 56})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=_tokenizer(words, {}),
                                  chat_template=chat_template("<image>"), image_seq_len=4)
    config = Idefics3Config(text_config=LlamaConfig(num_key_value_heads=2, **_text_kwargs(len(words))),
                            vision_config=dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=56, patch_size=14),
                            scale_factor=2, image_token_id=words.index("<image>"), pad_token_id=0)
    torch.manual_seed(seed)
    return Idefics3ForConditionalGeneration(config).eval(), processor


BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "llava": tiny_llava_arch,
    "gemma3": tiny_gemma3,
    "idefics3": tiny_idefics3,
}


def save_tiny_vlm(arch: str, path: str | Path, min_new_tokens: int | None = None,
                  max_new_tokens: int | None = None, seed: int = 0) -> Path:
    """Build the tiny ``arch`` VLM and save model + processor to ``path`` (generation defaults optional:
    random weights stop at random, so tests ask for a few tokens)."""
    model, processor = BUILDERS[arch](seed=seed)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = 0, 2, 3
    if min_new_tokens is not None:
        gen.min_new_tokens = min_new_tokens
    if max_new_tokens is not None:
        gen.max_new_tokens = max_new_tokens
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def load_tiny_vlm(path: str | Path) -> tuple[Any, Any]:
    """``(model, processor)`` through ``AutoModelForImageTextToText`` / ``AutoProcessor`` (float32, eval)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return model.eval(), processor
