"""The demo VLM: a tiny LLaVA made and trained here on procedural shapes with captions from the
ground-truth factors, so that multimodal explainers have a model whose truth is known.

* :mod:`.captions`: factors -> captions ("a small red triangle near the top left on a dark
  background") and captions -> words per attribute;
* :mod:`.build`: the model, word-level tokenizer and processor; save / load through the real
  ``AutoProcessor`` / ``AutoModelForImageTextToText`` path;
* :mod:`.train`: the seeded caption trainer (:func:`train_demo_vlm`);
* :mod:`.evaluate`: caption accuracy per attribute on held-out images, against chance;
* :mod:`.lens`: LatentLens, EmbeddingLens and LogitLens for visual tokens (any architecture whose
  decoder ``get_decoder()`` finds: LLaVA, Gemma 3, Idefics3 / SmolVLM);
* :mod:`.activations`: a language-model layer's activations at the image-token positions, streamed
  to disk for SAE features (:func:`collect_image_token_activations`).

Importing this package does not import ``transformers``; the functions do.
"""

from pathlib import Path

from .activations import collect_image_token_activations, language_layer_path
from .build import DemoVLMConfig, VLMError, build_demo_vlm, load_demo_vlm, save_demo_vlm
from .captions import ATTRIBUTES, CaptionError, caption_from_factors, factor_words, parse_caption
from .evaluate import caption_accuracy, evaluate_demo_vlm, generate_captions
from .train import VLMTrainConfig, train_demo_vlm

#: Where trained demo-VLM weights are shipped in the package, when they are.
WEIGHTS_DIR = Path(__file__).parent / "weights"

__all__ = [
    "ATTRIBUTES",
    "CaptionError",
    "DemoVLMConfig",
    "VLMError",
    "VLMTrainConfig",
    "WEIGHTS_DIR",
    "build_demo_vlm",
    "caption_accuracy",
    "caption_from_factors",
    "collect_image_token_activations",
    "evaluate_demo_vlm",
    "factor_words",
    "generate_captions",
    "language_layer_path",
    "load_demo_vlm",
    "parse_caption",
    "save_demo_vlm",
    "train_demo_vlm",
]
