"""A sparse autoencoder (SAE) over the activations at one site of a model.

The parameters follow SAELens' names and shapes: ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae),
``W_dec`` (d_sae, d_in), ``b_dec`` (d_in); row k of ``W_dec`` is feature k's decoder direction.

1. Input: ``x = h - b_dec`` when ``apply_b_dec_to_input`` (else ``x = h``).
2. Pre-activation: ``pre = x @ W_enc + b_enc`` (times ``||W_dec[k]||`` per feature for TopK SAEs
   saved with ``rescale_acts_by_decoder_norm``).
3. Activation, by architecture:
   ``standard``  f = ReLU(pre);
   ``topk``      f = ReLU(pre), then all but the k largest values set to 0;
   ``jumprelu``  f = ReLU(pre) * (pre > threshold_k), one threshold per feature.
4. Decoder: ``h_hat = f @ W_dec + b_dec`` (f divided by ``||W_dec[k]||`` first when rescaled).

Feature axis. Activations of shape (B, C, H, W) (a conv feature map) are read per position, with
the features on dim 1: the SAE sees B*H*W vectors of size C, and ``encode`` returns (B, d_sae, H, W).
Any other shape ((B, D), (B, T, D), ...) has its features on the last dim. ``feature_axis=`` (on
the SAE or per call) overrides this, e.g. ``feature_axis=-1`` for a (B, H, W, C) map, which is
also 4-D. :meth:`SparseAutoencoder.check_site` applies the same rule to a probed shape.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import SAEError  # noqa: F401 (re-exported)

ARCHITECTURES = ("standard", "topk", "jumprelu")


def default_feature_axis(ndim: int) -> int:
    """The feature axis the SAE reads for an activation with ``ndim`` dims: 1 for (B, C, H, W), else the last."""
    if ndim < 2:
        raise SAEError(f"an activation needs a batch dim plus features, got {ndim} dim(s)")
    return 1 if ndim == 4 else ndim - 1


def _check_tensor(name: str, value: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise SAEError(f"SAE tensor {name} must be a torch.Tensor, got {type(value).__name__}")
    if not (value.is_floating_point()):
        raise SAEError(f"SAE tensor {name} must hold floats, got dtype {value.dtype}")
    if tuple(value.shape) != shape:
        raise SAEError(f"SAE tensor {name} has shape {tuple(value.shape)}, expected {shape} "
                       "(W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,), threshold (d_sae,))")
    bad = ~torch.isfinite(value)
    if bad.any():
        n_nan = int(torch.isnan(value).sum())
        raise SAEError(f"SAE tensor {name} contains {int(bad.sum())} non-finite values ({n_nan} NaN, "
                       f"{int(bad.sum()) - n_nan} inf) out of {value.numel()}; the SAE weights are broken")
    return value.detach().clone()


def parse_features(features: str | Sequence[int] | None, d_sae: int) -> list[int]:
    """SAE feature numbers to explain: None -> all ``d_sae``; a list or ``"0,5,9"`` -> those, in order,
    each once. An empty list or a number outside 0..d_sae-1 is an SAEError naming the allowed range."""
    if features is None:
        return list(range(d_sae))
    if isinstance(features, str):
        items = [int(f) for f in features.split(",") if f.strip()]
    else:
        items = [int(f) for f in features]
    bad = [f for f in items if not 0 <= f < d_sae]
    if not items or bad:
        raise SAEError(f"features must be SAE feature numbers in 0..{d_sae - 1}, got {bad or 'an empty list'}")
    return list(dict.fromkeys(items))


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder: ``encode(h)`` gives feature activations, ``decode(f)`` the reconstruction.

    Args:
        W_enc: (d_in, d_sae). b_enc: (d_sae,). W_dec: (d_sae, d_in). b_dec: (d_in,).
        architecture: ``standard`` (ReLU), ``topk`` (needs ``k``) or ``jumprelu`` (needs ``threshold``).
        k: features kept per vector (topk).
        threshold: (d_sae,) per-feature thresholds (jumprelu).
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (SAELens' default).
        rescale_acts_by_decoder_norm: SAELens TopK option (see the module docstring).
        feature_axis: where the features are in activations; None: by shape (module docstring).
        site: the site the SAE was trained on (``"decoder.fc.1.output"``), when known.
        meta: anything else the file said (its layout, hook name, model name).

    Every tensor is checked (shape, NaN/inf) here, so a broken file fails when it is loaded.
    """

    def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor,
                 architecture: str = "standard", *, k: int | None = None, threshold: torch.Tensor | None = None,
                 apply_b_dec_to_input: bool = True, rescale_acts_by_decoder_norm: bool = False,
                 feature_axis: int | None = None, site: str | None = None, meta: Mapping[str, Any] | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise SAEError(f"unknown SAE architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        if not torch.is_tensor(W_enc) or W_enc.ndim != 2:
            raise SAEError(f"SAE tensor W_enc must be a 2-D tensor (d_in, d_sae), got "
                           f"{tuple(W_enc.shape) if torch.is_tensor(W_enc) else type(W_enc).__name__}")
        d_in, d_sae = (int(v) for v in W_enc.shape)
        if d_in < 1 or d_sae < 1:
            raise SAEError(f"SAE tensor W_enc has shape {(d_in, d_sae)}; both sizes must be >= 1")
        self.W_enc = nn.Parameter(_check_tensor("W_enc", W_enc, (d_in, d_sae)), requires_grad=False)
        self.b_enc = nn.Parameter(_check_tensor("b_enc", b_enc, (d_sae,)).to(W_enc.dtype), requires_grad=False)
        self.W_dec = nn.Parameter(_check_tensor("W_dec", W_dec, (d_sae, d_in)).to(W_enc.dtype), requires_grad=False)
        self.b_dec = nn.Parameter(_check_tensor("b_dec", b_dec, (d_in,)).to(W_enc.dtype), requires_grad=False)
        self.architecture = architecture
        self.k: int | None = None
        if architecture == "topk":
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
                raise SAEError(f"a topk SAE needs k, an integer in 1..d_sae ({d_sae}), got {k!r}")
            self.k = k
        if architecture == "jumprelu":
            if threshold is None:
                raise SAEError("a jumprelu SAE needs a threshold tensor (d_sae,), got none")
            self.threshold = nn.Parameter(_check_tensor("threshold", threshold, (d_sae,)).to(W_enc.dtype),
                                          requires_grad=False)
        elif threshold is not None:
            raise SAEError(f"a threshold tensor is only used by jumprelu SAEs, not {architecture!r}")
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        if self.rescale_acts_by_decoder_norm and architecture != "topk":
            raise SAEError("rescale_acts_by_decoder_norm is a topk option (SAELens); this SAE is "
                           f"{architecture!r}")
        if self.rescale_acts_by_decoder_norm and bool((self.W_dec.norm(dim=1) == 0).any()):
            raise SAEError("rescale_acts_by_decoder_norm needs every decoder row W_dec[k] to be non-zero")
        if feature_axis is not None and (isinstance(feature_axis, bool) or not isinstance(feature_axis, int)):
            raise SAEError(f"feature_axis must be an int or None, got {feature_axis!r}")
        self.feature_axis = feature_axis
        self.site = site
        self.meta = dict(meta or {})

    # -- sizes and validation
    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def axis_for(self, ndim: int, feature_axis: int | None = None) -> int:
        """The (non-negative) feature axis for an activation with ``ndim`` dims."""
        axis = feature_axis if feature_axis is not None else self.feature_axis
        if axis is None:
            return default_feature_axis(ndim)
        if not -ndim <= axis < ndim or axis % ndim == 0:
            raise SAEError(f"feature_axis {axis} does not fit an activation with {ndim} dims "
                           f"(allowed: 1..{ndim - 1} or -{ndim - 1}..-1; dim 0 is the batch)")
        return axis % ndim

    def check_site(self, shape: torch.Size | tuple[int, ...], site: Any = None,
                   feature_axis: int | None = None) -> int:
        """Check that activations of ``shape`` (batch first) fit this SAE; return the feature axis.

        Call it with a probed shape before any edited forward pass: a mismatch raises
        :class:`SAEError` naming both sizes.
        """
        shape = tuple(int(v) for v in shape)
        where = f" at site {site}" if site is not None else ""
        if len(shape) < 2:
            raise SAEError(f"the activation{where} has shape {shape}; the SAE needs a batch dim plus features")
        axis = self.axis_for(len(shape), feature_axis)
        if shape[axis] != self.d_in:
            layout = "channels of a (B, C, H, W) map, read per position" if (len(shape) == 4 and axis == 1) else f"dim {axis}"
            raise SAEError(
                f"the SAE has d_in={self.d_in}, but the activation{where} has {shape[axis]} features "
                f"(shape {shape}, features on {layout}); load the SAE trained for this site, choose the site it "
                "was trained on, or pass feature_axis= if the features are on another dim")
        return axis

    # -- the forward computation
    def _to_last(self, h: torch.Tensor, feature_axis: int | None) -> tuple[torch.Tensor, int]:
        axis = self.axis_for(h.ndim, feature_axis)
        if h.shape[axis] != self.d_in:
            self.check_site(h.shape, feature_axis=feature_axis)
        return h.movedim(axis, -1), axis

    def _decoder_norms(self) -> torch.Tensor:
        return self.W_dec.norm(dim=1)

    def encode_last(self, x: torch.Tensor) -> torch.Tensor:
        """Encode vectors whose last dim is ``d_in`` (steps 1-3 of the module docstring)."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self._decoder_norms()
        acts = torch.relu(pre)
        if self.architecture == "topk":
            top = acts.topk(self.k, dim=-1)
            acts = torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        elif self.architecture == "jumprelu":
            acts = acts * (pre > self.threshold).to(acts.dtype)
        return acts

    def feature_activation(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``f_k(x)`` for one feature per batch item: ``x`` (B, ..., d_in), ``features`` (B,) -> (B, ...).

        Standard and jumprelu SAEs compute only the column they need (memory B x positions, not
        x d_sae); topk needs every pre-activation to know whether k is among the largest.
        """
        if self.architecture == "topk":
            acts = self.encode_last(x)
            index = features.view(-1, *([1] * (acts.ndim - 1))).expand(*acts.shape[:-1], 1)
            return acts.gather(-1, index).squeeze(-1)
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        lead = (len(features),) + (1,) * (x.ndim - 2)
        pre = torch.einsum("b...d,bd->b...", x, self.W_enc[:, features].T) + self.b_enc[features].view(lead)
        acts = torch.relu(pre)
        if self.architecture == "jumprelu":
            acts = acts * (pre > self.threshold[features].view(lead)).to(acts.dtype)
        return acts

    def decode_last(self, f: torch.Tensor) -> torch.Tensor:
        f = f.to(self.W_dec.dtype)
        if self.rescale_acts_by_decoder_norm:
            f = f / self._decoder_norms()
        return f @ self.W_dec + self.b_dec

    def encode(self, h: torch.Tensor, feature_axis: int | None = None) -> torch.Tensor:
        """Feature activations of ``h``; the d_sae features sit where ``h``'s features were."""
        x, axis = self._to_last(h, feature_axis)
        return self.encode_last(x).movedim(-1, axis).to(h.dtype)

    def decode(self, f: torch.Tensor, feature_axis: int | None = None) -> torch.Tensor:
        """Reconstruction from feature activations ``f`` (features on the same axis rule as ``encode``)."""
        axis = self.axis_for(f.ndim, feature_axis)
        if f.shape[axis] != self.d_sae:
            raise SAEError(f"decode got {f.shape[axis]} features on dim {axis} (shape {tuple(f.shape)}), "
                           f"but the SAE has d_sae={self.d_sae}")
        return self.decode_last(f.movedim(axis, -1)).movedim(-1, axis).to(f.dtype)

    def forward(self, h: torch.Tensor, feature_axis: int | None = None) -> torch.Tensor:
        """The reconstruction ``decode(encode(h))``."""
        x, axis = self._to_last(h, feature_axis)
        return self.decode_last(self.encode_last(x)).movedim(-1, axis).to(h.dtype)

    def decoder_directions(self) -> torch.Tensor:
        """(d_sae, d_in): the change of the reconstruction per unit of each feature's activation.

        Row k of ``W_dec``, divided by its norm for TopK SAEs with ``rescale_acts_by_decoder_norm``
        (their ``decode`` divides the activation by that norm first).
        """
        if self.rescale_acts_by_decoder_norm:
            return self.W_dec / self._decoder_norms()[:, None]
        return self.W_dec

    @classmethod
    def identity(cls, d: int, **kwargs: Any) -> "SparseAutoencoder":
        """An SAE with ``W_enc = W_dec = I`` and zero biases (features are the coordinates' positive parts)."""
        eye = torch.eye(d)
        return cls(eye, torch.zeros(d), eye.clone(), torch.zeros(d), **kwargs)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
                                "apply_b_dec_to_input": self.apply_b_dec_to_input}
        if self.k is not None:
            info["k"] = self.k
        if self.site is not None:
            info["site"] = self.site
        if self.meta.get("layout"):
            info["layout"] = self.meta["layout"]
        return info

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}, architecture={self.architecture!r}{k}"
