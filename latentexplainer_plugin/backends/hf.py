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

``generate_calls`` counts the ``generate`` calls made by this instance (tests and benchmarks).
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, Field

from ..devices import DTYPES, check_device, dtype_name
from ..errors import OptionError
from ..options import ComponentOptions, DtypeName, NonNegativeInt, PositiveFloat, PositiveInt, validate_options
from ..types import Prompt, Response, Traversal
from .base import Backend, BackendError
from .responses import clean_response

__all__ = ["HFBackend", "DTYPES", "resolve_dtype", "check_vlm_dir", "check_hub_model"]

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
            f"hf:{model_id} {problem}; give a local directory instead (--backend hf:/path/to/dir, saved with "
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
    ) -> None:
        if path_or_id is None or not str(path_or_id).strip():
            raise ValueError("the hf backend needs a model directory or hub id: --backend hf:PATH_OR_ID")
        # the declared options check themselves (the same checks the command line runs): written once
        validate_options(HFOptions, {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
                                      "temperature": temperature, "top_p": top_p, "max_image_side": max_image_side},
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
        }

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
