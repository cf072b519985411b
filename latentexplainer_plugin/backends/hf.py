"""An explainer backend that runs a multimodal model locally with ``transformers``.

Any checkpoint that ``AutoModelForImageTextToText`` and ``AutoProcessor`` load works: LLaVA,
Qwen2-VL / Qwen2.5-VL, Idefics, PaliGemma, Gemma 3, SmolVLM, ... given as a local directory
(``model.save_pretrained(dir)`` *and* ``processor.save_pretrained(dir)``) or a hub id (downloaded
by ``from_pretrained``, or read from the local hub cache when offline).

How one traversal is explained:

* the prompt's images (the labelled traversal grid) are shrunk so that their longer side is at
  most ``max_image_side`` pixels (VLM processors tile or resize large images; a 1024-pixel grid
  costs many image tokens for nothing);
* the chat is ``[system?, user: images + text]``, rendered by the processor's own chat template
  (``apply_chat_template(..., add_generation_prompt=True, tokenize=True, return_dict=True)``);
* the ``n`` samples come from ONE ``model.generate(do_sample=True, num_return_sequences=n)`` call
  (the prompt is encoded once; the batch of n continuations shares it);
* only the new tokens are decoded and each answer goes through
  :func:`~latentexplainer_plugin.backends.responses.clean_response` (boilerplate, abstentions,
  empty answers become failed samples).

``mode="caption_compare"`` is for VLMs too weak to compare frames (a captioner such as the demo
VLM): the prompt is not sent; instead the first and last frame of every row are captioned (one
batched ``generate``) and :func:`compare_captions` states what changed between the captions, in
words and as structured claims (``Response.meta["claims"]``). Answer ``i`` comes from base
``i % n_bases`` (``samples_from_bases``): greedy captions for the first pass over the bases,
sampled captions for repeats. A feature's example set (:meth:`HFBackend.explain_examples`) is
explained by captioning its firing and non-firing images and naming the caption word
over-represented among the firing ones (:func:`contrast_captions`).

``generate_calls`` counts the ``generate`` calls made by this instance (tests and benchmarks).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, Field

from ..devices import DTYPES, check_device, dtype_name
from ..errors import OptionError
from ..options import ComponentOptions, DtypeName, NonNegativeInt, PositiveFloat, PositiveInt, validate_options
from ..types import Prompt, Response, Traversal
from .base import Backend, BackendError
from .responses import clean_response

__all__ = ["HFBackend", "CAPTION_WORDS", "DTYPES", "MODES", "resolve_dtype", "check_vlm_dir", "check_hub_model",
           "compare_captions", "contrast_captions", "read_caption"]

#: What the hf backend does with a traversal: ``compare`` sends the bias's prompt (images + text) and
#: samples n answers; ``caption_compare`` captions first and last frames and compares the captions.
MODES = ("compare", "caption_compare")
CAPTION_PROMPT = "Describe the image."

_PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_NO_PROCESSOR = (
    "{path} has no processor (preprocessor_config.json / tokenizer); a VLM directory needs both the model and "
    "its processor: save them together with model.save_pretrained(dir) and processor.save_pretrained(dir)"
)


def resolve_dtype(dtype: Any, device: str = "cpu") -> Any:
    """``"bfloat16"`` / ``torch.float16`` / None -> a torch dtype; None picks float32 on CPU and MPS,
    bfloat16 on CUDA. Anything else raises ``ValueError`` listing the accepted names."""
    import torch

    if dtype is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    try:
        return getattr(torch, dtype_name(dtype))
    except ValueError as exc:
        raise ValueError(f"dtype {exc}") from None


def _finish(tokens: list[int], eos: set[int], pad: int | None, max_new_tokens: int) -> tuple[int, str]:
    """(tokens generated, ``"stop"`` when an end-of-sequence token ended it, else ``"length"``).

    ``generate`` pads a finished sequence (with pad, often the eos id) up to the longest one in the
    batch, so the answer ends at its first eos token; without one it ran into ``max_new_tokens``.
    """
    for k, token in enumerate(tokens):
        if token in eos:
            return k + 1, "stop"
    length = len(tokens)
    if pad is not None and pad not in eos:
        while length and tokens[length - 1] == pad:
            length -= 1
    return length, ("length" if length >= max_new_tokens else "stop")


def _looks_like_path(text: str) -> bool:
    """A string meant as a local path (hub ids are ``name`` or ``owner/name``)."""
    return text.startswith(("/", "./", "../", "~", "\\")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def check_vlm_dir(path: str | Path) -> Path:
    """Check that a local directory holds a model config and a processor; return it as a Path."""
    path = Path(path)
    if not path.is_dir():
        raise BackendError(f"{path}: no such directory")
    if not (path / "config.json").is_file():
        raise BackendError(f"{path} has no config.json: not a transformers model directory (model.save_pretrained(dir) writes it)")
    has_config = any((path / f).is_file() for f in _PROCESSOR_CONFIGS)
    has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES)
    if not (has_config and has_tokenizer):
        raise BackendError(_NO_PROCESSOR.format(path=path))
    return path


def check_hub_model(model_id: str, timeout: float | None = None) -> None:
    """Raise :class:`BackendError` within seconds when hub id ``model_id`` cannot be loaded: not in the
    local hub cache, and the hub is offline, unreachable or has no such model (see :func:`..hub.hub_problem`)."""
    from ..hub import HUB_TIMEOUT, hub_problem

    problem = hub_problem(model_id, "config.json", HUB_TIMEOUT if timeout is None else timeout)
    if problem is not None:
        raise BackendError(
            f"hf:{model_id} {problem}; give a local directory instead (backend='hf:/path/to/dir', saved with "
            f"model.save_pretrained(dir) and processor.save_pretrained(dir)), or download it where the hub is "
            f"reachable (hf download {model_id})"
        )


def _fingerprint(path: Path) -> str:
    """Names, sizes and modification times of a local model directory's files (cache keys: a model
    re-saved into the same directory gets new keys)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _nucleus(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def _image_side(value: int) -> int:
    if value < 16:
        raise ValueError(f"must be >= 16 pixels, got {value}")
    return value


class HFOptions(ComponentOptions):
    """Options of the ``hf`` backend (``--backend hf:PATH_OR_ID``)."""

    device: str = Field("cpu", description="torch device of the model (the run's --device)")
    dtype: Optional[DtypeName] = Field(None, description="float32 | float16 | bfloat16 (default float32 on CPU, bfloat16 on CUDA)")
    max_new_tokens: PositiveInt = Field(120, description="most tokens per answer")
    min_new_tokens: Optional[NonNegativeInt] = Field(None, description="fewest tokens per answer")
    temperature: PositiveFloat = Field(1.0, description="sampling temperature > 0 (the n answers are drawn with do_sample=True)")
    top_p: Optional[Annotated[float, AfterValidator(_nucleus)]] = Field(None, description="nucleus sampling mass in (0, 1]")
    max_image_side: Annotated[int, AfterValidator(_image_side)] = Field(448, description="prompt images are shrunk to at most this many pixels per side (>= 16)")
    trust_remote_code: bool = Field(False, description="passed to from_pretrained")
    allow_pickle: bool = Field(False, description="accept weights saved only as pickle (read with weights_only=True)")
    cache_dir: Optional[str] = Field(None, description="response cache directory (default ~/.cache/latentexplainer/responses)")
    no_cache: bool = Field(False, description="neither read nor write the response cache")
    mode: Literal["compare", "caption_compare"] = Field(
        "compare", description="compare: the model answers the prompt; caption_compare: caption the first and last "
                               "frame of each row, then state what changed between the captions (captioning VLMs)")
    caption_prompt: str = Field(CAPTION_PROMPT, min_length=1, description="the instruction that asks for a caption "
                                                                          "(caption_compare mode)")
    min_share_difference: Annotated[float, AfterValidator(_nucleus)] = Field(
        0.5, description="example sets in caption_compare mode: smallest difference in (0, 1] between a caption "
                         "word's share among firing and non-firing images that is named (else it abstains)")
    min_examples: int = Field(3, ge=2, description="example sets in caption_compare mode: fewest firing (per answer) "
                                                   "and non-firing images compared (else it abstains)")


class HFBackend(Backend):
    """Explains a traversal with a local ``transformers`` image-text-to-text model.

    Args:
        path_or_id: a local model directory (model + processor) or a hub id.
        device: torch device for the model (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
        dtype: ``float32``, ``float16`` or ``bfloat16`` (default: float32 on CPU, bfloat16 on CUDA).
        max_new_tokens: most tokens per answer.
        min_new_tokens: fewest tokens per answer (None: the model may stop at once).
        temperature, top_p: sampling parameters passed to ``generate``.
        max_image_side: prompt images are shrunk so that their longer side is at most this.
        model, processor: already loaded objects (skip ``from_pretrained``; ``path_or_id`` then only names them).
        trust_remote_code: passed to ``from_pretrained`` (off by default).
        allow_pickle: accept weights saved only as pickle (``pytorch_model.bin``), read with
            ``torch.load(weights_only=True)``; off by default, as for every model (``--allow-pickle``).
        mode: ``"compare"`` (default: the model answers the prompt) or ``"caption_compare"`` (caption
            the first and last frame of each row, compare the captions; one answer per base).
        caption_prompt: the instruction that asks for a caption in ``caption_compare`` mode.
        min_share_difference, min_examples: example sets in ``caption_compare`` mode (see
            :func:`contrast_captions`).
    """

    name = "hf"
    supports_images = True
    supports_n = True
    needs_key = False
    extra_capabilities = frozenset({"calls_model"})
    Options = HFOptions

    @classmethod
    def preflight(cls, arg: str | None, options: dict[str, Any]) -> None:
        """A complete local model directory (model, processor, no pickle unless allowed), or a hub id
        that resolves within seconds."""
        if not (arg or "").strip():
            raise OptionError("the hf backend", [("backend", "hf:PATH_OR_ID needs a model directory or hub id, "
                                                             "e.g. hf:Qwen/Qwen2.5-VL-3B-Instruct")])
        path = Path(arg).expanduser()
        if path.is_dir():
            check_vlm_dir(path)
            from ..adapters.loading import check_pickle_policy

            check_pickle_policy(path, bool(options.get("allow_pickle")), "VLM")
        elif not path.exists():
            check_hub_model(arg)  # an unreachable hub fails here, in seconds, before any model loads

    def __init__(
        self,
        path_or_id: str | Path,
        device: str = "cpu",
        dtype: Any = None,
        max_new_tokens: int = 120,
        min_new_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float | None = None,
        max_image_side: int = 448,
        model: Any = None,
        processor: Any = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        mode: str = "compare",
        caption_prompt: str = CAPTION_PROMPT,
        min_share_difference: float = 0.5,
        min_examples: int = 3,
    ) -> None:
        if path_or_id is None or not str(path_or_id).strip():
            raise ValueError("the hf backend needs a model directory or hub id: backend='hf:PATH_OR_ID'")
        # the declared options check themselves (the same checks the command line runs): written once
        validate_options(HFOptions, {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
                                      "temperature": temperature, "top_p": top_p, "max_image_side": max_image_side,
                                      "mode": mode, "caption_prompt": caption_prompt,
                                      "min_share_difference": min_share_difference, "min_examples": min_examples},
                         "the hf backend")
        if min_new_tokens is not None and min_new_tokens > max_new_tokens:  # across two options
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens!r}")
        self.path_or_id = str(path_or_id)
        self.device = check_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_new_tokens = int(max_new_tokens)
        self.min_new_tokens = None if min_new_tokens is None else int(min_new_tokens)
        self.temperature = float(temperature)
        self.top_p = top_p
        self.max_image_side = int(max_image_side)
        self.trust_remote_code = bool(trust_remote_code)
        self.allow_pickle = bool(allow_pickle)
        self.mode = str(mode)
        self.caption_prompt = str(caption_prompt)
        self.min_share_difference = float(min_share_difference)
        self.min_examples = int(min_examples)
        # a captioner's answers come from the traversal's bases, not from resampling one prompt
        self.samples_from_bases = self.mode == "caption_compare"  # type: ignore[misc]
        self.generate_calls = 0
        self._lock = threading.Lock()  # one generate at a time per model
        self._revision: str | None = None
        if model is not None and processor is not None:
            self.model, self.processor = model, processor
        elif model is not None or processor is not None:
            raise ValueError("give both model and processor, or neither (then they are loaded from path_or_id)")
        else:
            self.model, self.processor = self._load()
        if getattr(self.processor, "image_processor", None) is None:
            raise BackendError(_NO_PROCESSOR.format(path=self.path_or_id))
        if not hasattr(self.processor, "apply_chat_template"):
            raise BackendError(f"the processor of {self.path_or_id} has no apply_chat_template")
        self.model.eval()

    # -- loading -----------------------------------------------------------------------------
    def _load(self) -> tuple[Any, Any]:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = self.path_or_id
        local = Path(os.path.expanduser(source))
        if local.is_dir():
            check_vlm_dir(local)
            source = str(local)
            self._revision = _fingerprint(local)
        elif _looks_like_path(source) or local.exists():
            raise BackendError(f"{source}: no such model directory (give a directory with model and processor, or a hub id)")
        else:
            check_hub_model(source)  # seconds, not the minutes of transformers' retries
        from ..adapters.loading import check_pickle_policy, use_safetensors

        if local.is_dir():
            try:
                check_pickle_policy(local, self.allow_pickle, "VLM")
            except ValueError as exc:
                raise BackendError(str(exc)) from None
        kwargs = {"trust_remote_code": self.trust_remote_code}
        try:
            processor = AutoProcessor.from_pretrained(source, **kwargs)
        except OSError as exc:
            raise BackendError(self._load_error(source, "processor", exc)) from None
        import transformers

        # transformers 5 calls it dtype; 4.x took torch_dtype
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                source, **{dtype_key: self.dtype}, use_safetensors=use_safetensors(self.allow_pickle, local if local.is_dir() else None),
                **kwargs)
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc):
                raise BackendError(
                    f"{source} is not an image-text-to-text model (AutoModelForImageTextToText cannot load "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}); the hf backend needs a multimodal model"
                ) from None
            raise BackendError(f"cannot load the model from {source}: {exc}") from None
        except OSError as exc:
            raise BackendError(self._load_error(source, "model", exc)) from None
        return model.to(self.device), processor

    @staticmethod
    def _load_error(source: str, what: str, exc: Exception) -> str:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if Path(source).is_dir():
            return f"cannot load the {what} from {source}: {first}"
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set: only models already in the local hub cache can be loaded)" if offline else ""
        return f"cannot load the {what} {source!r} from the hub or its local cache{hint}: {first}"

    # -- description ---------------------------------------------------------------------------
    def describe(self) -> dict:
        settings = {k: v for k, v in self.sampling_params().items() if k != "revision"}
        return {"name": self.name, "model": self.path_or_id, "architecture": type(self.model).__name__,
                "device": self.device} | settings

    def sampling_params(self) -> dict:
        """What changes the answers (cache keys): sampling settings, dtype and the weights' fingerprint."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_image_side": self.max_image_side,
            "revision": self._revision,
        } | ({"mode": self.mode, "caption_prompt": self.caption_prompt, "min_share_difference": self.min_share_difference,
              "min_examples": self.min_examples} if self.mode != "compare" else {})

    # -- explaining ----------------------------------------------------------------------------
    def _image(self, image: Any) -> Any:
        from PIL import Image

        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(bytes(image)))
        if not (hasattr(image, "size") and hasattr(image, "convert")):
            raise TypeError(f"prompt images must be PIL images or PNG bytes, got {type(image).__name__}")
        image = image.convert("RGB")
        w, h = image.size
        side = max(w, h)
        if side > self.max_image_side:
            scale = self.max_image_side / side
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        return image

    def messages(self, prompt: Prompt, system_role: bool = True) -> list[dict]:
        """The chat sent to the processor's template: optional system text, then images and text.

        ``system_role=False`` puts the system text in front of the user text instead (for chat
        templates that refuse a system turn)."""
        text = prompt.text if system_role or not prompt.system else f"{prompt.system}\n\n{prompt.text}"
        content: list[dict] = [{"type": "image", "image": self._image(img)} for img in prompt.images]
        content.append({"type": "text", "text": text})
        messages: list[dict] = []
        if prompt.system and system_role:
            messages.append({"role": "system", "content": [{"type": "text", "text": prompt.system}]})
        messages.append({"role": "user", "content": content})
        return messages

    def _encode(self, prompt: Prompt) -> Any:
        def render(system_role: bool) -> Any:
            return self.processor.apply_chat_template(
                self.messages(prompt, system_role), add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors="pt",
            )

        if not prompt.system:
            return render(True)
        try:
            return render(True)
        except Exception:  # e.g. jinja2 "System role not supported" (Gemma, some Mistral templates)
            return render(False)

    def explain(self, traversal: Traversal, prompt: Prompt, n: int) -> list[Response]:
        import torch

        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return []
        if self.mode == "caption_compare":
            return self._explain_by_captions(traversal, n)
        inputs = self._encode(prompt).to(self.model.device)
        if "pixel_values" in inputs and torch.is_floating_point(inputs["pixel_values"]):
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_len = inputs["input_ids"].shape[1]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        kwargs: dict[str, Any] = {
            "do_sample": True,
            "num_return_sequences": n,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }
        if self.min_new_tokens is not None:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is not None:
            kwargs["pad_token_id"] = pad
        with self._lock, torch.inference_mode():
            self.generate_calls += 1
            output = self.model.generate(**inputs, **kwargs)
        sequences = output.sequences if hasattr(output, "sequences") else output
        new_tokens = sequences[:, prompt_len:]
        if new_tokens.shape[0] != n:
            raise BackendError(f"{self.path_or_id}: generate returned {new_tokens.shape[0]} sequences for n={n}")
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        eos = self._eos_ids(tokenizer)
        out = []
        lengths = []
        for i, text in enumerate(texts):
            response = clean_response(text)
            length, finish = _finish(new_tokens[i].tolist(), eos, pad, self.max_new_tokens)
            lengths.append(length)
            response.meta = {"model": self.path_or_id, "sample": i, "new_tokens": length, "finish_reason": finish}
            out.append(response)
        # one generate call: the prompt is encoded once, so its tokens are counted once
        out[0].meta["usage"] = {"prompt_tokens": int(prompt_len), "completion_tokens": int(sum(lengths)), "requests": 1}
        return out

    # -- caption-then-compare ------------------------------------------------------------------
    def caption_images(self, images: Sequence[Any], do_sample: bool = False, batch_size: int = 32,
                       usage: dict[str, int] | None = None) -> list[str]:
        """One caption per image (PIL image, PNG bytes or a ``(C, H, W)`` tensor in [0, 1]): the chat
        ``[user: image + caption_prompt]``, greedy unless ``do_sample`` (then ``temperature`` / ``top_p``),
        batched ``batch_size`` images per ``generate`` call; only the new tokens are decoded. ``usage``,
        when given, is incremented with ``prompt_tokens``, ``completion_tokens`` and ``requests``."""
        import torch

        pil = [self._image(_to_pil(im)) for im in images]
        if not pil:
            return []
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        chat = [{"role": "user", "content": [{"type": "image", "image": pil[0]},
                                             {"type": "text", "text": self.caption_prompt}]}]
        text = self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": self.max_new_tokens}
        if do_sample:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        if self.min_new_tokens is not None:
            kwargs["min_new_tokens"] = self.min_new_tokens
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is not None:
            kwargs["pad_token_id"] = pad
        captions: list[str] = []
        for start in range(0, len(pil), batch_size):
            chunk = pil[start:start + batch_size]
            # one list of images per text (every processor accepts it); left padding keeps each prompt's
            # end next to its new tokens when image token counts differ
            inputs = self.processor(images=[[im] for im in chunk], text=[text] * len(chunk), padding=True,
                                    padding_side="left", return_tensors="pt").to(self.model.device)
            if "pixel_values" in inputs and torch.is_floating_point(inputs["pixel_values"]):
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            with self._lock, torch.inference_mode():
                self.generate_calls += 1
                output = self.model.generate(**inputs, **kwargs)
            sequences = output.sequences if hasattr(output, "sequences") else output
            new = sequences[:, inputs["input_ids"].shape[1]:]
            captions += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
            if usage is not None:
                eos = self._eos_ids(tokenizer)
                usage["prompt_tokens"] = usage.get("prompt_tokens", 0) + int(inputs["attention_mask"].sum())
                usage["completion_tokens"] = usage.get("completion_tokens", 0) + sum(
                    _finish(row.tolist(), eos, pad, self.max_new_tokens)[0] for row in new)
                usage["requests"] = usage.get("requests", 0) + 1
        return captions

    def _explain_by_captions(self, traversal: Traversal, n: int) -> list[Response]:
        images = traversal.images
        n_bases, n_rows, n_steps = images.shape[:3]
        if n_bases < 1 or n_rows < 1 or n_steps < 2:
            raise BackendError(f"caption_compare needs a traversal with at least 1 base, 1 row and 2 steps, got "
                               f"{n_bases} bases, {n_rows} rows, {n_steps} steps")
        bases = [i % n_bases for i in range(n)]
        # (sample, row) -> the captions of the row's first and last frames; greedy for the first pass
        # over the bases, sampled for repeats (else a repeat would copy the first answer)
        frames = {False: [], True: []}
        for i, b in enumerate(bases):
            for r in range(n_rows):
                frames[i >= n_bases] += [images[b, r, 0], images[b, r, -1]]
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        captions = {sampled: iter(self.caption_images(frames[sampled], do_sample=sampled, usage=usage))
                    for sampled in (False, True)}
        out = []
        for i, b in enumerate(bases):
            source = captions[i >= n_bases]
            pairs = [(next(source), next(source)) for _ in range(n_rows)]
            text, claims, abstained = compare_captions(pairs, traversal.latent_id)
            out.append(Response(text=text, abstained=abstained, meta={
                "model": self.path_or_id, "mode": self.mode, "sample": i, "base": b, "sampled_captions": i >= n_bases,
                "captions": [list(p) for p in pairs], "claims": claims}))
        out[0].meta["usage"] = usage  # counted once, on the first answer (as in compare mode)
        return out

    def explain_examples(self, examples: Any, prompt: Prompt, n: int) -> list[Response]:
        """A feature's example set: in ``compare`` mode the prompt goes through :meth:`explain`; in
        ``caption_compare`` mode every firing and non-firing image is captioned (greedy, batched) and
        :func:`contrast_captions` names the caption word over-represented where the feature fires.

        Answer ``k`` contrasts the captions of the k-th of ``n`` disjoint subsets of the firing images
        (every n-th by activation, as the offline explainer does) with those of all non-firing images:
        the n answers then rest on different images, so they agree only when the word holds across the
        firing set (sampled captions of the same images would only measure caption noise)."""
        if self.mode != "caption_compare":
            return self.explain(examples.as_traversal(), prompt, n)
        return self._explain_examples_by_captions(examples, n)

    def _explain_examples_by_captions(self, examples: Any, n: int) -> list[Response]:
        import torch

        from ..types import ExampleSet

        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not isinstance(examples, ExampleSet):
            raise BackendError(f"explain_examples needs an ExampleSet, got {type(examples).__name__}")
        if n == 0:
            return []
        lid = examples.latent_id
        k, m = examples.n_active, examples.n_inactive
        base = {"model": self.path_or_id, "mode": self.mode}
        if k == 0:
            return [Response(text=f"No visible difference: {lid} never fires on these images (a dead feature).",
                             abstained=True, meta=base | {"named": [], "claims": [], "reason": "dead"})
                    for _ in range(n)]
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        captions = self.caption_images([*examples.activating, *examples.inactive], usage=usage)
        firing, others = captions[:k], captions[k:]
        order = torch.argsort(examples.activations.float(), descending=True, stable=True).tolist()
        out = []
        for j in range(n):
            subset = order[j::n]
            text, claims, abstained, detail = contrast_captions(
                [firing[i] for i in subset], others, lid, self.min_share_difference, self.min_examples)
            meta = base | {"subset": j, "n_firing": len(subset), "n_not_firing": m, "claims": claims} | detail
            out.append(Response(text=text, abstained=abstained,
                                meta=meta | {"captions": [firing[i] for i in subset]}))
        out[0].meta["usage"] = usage
        out[0].meta["not_firing_captions"] = others
        return out

    def _eos_ids(self, tokenizer: Any) -> set[int]:
        """The token ids that end an answer (generation config first, then the tokenizer)."""
        ids: set[int] = set()
        config = getattr(self.model, "generation_config", None)
        for value in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    def __repr__(self) -> str:
        return f"HFBackend({self.path_or_id!r}, device={self.device!r}, dtype={str(self.dtype).removeprefix('torch.')})"


def _to_pil(image: Any) -> Any:
    """A ``(C, H, W)`` float tensor in [0, 1] (a traversal frame) -> PIL RGB; anything else as is."""
    if hasattr(image, "detach") and getattr(image, "ndim", 0) == 3:
        from PIL import Image

        frame = image.detach().float().clamp(0, 1).mul(255).round().byte().cpu()
        if frame.shape[0] == 1:
            frame = frame.expand(3, -1, -1)
        return Image.fromarray(frame[:3].permute(1, 2, 0).numpy())
    return image


#: Caption words per attribute, in level order (the index of a word is its level) for ordered
#: attributes; the demo VLM's caption vocabulary (``vlm.captions.ATTRIBUTES``) plus a few common words.
#: Kept here, not imported from ``vlm``: backends come before the multimodal demo in the data flow.
CAPTION_WORDS: dict[str, tuple[str, ...]] = {
    "size": ("tiny", "small", "medium", "large", "huge"),
    "colour": ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"),
    "shape": ("square", "ellipse", "triangle", "circle", "heart", "star", "rectangle", "diamond"),
    "vertical": ("top", "middle", "bottom"),
    "horizontal": ("left", "centre", "right"),
    "background": ("dark", "grey"),
}
_WORD_ALIASES = {"center": "centre", "gray": "grey", "big": "large", "little": "small", "oval": "ellipse"}
_CAPTION_WORD = {w: a for a, words in CAPTION_WORDS.items() for w in words}
_CAPTION_TOKEN = re.compile(r"[a-z]+")

# caption attribute -> (claim attribute in uncertainty.claims' vocabulary, whether a later word is
# the "+" direction); vertical words run top -> bottom, so moving to a later word is moving down ("-")
_ORDERED = {"size": ("size", True), "vertical": ("vertical_position", False),
            "horizontal": ("horizontal_position", True), "background": ("background_brightness", True)}


def read_caption(text: str) -> dict[str, str | None]:
    """``{attribute: word or None}``: an attribute of :data:`CAPTION_WORDS` gets a word when the
    caption names exactly one distinct word of it (aliases such as "center", "gray" folded in)."""
    found: dict[str, set[str]] = {a: set() for a in CAPTION_WORDS}
    for token in _CAPTION_TOKEN.findall(str(text).lower()):
        token = _WORD_ALIASES.get(token, token)
        if token in _CAPTION_WORD:
            found[_CAPTION_WORD[token]].add(token)
    return {a: (next(iter(w)) if len(w) == 1 else None) for a, w in found.items()}


def _phrase(attribute: str, start: str, end: str, later: bool) -> str:
    if attribute == "vertical":
        return f"moves the object {'down' if later else 'up'} from the {start} to the {end}"
    if attribute == "horizontal":
        return f"moves the object {'right' if later else 'left'} from the {start} to the {end}"
    if attribute == "size":
        return f"makes the object {'grow' if later else 'shrink'} from {start} to {end}"
    if attribute == "colour":
        return f"changes the object's colour from {start} to {end}"
    if attribute == "shape":
        return f"changes the object's shape from {start} to {end}"
    return f"{'brightens' if later else 'darkens'} the background from {start} to {end}"


def compare_captions(pairs: Sequence[tuple[str, str]], latent: str = "the latent") -> tuple[str, list[dict], bool]:
    """What changed between captions: ``(text, claims, abstained)`` for ``pairs`` of (first frame's
    caption, last frame's caption), one pair per traversal row.

    Each caption is read into one word per attribute (size, colour, shape, vertical, horizontal,
    background; :func:`read_caption`). An attribute changes when it names different words at the two
    ends in more than half of the rows, and, for ordered attributes, in the same direction in all of
    them; the most common (start, end) words are named, changes in more rows first (ties: the change
    more rows name with the same words first): "Increasing z3 moves the object right from the left
    to the right." Claims are ``uncertainty.claims.Claim.to_json()`` dicts (``horizontal_position +``,
    ``colour red->blue``, ...). No changed attribute: an abstention when the captions are the same or
    their attribute words change in too few rows (caption noise); captions without attribute words
    that differ are quoted (first row), with no claims."""
    if not pairs:
        raise ValueError("compare_captions needs at least one (first, last) caption pair")
    parsed = [(read_caption(a), read_caption(b)) for a, b in pairs]
    found: list[tuple[int, int, int, str, str, str, bool]] = []
    for order, (attribute, words) in enumerate(CAPTION_WORDS.items()):
        moves = [(a[attribute], b[attribute]) for a, b in parsed
                 if a[attribute] and b[attribute] and a[attribute] != b[attribute]]
        if 2 * len(moves) <= len(pairs):
            continue
        later = {words.index(b) > words.index(a) for a, b in moves}
        if attribute in _ORDERED and len(later) > 1:
            continue  # rows disagree on the direction
        (start, end), same = Counter(moves).most_common(1)[0]
        # rank: rows that change, then rows that name the very same change, then attribute order
        found.append((-len(moves), -same, order, attribute, start, end, words.index(end) > words.index(start)))
    if not found:
        first, last = pairs[0]
        if all(a.strip().lower() == b.strip().lower() for a, b in pairs):
            return f"No visible change: the captions stay the same as {latent} changes (\"{first}\").", [], True
        if any(w for a, b in parsed for w in (*a.values(), *b.values())):  # attribute words, but no consistent change
            return (f"No consistent change: the captions of the first and last frames name different attributes in "
                    f"at most half of the rows, or disagree on the direction, as {latent} changes."), [], True
        return f"As {latent} increases, the caption changes from \"{first}\" to \"{last}\".", [], False
    phrases, claims = [], []
    for *_, attribute, start, end, later in sorted(found):
        phrases.append(_phrase(attribute, start, end, later))
        if attribute in _ORDERED:
            name, plus_is_later = _ORDERED[attribute]
            claims.append({"attribute": name, "direction": "+" if later == plus_is_later else "-"})
        elif attribute == "colour":
            claims.append({"attribute": "colour", "start": start, "end": end})
        else:
            claims.append({"attribute": "shape"})
    # commas between phrases: one clause per change, as the claim parser reads text
    joined = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + ", and " + phrases[-1]
    return f"Increasing {latent} {joined}.", claims, False


# caption attribute -> phrase per word, for "f7 fires <phrase>"
_WHERE = {"vertical": {"top": "when the object is near the top", "middle": "when the object is at middle height",
                       "bottom": "when the object is near the bottom"},
          "horizontal": {"left": "when the object is on the left", "centre": "when the object is in the centre",
                         "right": "when the object is on the right"}}


def _contrast_phrase(attribute: str, word: str) -> str:
    if attribute in _WHERE and word in _WHERE[attribute]:
        return _WHERE[attribute][word]
    if attribute == "background":
        return f"where the background is {word}"
    if attribute == "shape":
        return f"on {word}s"
    return f"on {word} objects"  # colour, size


def _contrast_claim(attribute: str, word: str) -> dict[str, str]:
    """The claim of "fires on <word>", in the vocabulary of the offline contrastive answers: the
    feature rising goes with the attribute at a low (``-``) or high (``+``) level (image up is ``+``);
    the middle level has no direction; a colour is the hue it prefers."""
    if attribute == "colour":
        return {"attribute": "colour", "end": word}
    if attribute == "shape":
        return {"attribute": "shape"}
    name, plus_is_later = _ORDERED[attribute]
    words = CAPTION_WORDS[attribute]
    middle = (len(words) - 1) / 2  # "medium", "middle", "centre": no direction
    level = words.index(word)
    if level == middle:
        return {"attribute": name}
    return {"attribute": name, "direction": "+" if (level > middle) == plus_is_later else "-"}


def contrast_captions(firing: Sequence[str], not_firing: Sequence[str], latent: str = "the feature",
                      min_share_difference: float = 0.5, min_examples: int = 3
                      ) -> tuple[str, list[dict], bool, dict[str, Any]]:
    """Which caption word is over-represented where a feature fires: ``(text, claims, abstained, detail)``.

    Each caption is read into one word per attribute (:func:`read_caption`). For every word, its
    share among the ``firing`` captions minus its share among the ``not_firing`` ones; the word with
    the largest difference (ties: the larger firing share, then the order of :data:`CAPTION_WORDS`) is
    named when that reaches ``min_share_difference`` ("f7 fires on green objects"), and a second word of another attribute when its difference is at least halfway from
    the threshold to 1 (as the offline contrastive explainer names a second property). Abstains with
    fewer than ``min_examples`` captions on either side or when no word reaches the threshold.
    ``detail``: ``shares`` (every word's difference, largest first, rounded), ``named`` (words) and
    ``reason`` when it abstained.

    The default 0.5 was measured with the demo VLM (docs/backends.md, "Why 0.5"): per feature (5
    answers of 3 firing vs 15 non-firing captions, judged by certainty) it is clear on random splits
    1.0 % of the time and names the true word for 82 % of pure and 48 % of 80 %-pure firing sets; 0.85
    (the best threshold per single answer) drops the 80 %-pure sets to 22 %."""
    firing, not_firing = list(firing), list(not_firing)
    if len(firing) < min_examples or len(not_firing) < min_examples:
        return (f"No visible difference: too few examples to compare ({len(firing)} firing images in this answer, "
                f"{len(not_firing)} not firing; at least {min_examples} of each are needed)."), [], True, {
                    "shares": {}, "named": [], "reason": "too few examples"}
    read_f, read_n = [read_caption(c) for c in firing], [read_caption(c) for c in not_firing]
    diffs: list[tuple[float, float, int, str, str]] = []
    for order, (attribute, words) in enumerate(CAPTION_WORDS.items()):
        for word in words:
            share_f = sum(r[attribute] == word for r in read_f) / len(read_f)
            share_n = sum(r[attribute] == word for r in read_n) / len(read_n)
            if share_f > 0:
                # rounded: 2/3 - 1/6 must reach a threshold of 0.5
                diffs.append((round(share_f - share_n, 9), share_f, -order, attribute, word))
    diffs.sort(reverse=True)
    shares = {f"{a}:{w}": round(d, 4) for d, _, _, a, w in diffs}
    if not diffs or diffs[0][0] < min_share_difference:
        best = f" (largest share difference {diffs[0][0]:.2f}, {diffs[0][4]})" if diffs else ""
        return (f"No visible difference: no caption word separates the images where {latent} fires from those "
                f"where it does not{best}."), [], True, {"shares": shares, "named": [], "reason": "no separation"}
    top, _, _, attribute, word = diffs[0]
    picked = [(attribute, word)]
    second = next((d for d in diffs[1:] if d[3] != attribute), None)
    if second is not None and second[0] >= (1.0 + min_share_difference) / 2:
        picked.append((second[3], second[4]))
    text = f"{latent} fires {' and '.join(_contrast_phrase(a, w) for a, w in picked)}."
    return text, [_contrast_claim(a, w) for a, w in picked], False, {"shares": shares, "named": [w for _, w in picked]}
