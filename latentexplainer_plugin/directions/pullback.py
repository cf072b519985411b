"""Pull-back directions: the top singular vectors of the Jacobian from x_t to h (Park et al. 2023).

Park et al., "Understanding the latent space of diffusion models through the lens of Riemannian
geometry" (NeurIPS 2023): with J = dh/dx_t at one x_t and timestep t, J = U S V^T.

- The right singular vectors v_i live in x-space: the directions of x_t that change h the most.
- The left singular vectors u_i = J v_i / s_i live in h-space: how h moves along them.

An h-space edit (h <- h + alpha * u) uses u, so :func:`pullback` returns the u_i as the
directions and keeps the v_i in ``x_vectors`` (saved next to them) with the singular values.

The Jacobian is never formed. Subspace iteration on J^T J with Jacobian-vector products:
1. x_t: sample x_T from ``seed`` and denoise down to the scheduled timestep closest to ``t``
   (for a text-conditioned UNet, h is that of the prompt's pass).
2. One forward pass of a batch of m = k + oversample copies of x_t, up to the site, keeping the
   graph. Row i of the batch only depends on copy i, so one backward pass with a batch of
   cotangents gives m products J^T u at once; J v comes from the double-backward trick
   (J v = d/dw <J^T w, v>, exact, reverse mode only).
3. Repeat n_iter times: V <- orth(J^T J V) (QR).
4. Rayleigh-Ritz: the SVD of J V gives U, S and the rotation of V into singular vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..hooks import register_site_hooks, resolve_module
from ..types import Site
from .base import Directions


class _Stop(Exception):
    pass


def site_function(unet: torch.nn.Module, module: torch.nn.Module, kind: str, t: int, unet_kwargs=None):
    """``f(x_t) -> h``: run ``unet`` at timestep ``t`` up to ``module`` and return its output (or input, or update).

    ``unet_kwargs(n)`` gives extra UNet arguments for a batch of n (e.g. the prompt's embeddings).
    """

    def f(x: torch.Tensor) -> torch.Tensor:
        found: list[torch.Tensor] = []

        def record(value):
            found.append(value[0] if isinstance(value, (tuple, list)) else value)
            raise _Stop

        handles = register_site_hooks(module, Site("", kind), record)  # input, output or update (output - input)
        try:
            unet(x, t, return_dict=False, **(unet_kwargs(len(x)) if unet_kwargs is not None else {}))
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if not found:
            raise RuntimeError(f"the UNet never reached {module.__class__.__name__} during its forward pass")
        return found[0]

    return f


def _orthonormal_rows(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(m.T)[0].T


def top_singular(f, x: torch.Tensor, k: int, n_iter: int = 20, oversample: int = 4,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` singular triplets of J = df/dx at ``x`` (one item, shape (1, *x_shape)).

    Returns (u (k, *h_shape), s (k,), v (k, *x_shape)) with J v_i = s_i u_i, by subspace iteration.
    """
    d_x = x[0].numel()
    m = min(k + oversample, d_x)
    if k > d_x:
        raise ValueError(f"cannot find {k} singular vectors of a Jacobian with {d_x} input dimensions")
    xs = x.detach().expand(m, *x.shape[1:]).clone().requires_grad_(True)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # double backward needs the math attention kernel
        h = f(xs)
        w = torch.zeros_like(h, requires_grad=True)
        jt_w = torch.autograd.grad(h, xs, w, create_graph=True)[0]  # J^T w, linear in w

        def jvp(v: torch.Tensor) -> torch.Tensor:  # J v, per batch item
            return torch.autograd.grad(jt_w, w, v.view_as(xs).to(xs.dtype), retain_graph=True)[0]

        def vjp(u: torch.Tensor) -> torch.Tensor:  # J^T u, per batch item
            return torch.autograd.grad(h, xs, u.to(h.dtype), retain_graph=True)[0]

        v = _orthonormal_rows(torch.randn(m, d_x, generator=generator, dtype=torch.float64)).to(x.device)
        for _ in range(n_iter):
            v = _orthonormal_rows(vjp(jvp(v)).flatten(1).double())
        jv = jvp(v).flatten(1).double()  # (m, d_h) = (J V^T)^T
    u_full, s, q_t = torch.linalg.svd(jv.T, full_matrices=False)  # J V^T = U S Q^T
    right = (v.T.to(q_t) @ q_t.T).T  # rows: V^T Q, the right singular vectors
    u, s, right = u_full.T[:k], s[:k], right[:k]
    peak = u.abs().argmax(dim=1)  # fix signs: largest-magnitude h coordinate positive
    sign = u.gather(1, peak[:, None]).sign()
    u, right = u * sign, right * sign
    return u.float().view(k, *h.shape[1:]), s.float(), right.float().view(k, *x.shape[1:])


@dataclass
class PullbackDirections(Directions):
    """h-space directions u_i (``vectors``) plus their x-space partners v_i (``x_vectors``)."""

    x_vectors: torch.Tensor | None = None
    singular_values: torch.Tensor | None = None

    def save(self, path: str | Path) -> Path:
        """Like :meth:`Directions.save`, with ``x_directions`` and ``singular_values`` tensors added."""
        import json

        from safetensors.torch import save

        from ..safe_io import atomic_write_bytes

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"directions": self.vectors.detach().contiguous().cpu()}
        if self.x_vectors is not None:
            tensors["x_directions"] = self.x_vectors.detach().contiguous().cpu()
        if self.singular_values is not None:
            tensors["singular_values"] = self.singular_values.detach().contiguous().cpu()
        data = save(tensors, metadata={"provenance": json.dumps(self.provenance, sort_keys=True, default=str)})
        atomic_write_bytes(path, data)  # no link followed, never a half-written file
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PullbackDirections":
        from ..safe_load import load_safetensors

        base = Directions.load(path)
        tensors = load_safetensors(path)
        return cls(base.vectors, base.provenance, tensors.get("x_directions"), tensors.get("singular_values"))


