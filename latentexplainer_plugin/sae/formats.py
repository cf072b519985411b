"""Read SAEs in the layouts people publish, told apart by the files present; write SAELens layout.

Every layout is an ``SAEFormat`` in the ``sae_formats`` registry (built-ins from
``default_plugins/sae_formats.py``, others through ``latentexplainer_register_sae_formats``);
:func:`load_sae` asks the registry which one recognises a folder.

=====================  ====================================  =======================================
layout                 files                                 tensors (shapes)
=====================  ====================================  =======================================
SAELens                ``cfg.json``,                         ``W_enc`` (d_in, d_sae), ``b_enc``,
                       ``sae_weights.safetensors``           ``W_dec`` (d_sae, d_in), ``b_dec``,
                                                             ``threshold`` (jumprelu)
sparsify (EleutherAI)  ``cfg.json``, ``sae.safetensors``     ``encoder.weight`` (d_sae, d_in),
                       (one folder per hookpoint)            ``encoder.bias``, ``W_dec`` (d_sae, d_in),
                                                             ``b_dec``
dictionary_learning    ``ae.pt``, ``config.json``            by ``config["trainer"]["dict_class"]``
=====================  ====================================  =======================================

The mapping of each layout onto :class:`SparseAutoencoder` follows the libraries' own encode
functions (read in their sources: SAELens 6 ``saes/*.py``, sparsify ``sparse_coder.py``,
dictionary_learning ``dictionary.py`` / ``trainers/top_k.py`` / ``trainers/batch_top_k.py``).
Tensors are read as float32. ``ae.pt`` is a pickle: like every pickle in this project it is read
only with ``allow_pickle=True``, and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import LatentExplainerError, PluginError
from ..safe_load import load_safetensors, load_weights, read_config
from .model import ARCHITECTURES, SAEError, SparseAutoencoder

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
DL_CONFIG, DL_WEIGHTS = "config.json", "ae.pt"

#: The built-in layouts -> the files each needs (``default_plugins/sae_formats.py`` registers them).
LAYOUTS: dict[str, tuple[str, ...]] = {
    "saelens": (SAELENS_CFG, SAELENS_WEIGHTS),
    "sparsify": (SPARSIFY_CFG, SPARSIFY_WEIGHTS),
    "dictionary_learning": (DL_WEIGHTS, DL_CONFIG),
}
DL_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder")


@dataclass(frozen=True)
class SAEFormat:
    """One SAE file format, as registered through ``latentexplainer_register_sae_formats``.

    ``detect(folder) -> bool`` says from the files whether ``folder`` holds an SAE in this format
    (cheap: look at file names, read a config at most); ``load(folder, *, allow_pickle, **kwargs)``
    returns a :class:`SparseAutoencoder`. ``files`` (the files it needs) or ``description`` is
    shown when no format recognises a folder. Any object with ``detect`` and ``load`` works too.
    """

    detect: Callable[[Path], bool]
    load: Callable[..., SparseAutoencoder]
    files: tuple[str, ...] = ()
    description: str = ""


def has_files(*files: str) -> Callable[[Path], bool]:
    """A ``detect`` that is true when every one of ``files`` is in the folder."""
    def detect(folder: Path) -> bool:
        return all((Path(folder) / f).is_file() for f in files)

    return detect


def _formats() -> list[Any]:
    """The registered formats, in registration order (built-ins first)."""
    from ..plugins import registry

    return list(registry("sae_formats").entries.values())


def _detects(entry: Any, path: Path) -> bool:
    try:
        return bool(entry.factory.detect(path))
    except LatentExplainerError:
        raise
    except Exception as exc:  # a plugin's bug: name it instead of a bare traceback
        raise PluginError(f"SAE format {entry.name!r} ({entry.plugin}, {entry.distribution}) failed in "
                          f"detect({path}): {type(exc).__name__}: {exc}") from exc


def detect_layout(path: str | Path) -> str | None:
    """The name of the first registered SAE format (built-ins first) that recognises folder ``path``, or None."""
    path = Path(path)
    return next((entry.name for entry in _formats() if _detects(entry, path)), None)


def _expects(fmt: Any) -> str:
    files = tuple(getattr(fmt, "files", ()) or ())
    return " + ".join(files) if files else (str(getattr(fmt, "description", "") or "") or "(the plugin does not say)")


def _layouts_text() -> str:
    return "; ".join(f"{entry.name}: {_expects(entry.factory)}" for entry in _formats())


def load_sae(path: str | Path, *, hookpoint: str | None = None, allow_pickle: bool = False,
             device: str = "cpu", format: str | None = None) -> SparseAutoencoder:
    """Load a saved SAE in any registered format (SAELens, sparsify, dictionary_learning, or a plugin's).

    ``path`` is the SAE's folder (or a file in it); the first registered format whose
    ``detect`` recognises it loads it, unless ``format`` names the one to use. ``hookpoint``
    picks one SAE from a run folder that holds one sub-folder per hookpoint (sparsify).
    ``allow_pickle`` is needed for dictionary_learning's ``ae.pt``. Raises :class:`SAEError` (or
    ``LoadError`` for an unreadable file) saying what is missing or wrong, and
    ``UnknownComponentError`` for a ``format`` no plugin registered.
    """
    from ..plugins import registry

    forced = registry("sae_formats").get(format) if format is not None else None
    path = Path(path)
    if not path.exists():
        raise SAEError(f"SAE path {path} does not exist")
    if path.is_file():
        path = path.parent
    if hookpoint is not None:
        path = path / hookpoint
        if not path.is_dir():
            raise SAEError(f"no hookpoint folder {path}; hookpoints in {path.parent}: "
                           f"{', '.join(_hookpoints(path.parent)) or '(none)'}")
    if forced is not None and not _detects(forced, path):
        raise SAEError(f"{path} is not in the {forced.name!r} format: it expects {_expects(forced.factory)}. "
                       f"Found: {_found(path)}")
    entry = forced or next((e for e in _formats() if _detects(e, path)), None)
    if entry is None:
        subs = _hookpoints(path)
        if subs:
            raise SAEError(f"{path} holds one SAE per hookpoint ({', '.join(subs[:10])}{', ...' if len(subs) > 10 else ''}); "
                           "pass hookpoint=NAME or the sub-folder's path")
        raise SAEError(f"{path} is not an SAE folder in a known layout; each layout needs these files: "
                       f"{_layouts_text()}. Found: {_found(path)}")
    sae = entry.factory.load(path, allow_pickle=allow_pickle)
    if not isinstance(sae, SparseAutoencoder):
        raise SAEError(f"SAE format {entry.name!r} ({entry.plugin}, {entry.distribution}) returned "
                       f"{type(sae).__name__}, not a SparseAutoencoder")
    sae.meta.setdefault("layout", entry.name)
    sae.meta.setdefault("path", str(path))
    return sae.to(device)


def _found(path: Path) -> str:
    present = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else []
    return ", ".join(present) or "(nothing)"


def _hookpoints(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.is_dir() and detect_layout(p) is not None)


def _need(state: dict[str, torch.Tensor], names: tuple[str, ...], where: Path) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise SAEError(f"{where} has no tensor(s) {', '.join(missing)}; it holds: {', '.join(sorted(state)[:12])}")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _int_option(cfg: dict[str, Any], key: str, where: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SAEError(f"{where}: {key} must be an integer, got {value!r}")
    return value


# -- SAELens
def _saelens_architecture(cfg: dict[str, Any]) -> str:
    arch = cfg.get("architecture")
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if arch is None:  # configs written before SAELens 6 name the activation only
        arch = "topk" if activation == "topk" else "standard"
    if arch == "standard" and activation not in (None, "relu", "topk"):
        raise SAEError(f"SAELens activation_fn {activation!r} is not supported (supported: relu, topk)")
    return arch


def read_saelens(path: Path, *, allow_pickle: bool = False, **kwargs: Any) -> SparseAutoencoder:
    """The SAE in SAELens folder ``path`` (``cfg.json`` + ``sae_weights.safetensors``)."""
    cfg = read_config(path / SAELENS_CFG)
    where = path / SAELENS_CFG
    arch = _saelens_architecture(cfg)
    if arch not in ARCHITECTURES:
        raise SAEError(f"{where}: unknown SAE architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    norm = cfg.get("normalize_activations", "none")
    if norm in (None, False):
        norm = "none"
    if norm != "none":
        raise SAEError(
            f"{where}: normalize_activations={norm!r} is not supported (supported: 'none'). The SAE expects "
            "rescaled inputs; fold the scaling into its weights first (SAELens: "
            "fold_activation_norm_scaling_factor) and save it again")
    reshape = cfg.get("reshape_activations", "none") or "none"
    if reshape != "none":
        raise SAEError(f"{where}: reshape_activations={reshape!r} is not supported (supported: 'none')")
    if cfg.get("finetuning_scaling_factor"):
        raise SAEError(f"{where}: finetuning_scaling_factor is not supported")
    state = load_safetensors(path / SAELENS_WEIGHTS)
    _need(state, ("W_enc", "b_enc", "W_dec", "b_dec"), path / SAELENS_WEIGHTS)
    k = None
    if arch == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        cfg = dict(cfg, k=cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None))
        k = _int_option(cfg, "k", where)
    threshold = None
    if arch == "jumprelu":
        if "threshold" in state:
            threshold = _f32(state["threshold"])
        elif "log_threshold" in state:  # a training checkpoint
            threshold = _f32(state["log_threshold"]).exp()
        else:
            raise SAEError(f"{path / SAELENS_WEIGHTS}: a jumprelu SAE needs a 'threshold' tensor; it holds: "
                           f"{', '.join(sorted(state))}")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    sae = SparseAutoencoder(
        _f32(state["W_enc"]), _f32(state["b_enc"]), _f32(state["W_dec"]), _f32(state["b_dec"]), arch, k=k,
        threshold=threshold, apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        site=hook if isinstance(hook, str) and hook else None,
        meta={"hook_name": hook, "model_name": meta.get("model_name") or cfg.get("model_name")})
    _check_declared(sae, cfg, where)
    return sae


def _check_declared(sae: SparseAutoencoder, cfg: dict[str, Any], where: Path) -> None:
    for key, actual in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        declared = cfg.get(key)
        if declared is not None and declared != actual:
            raise SAEError(f"{where} says {key}={declared}, but the weights have {key}={actual}")


# -- sparsify
def read_sparsify(path: Path, *, allow_pickle: bool = False, **kwargs: Any) -> SparseAutoencoder:
    """The SAE in sparsify hookpoint folder ``path`` (``cfg.json`` + ``sae.safetensors``)."""
    cfg = read_config(path / SPARSIFY_CFG)
    where = path / SPARSIFY_CFG
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAEError(f"{where}: sparsify activation {activation!r} is not supported (supported: topk)")
    if cfg.get("transcode"):
        raise SAEError(f"{where}: this is a transcoder (transcode=true), which maps one site to another; "
                       "only sparse autoencoders of one site are supported")
    state = load_safetensors(path / SPARSIFY_WEIGHTS)
    if cfg.get("skip_connection") or "W_skip" in state:
        raise SAEError(f"{where}: SAEs with a skip connection (W_skip) are not supported")
    _need(state, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path / SPARSIFY_WEIGHTS)
    k = _int_option(cfg, "k", where)
    sae = SparseAutoencoder(
        _f32(state["encoder.weight"]).T.contiguous(), _f32(state["encoder.bias"]), _f32(state["W_dec"]),
        _f32(state["b_dec"]), "topk", k=k, apply_b_dec_to_input=True, site=None,
        meta={"hook_name": path.name})
    declared = {"d_in": cfg.get("d_in")}
    if cfg.get("num_latents"):
        declared["d_sae"] = cfg["num_latents"]
    _check_declared(sae, declared, where)
    return sae


# -- dictionary_learning
def read_dictionary_learning(path: Path, *, allow_pickle: bool = False, **kwargs: Any) -> SparseAutoencoder:
    """The SAE in dictionary_learning folder ``path`` (``ae.pt`` + ``config.json``; needs ``allow_pickle=True``)."""
    config = read_config(path / DL_CONFIG)
    where = path / DL_CONFIG
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    cls = trainer.get("dict_class")
    if cls not in DL_CLASSES:
        raise SAEError(f"{where}: dictionary_learning dict_class {cls!r} is not supported (supported: "
                       f"{', '.join(DL_CLASSES)})")
    if not allow_pickle:
        raise SAEError(f"{path / DL_WEIGHTS} is a pickle (torch.save) file; pickles can run code when loaded, so they "
                       "are refused by default. Pass allow_pickle=True to read it with "
                       "torch.load(weights_only=True), which reads tensors only")
    state = load_weights(path / DL_WEIGHTS, allow_pickle=True)
    weights = path / DL_WEIGHTS
    meta = {"hook_name": trainer.get("submodule_name"), "model_name": trainer.get("lm_name"), "dict_class": cls}
    if cls == "JumpReluAutoEncoder":
        _need(state, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), weights)
        sae = SparseAutoencoder(_f32(state["W_enc"]), _f32(state["b_enc"]), _f32(state["W_dec"]), _f32(state["b_dec"]),
                                "jumprelu", threshold=_f32(state["threshold"]), apply_b_dec_to_input=False, meta=meta)
    elif cls == "AutoEncoder":
        _need(state, ("encoder.weight", "encoder.bias", "decoder.weight", "bias"), weights)
        sae = SparseAutoencoder(_f32(state["encoder.weight"]).T.contiguous(), _f32(state["encoder.bias"]),
                                _f32(state["decoder.weight"]).T.contiguous(), _f32(state["bias"]), "standard",
                                apply_b_dec_to_input=True, meta=meta)
    else:  # AutoEncoderTopK, BatchTopKSAE
        _need(state, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), weights)
        W_enc = _f32(state["encoder.weight"]).T.contiguous()
        args = (W_enc, _f32(state["encoder.bias"]), _f32(state["decoder.weight"]).T.contiguous(), _f32(state["b_dec"]))
        if cls == "AutoEncoderTopK":
            k = int(state["k"]) if "k" in state else _int_option(trainer, "k", where)
            sae = SparseAutoencoder(*args, "topk", k=k, apply_b_dec_to_input=True, meta=meta)
        else:
            # BatchTopKSAE at inference keeps ReLU(pre) where it exceeds one learned threshold
            # (-1 before any was learned): a JumpReLU whose thresholds are all equal.
            _need(state, ("threshold",), weights)
            found = _f32(state["threshold"]).flatten()
            threshold = found.expand(W_enc.shape[1]).clone() if found.numel() == 1 else found
            sae = SparseAutoencoder(*args, "jumprelu", threshold=threshold, apply_b_dec_to_input=True, meta=meta)
    _check_declared(sae, {"d_in": trainer.get("activation_dim"), "d_sae": trainer.get("dict_size")}, where)
    return sae


def save_sae(sae: SparseAutoencoder, directory: str | Path) -> Path:
    """Write ``sae`` in SAELens layout (``cfg.json`` + ``sae_weights.safetensors``); return the folder."""
    from safetensors.torch import save_file

    if not isinstance(sae, SparseAutoencoder):
        raise TypeError(f"save_sae needs a SparseAutoencoder, got {type(sae).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(sae, name).detach().to("cpu", torch.float32).contiguous()
               for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.architecture == "jumprelu":
        tensors["threshold"] = sae.threshold.detach().to("cpu", torch.float32).contiguous()
    cfg: dict[str, Any] = {
        "architecture": sae.architecture, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": sae.site, "model_name": sae.meta.get("model_name")},
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = sae.rescale_acts_by_decoder_norm
    save_file(tensors, str(directory / SAELENS_WEIGHTS))
    (directory / SAELENS_CFG).write_text(json.dumps(cfg, indent=2))
    return directory
