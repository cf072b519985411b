"""Build, save and load the demo VLM: a tiny ``LlavaForConditionalGeneration`` made here.

Parts (all from ``transformers`` configs, nothing downloaded):

* vision tower: CLIP vision transformer on 64x64 images in 8x8 patches (64 patch tokens + CLS;
  LLaVA's "default" feature strategy drops CLS, so an image is 64 ``<image>`` tokens);
* projector: LLaVA's two-layer MLP from the vision width to the language width;
* language model: a small Llama;
* tokenizer: a ``tokenizers`` WordLevel vocabulary (lower-cased, split at spaces and punctuation)
  of the caption words, the chat words and the special tokens, wrapped in ``PreTrainedTokenizerFast``;
* processor: ``LlavaProcessor`` with a PIL image processor (64x64, CLIP normalisation) and a chat
  template, so ``processor.apply_chat_template(messages, add_generation_prompt=True, ...)`` works
  as for any hub VLM.

The model and processor are saved together with ``save_pretrained`` and loaded back only with
``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained`` (:func:`load_demo_vlm`), the
path every local or hub VLM takes in the ``hf:`` backend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import VLMError  # noqa: F401 (re-exported)
from .captions import CAPTION_WORDS

__all__ = [
    "CHAT_TEMPLATE",
    "DemoVLMConfig",
    "PROMPT",
    "SPECIAL_TOKENS",
    "VLMError",
    "VOCABULARY",
    "build_demo_vlm",
    "build_processor",
    "build_tokenizer",
    "caption_messages",
    "load_demo_vlm",
    "save_demo_vlm",
]


#: The instruction the demo VLM was trained to answer with a caption.
PROMPT = "Describe the image."
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
_CHAT_WORDS = ("user", "assistant", ":", ".", ",", "?", "describe", "image", "what", "is", "in", "this", "object")
#: Every token of the word-level vocabulary, in id order.
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(SPECIAL_TOKENS + _CHAT_WORDS + CAPTION_WORDS))

# System text, then "user: <image> text", then "assistant: text </s>" per answer; content may be a
# plain string or a list of {"type": "image"|"text"} parts (the form apply_chat_template passes).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}{% for c in parts %}{{ c['text'] }} {% endfor %}"
    "{% elif message['role'] == 'user' %}user: {% for c in parts %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% else %}assistant: {% for c in parts %}{{ c['text'] }} {% endfor %}</s> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True)
class DemoVLMConfig:
    """Sizes of the demo VLM (defaults: about 0.26 M parameters, 1.0 MB as float32 safetensors)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise VLMError(f"DemoVLMConfig.{name} must be an integer >= 1, got {value!r}")
        if self.image_size % self.patch_size:
            raise VLMError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        for width, heads in (("vision_hidden", "vision_heads"), ("text_hidden", "text_heads")):
            w, h = getattr(self, width), getattr(self, heads)
            if w % h:
                raise VLMError(f"{width} ({w}) must be a multiple of {heads} ({h})")

    @property
    def image_tokens(self) -> int:
        """``<image>`` tokens per image (one per patch; CLS is dropped)."""
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer() -> Any:
    """The word-level tokenizer over :data:`VOCABULARY` (unknown words become ``<unk>``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCABULARY)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, "red ." -> "red."
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})


def build_processor(config: DemoVLMConfig = DemoVLMConfig()) -> Any:
    """``LlavaProcessor``: 64x64 PIL image processor, the word-level tokenizer and :data:`CHAT_TEMPLATE`."""
    from transformers import LlavaProcessor

    try:  # transformers 5: the PIL image processor has its own class (torchvision may be absent)
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4.x: the slow image processor is the PIL one
        from transformers import LlavaImageProcessor as ImageProcessor

    side = config.image_size
    image_processor = ImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=config.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_demo_vlm(config: DemoVLMConfig = DemoVLMConfig(), seed: int = 0) -> tuple[Any, Any]:
    """A freshly initialised (untrained) demo VLM and its processor: ``(model, processor)``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = {w: i for i, w in enumerate(VOCABULARY)}
    vision = CLIPVisionConfig(hidden_size=config.vision_hidden, intermediate_size=4 * config.vision_hidden,
                              num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                              image_size=config.image_size, patch_size=config.patch_size,
                              projection_dim=config.vision_hidden)
    text = LlamaConfig(vocab_size=len(VOCABULARY), hidden_size=config.text_hidden,
                       intermediate_size=4 * config.text_hidden, num_hidden_layers=config.text_layers,
                       num_attention_heads=config.text_heads, num_key_value_heads=config.text_heads,
                       max_position_embeddings=256, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                       eos_token_id=vocab["</s>"], tie_word_embeddings=True)
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_index=vocab["<image>"],
                        vision_feature_select_strategy="default", vision_feature_layer=-1,
                        projector_hidden_act="gelu")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlavaForConditionalGeneration(llava)
    finally:
        torch.random.set_rng_state(state)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = vocab["</s>"], vocab["<pad>"], vocab["<s>"]
    gen.max_new_tokens = config.max_new_tokens
    return model.eval(), build_processor(config)


def caption_messages(image: Any, prompt: str = PROMPT, caption: str | None = None) -> list[dict]:
    """The chat for one image: ``[user: image + prompt]``, plus the assistant's ``caption`` if given
    (the same message layout as the ``hf`` backend's ``HFBackend.messages``)."""
    messages: list[dict] = [{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": prompt}]}]
    if caption is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": caption}]})
    return messages


def save_demo_vlm(model: Any, processor: Any, path: str | Path) -> Path:
    """``model.save_pretrained`` and ``processor.save_pretrained`` into one directory (safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def load_demo_vlm(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, processor)`` loaded from a saved directory through ``AutoProcessor`` and
    ``AutoModelForImageTextToText.from_pretrained`` only (the real transformers path)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "processor_config.json").is_file():
        raise VLMError(f"{path} is not a saved demo VLM (config.json and processor_config.json are missing); "
                       f"train one with train_demo_vlm(out=...) or `latentexplainer train-demo-vlm --out DIR`")
    import transformers

    processor = AutoProcessor.from_pretrained(path)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # 4.x name
    model = AutoModelForImageTextToText.from_pretrained(path, **{dtype_key: torch.float32}, use_safetensors=True)
    return model.to(device).eval(), processor