def _x_at(adapter: Any, t: int | None, seed: int) -> tuple[torch.Tensor, int]:
    """x_t on the sampling path of the noise drawn from ``seed``, at the scheduled timestep closest to ``t``."""
    timesteps = adapter.timesteps
    t = timesteps[0] if t is None else int(t)
    index = min(range(len(timesteps)), key=lambda i: (abs(timesteps[i] - t), i))
    x = adapter.sample_bases(1, seed).to(adapter.device, adapter.dtype)
    sch, loop = adapter.scheduler, adapter.driver
    with torch.no_grad():
        sch.set_timesteps(loop.steps, device=x.device)
        x = x * sch.init_noise_sigma
        for step in sch.timesteps[:index]:
            x = sch.step(loop.model_output(x, step), step, x, return_dict=False)[0]
        x = sch.scale_model_input(x, sch.timesteps[index])
    return x, timesteps[index]


def pullback(adapter: Any, n_directions: int = 8, t: int | None = None, n_iter: int = 20, seed: int = 0,
             oversample: int = 4) -> PullbackDirections:
    """The top ``n_directions`` left singular vectors (h-space) of dh/dx_t at timestep ``t``.

    ``t`` defaults to the first sampling timestep (the start of the edit window); x_t lies on the
    sampling path of the noise drawn from ``seed``. The x-space right singular vectors are kept in
    ``x_vectors``, the singular values in ``singular_values`` and in the provenance.
    """
    if not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be an integer >= 1, got {n_directions!r}")
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    x, t_used = _x_at(adapter, t, seed)
    module = resolve_module(adapter.driver, adapter.site.path)
    f = site_function(adapter.unet, module, adapter.site.kind, t_used, adapter.driver.unet_kwargs)
    u, s, v = top_singular(f, x, n_directions, n_iter=n_iter, oversample=oversample,
                           generator=torch.Generator().manual_seed(seed))
    return PullbackDirections(u, {
        "finder": "pullback", "model": adapter.model_id, "site": str(adapter.site), "timestep": t_used,
        "seed": seed, "n_iter": n_iter, "oversample": oversample,
        "singular_values": [round(float(x), 6) for x in s], "x_space": "x_directions tensor (right singular vectors)",
    }, x_vectors=v, singular_values=s)
