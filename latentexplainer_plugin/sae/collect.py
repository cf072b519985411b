"""Collect activations at a site of any model, streamed to disk in shards, for SAE training and examples.

A collection is a directory::

    manifest.json                site, d_in, positions, dtype, count, shards
    shard-00000.safetensors      activations (rows, d_in), item (rows,), call (rows,), position (rows,)
    shard-00001.safetensors      ...

One row is the activation vector at one position of one item (image, prompt) at one call of the
site (a timestep of a sampling loop). ``item``, ``call`` and ``position`` say where each row came
from, so that a feature's activations can be drawn as a map over the item's positions (H, W for
a convolutional feature map, T for a sequence). At most ``shard_rows`` rows, plus one batch, are
held in memory at once, however many shards are written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from nnsight import save
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CollectError  # noqa: F401 (re-exported)
from ..hooks import capture, resolve_module, wrap
from ..plugins import hook
from ..types import Site

MANIFEST_NAME = "manifest.json"
FORMAT = "latentexplainer-activations"
Layout = Literal["auto", "channels_first", "channels_last", "flat"]
LAYOUTS = ("auto", "channels_first", "channels_last", "flat")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Manifest:
    """What a collection holds (``manifest.json``)."""

    site: str
    path: str
    kind: str
    update: bool
    layout: str
    d_in: int
    item_shape: list[int]  # one item's activation as captured, without the batch dimension
    positions: list[int]  # spatial (H, W), sequence (T,) or () when an item is one vector
    calls: int
    dtype: str
    count: int = 0  # rows
    n_items: int = 0
    shard_rows: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)
    max_rows_held: int = 0  # the most rows the writer held in memory at once (bounded by shard_rows + one batch)
    format: str = FORMAT
    version: int = 1

    @property
    def positions_per_item(self) -> int:
        return math.prod(self.positions) if self.positions else 1


def _resolve_layout(layout: str, ndim: int) -> str:
    if layout == "auto":
        return {2: "flat", 3: "channels_last"}.get(ndim, "channels_first")
    return layout


def to_rows(activation: torch.Tensor, layout: str) -> tuple[torch.Tensor, list[int]]:
    """Activation (B, ...) -> rows (B * P, d) and the positions shape P (item-major, positions row-major).

    ``channels_first``: (B, C, *spatial), features = C (conv feature maps). ``channels_last``:
    (B, *positions, D), features = D (token sequences). ``flat``: one row per item.
    """
    if activation.ndim < 2:
        raise CollectError(f"the activation at the site has shape {tuple(activation.shape)}; expected a batch dimension plus features")
    layout = _resolve_layout(layout, activation.ndim)
    b = activation.shape[0]
    if layout == "flat" or activation.ndim == 2:
        return activation.reshape(b, -1), []
    if layout == "channels_first":
        d, positions = activation.shape[1], list(activation.shape[2:])
        rows = activation.movedim(1, -1).reshape(-1, d)
    else:
        d, positions = activation.shape[-1], list(activation.shape[1:-1])
        rows = activation.reshape(-1, d)
    return rows, positions


class _ShardWriter:
    """Buffers rows and writes them in shards of exactly ``shard_rows`` (the last may be shorter)."""

    def __init__(self, directory: Path, manifest: Manifest, dtype: torch.dtype):
        self.directory, self.manifest, self.dtype = directory, manifest, dtype
        self.buffer: list[dict[str, torch.Tensor]] = []
        self.buffered = 0

    def add(self, rows: torch.Tensor, item: torch.Tensor, call: torch.Tensor, position: torch.Tensor) -> None:
        self.buffer.append({"activations": rows.to(self.dtype).contiguous(), "item": item, "call": call, "position": position})
        self.buffered += len(rows)
        self.manifest.max_rows_held = max(self.manifest.max_rows_held, self.buffered)
        if self.buffered >= self.manifest.shard_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        joined = {k: torch.cat([part[k] for part in self.buffer]) for k in self.buffer[0]}
        size, start = self.manifest.shard_rows, 0
        while self.buffered - start >= size or (final and start < self.buffered):
            n = min(size, self.buffered - start)
            name = f"shard-{len(self.manifest.shards):05d}.safetensors"
            save_file({k: v[start:start + n].contiguous() for k, v in joined.items()}, str(self.directory / name))
            self.manifest.shards.append({"file": name, "rows": n})
            self.manifest.count += n
            start += n
        rest = {k: v[start:] for k, v in joined.items()}
        self.buffer = [rest] if start < self.buffered else []
        self.buffered -= start

    def close(self) -> None:
        if self.buffered:
            self._flush(final=True)


def _call_model(model: nn.Module, batch: Any) -> tuple[tuple, dict]:
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def _capture_update(model: nn.Module, path: str, args: tuple, kwargs: dict, calls: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of the module at ``path`` for each of ``calls`` calls, in one traced forward."""
    wrapped = wrap(model)
    envoy: Any = wrapped
    for part in path.split(".") if path else []:
        envoy = getattr(envoy, part)
    with wrapped.trace(*args, **kwargs) as tracer:
        saved = save([])  # values that are not saved are unbound after the trace
        if calls == 1:
            saved.append((envoy.input, envoy.output))
        else:
            for _ in tracer.iter[:calls]:
                saved.append((envoy.input, envoy.output))
    first = lambda v: (v[0] if isinstance(v, (tuple, list)) else v).detach()  # noqa: E731
    return [(first(a), first(b)) for a, b in saved]


def collect_activations(
    model: nn.Module,
    site: Site | str,
    batches: Iterable[Any] | Callable[[], Iterable[Any]],
    out_dir: str | Path,
    *,
    update: bool = False,
    calls: int = 1,
    layout: Layout = "auto",
    shard_rows: int = 65536,
    dtype: str = "float32",
    max_items: int | None = None,
    select: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
) -> Manifest:
    """Run ``model`` over ``batches`` and write the activations at ``site`` to ``out_dir`` in shards.

    ``batches`` yields model inputs (a tensor: ``model(x)``; a tuple: ``model(*args)``; a dict:
    ``model(**kwargs)``), or is a callable returning such an iterable. ``update=True`` collects a
    block's update, output - input (the site's ``kind`` is then ignored and recorded as ``update``;
    input and output must have the same shape). ``calls`` is how many times one forward pass calls the site (the steps of a
    sampling loop); every call is kept, with its number in the ``call`` column. Each captured batch
    is passed to the ``latentexplainer_latent_captured`` hook (for ``update``: the input and the
    output, as captured). ``select(batch, activation)``, when given, returns the part of each captured
    activation to keep (batch first, e.g. a language-model layer's states at the image-token positions
    of a VLM prompt, see :func:`latentexplainer_plugin.vlm.collect_image_token_activations`); rows and
    positions are counted after it. Returns the manifest, also written to ``out_dir/manifest.json``.
    """
    site = Site.parse(site) if isinstance(site, str) else site
    if update:  # recorded as what it is: the site of the block's update, where steering must edit too
        site = Site(site.path, "update")
    if layout not in LAYOUTS:
        raise CollectError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if dtype not in DTYPES:
        raise CollectError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(shard_rows, int) or shard_rows < 1:
        raise CollectError(f"shard_rows must be an int >= 1, got {shard_rows!r}")
    if not isinstance(calls, int) or calls < 1:
        raise CollectError(f"calls must be an int >= 1 (how many times one forward pass calls the site), got {calls!r}")
    if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
        raise CollectError(f"max_items must be None or an int >= 1, got {max_items!r}")
    if select is not None and not callable(select):
        raise CollectError(f"select must be None or a function (batch, activation) -> activation, got {type(select).__name__}")
    resolve_module(model, site.path)  # unknown path: SiteError with suggestions, before any forward
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST_NAME).exists() or any(out.glob("shard-*.safetensors")):
        raise CollectError(f"{out} already holds a collection; choose an empty directory or remove it")
    source = batches() if callable(batches) else batches

    manifest: Manifest | None = None
    writer: _ShardWriter | None = None
    items = 0
    with torch.no_grad():
        for batch in source:
            if max_items is not None and items >= max_items:
                break
            args, kwargs = _call_model(model, batch)
            if update:
                pairs = _capture_update(model, site.path, args, kwargs, calls)
                for i, (a, b) in enumerate(pairs):
                    if a.shape != b.shape:
                        raise CollectError(
                            f"update=True needs the input and output of {site.path!r} to have the same shape, "
                            f"got input {tuple(a.shape)} and output {tuple(b.shape)}; collect the input or the output instead")
                    hook().latentexplainer_latent_captured(site=Site(site.path, "input"), call=i, activation=a)
                    hook().latentexplainer_latent_captured(site=Site(site.path, "output"), call=i, activation=b)
                acts = [b - a for a, b in pairs]
            else:
                acts = capture(model, site, *args, calls=calls, observe=True, **kwargs)
            if select is not None:
                acts = [select(batch, act) for act in acts]
            n = acts[0].shape[0]
            keep = n if max_items is None else min(n, max_items - items)
            for c, act in enumerate(acts):
                if not torch.is_tensor(act) or not act.is_floating_point():
                    raise CollectError(f"the activation at {site} is a {type(act).__name__} {getattr(act, 'dtype', '')}, not a float tensor")
                act = act[:keep].float()
                rows, positions = to_rows(act, layout)
                if manifest is None:
                    manifest = Manifest(site=str(site), path=site.path, kind=site.kind, update=site.kind == "update",
                                        layout=_resolve_layout(layout, act.ndim), d_in=rows.shape[1],
                                        item_shape=list(act.shape[1:]), positions=positions, calls=calls,
                                        dtype=dtype, shard_rows=shard_rows)
                    writer = _ShardWriter(out, manifest, DTYPES[dtype])
                elif list(act.shape[1:]) != manifest.item_shape:
                    raise CollectError(
                        f"the activation at {site} has shape {tuple(act.shape[1:])} per item in this batch but "
                        f"{tuple(manifest.item_shape)} in the first batch; every item must give the same shape")
                p = max(1, math.prod(positions))
                item = torch.arange(items, items + keep).repeat_interleave(p)
                position = torch.arange(p).repeat(keep)
                writer.add(rows, item, torch.full((len(rows),), c, dtype=torch.int64), position)
            items += keep
    if manifest is None or writer is None:
        raise CollectError("the batch source yielded no batches; nothing was collected")
    writer.close()
    manifest.n_items = items
    (out / MANIFEST_NAME).write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def collect_from_adapter(adapter: Any, site: Site | str, bases: torch.Tensor | Callable[[], Iterable[torch.Tensor]],
                         out_dir: str | Path, *, batch_size: int = 256, update: bool = False,
                         images: list[torch.Tensor] | None = None) -> "Manifest":
    """Collect the activations at ``site`` while an adapter renders ``bases`` (item i = base i).

    ``bases``: a tensor (split into batches of ``batch_size``) or a callable yielding batches (to
    stream bases made on the fly, e.g. encoded or inverted images). The adapter's ``driver`` runs
    them; a sampling loop calls the site once per step (``n_calls``) and every call is kept; under
    classifier-free guidance (``copies`` > 1) the site sees [uncond; cond] and only the conditional
    half is kept. ``images``: a list that receives each batch's rendered images (the driver's output
    through the adapter's ``output_to_images``, in [0, 1]), read in the same pass.
    """
    copies = int(getattr(adapter, "copies", 1))
    dtype = getattr(adapter, "dtype", None) or torch.float32

    def batches() -> Iterator[torch.Tensor]:
        source = bases() if callable(bases) else (bases[i:i + batch_size] for i in range(0, len(bases), batch_size))
        for batch in source:
            yield batch.to(adapter.device, dtype)

    def conditional(batch: Any, activation: torch.Tensor) -> torch.Tensor:
        return activation[-len(batch):]

    handle = None
    if images is not None:  # a plain forward hook on the driver sees its output inside the trace
        handle = adapter.driver.register_forward_hook(
            lambda module, args, output: images.append(adapter.output_to_images(output.detach())))
    try:
        return collect_activations(adapter.driver, site, batches, out_dir, update=update,
                                   calls=int(getattr(adapter, "n_calls", 1)), select=conditional if copies > 1 else None)
    finally:
        if handle is not None:
            handle.remove()


class ActivationStore:
    """Read a collection back, one shard at a time (never the whole matrix unless asked)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST_NAME
        if not path.is_file():
            raise CollectError(f"{self.directory} holds no {MANIFEST_NAME}; collect activations into it first (collect_activations)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise CollectError(f"{path} is not an activation manifest (format {raw.get('format')!r}, expected {FORMAT!r})")
            self.manifest = Manifest(**raw)
        except (json.JSONDecodeError, TypeError) as exc:
            raise CollectError(f"{path} cannot be read as an activation manifest: {exc}") from exc
        for shard in self.manifest.shards:
            if not (self.directory / shard["file"]).is_file():
                raise CollectError(f"{self.directory / shard['file']} is listed in {MANIFEST_NAME} but missing")

    @property
    def d_in(self) -> int:
        return self.manifest.d_in

    def __len__(self) -> int:
        return self.manifest.count

    def iter_shards(self, columns: tuple[str, ...] = ("activations", "item", "call", "position")) -> Iterator[dict[str, torch.Tensor]]:
        """Yield each shard as a dict of tensors (activations as float32)."""
        for shard in self.manifest.shards:
            with safe_open(str(self.directory / shard["file"]), framework="pt") as f:
                part = {k: f.get_tensor(k) for k in columns}
            if "activations" in part:
                part["activations"] = part["activations"].float()
            yield part

    def iter_batches(self, batch_size: int, columns: tuple[str, ...] = ("activations",)) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches of ``batch_size`` rows in stored order (the last may be shorter), shard by shard."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise CollectError(f"batch_size must be an int >= 1, got {batch_size!r}")
        carry: dict[str, torch.Tensor] | None = None
        for part in self.iter_shards(columns):
            if carry is not None:
                part = {k: torch.cat([carry[k], part[k]]) for k in part}
            n = len(part[columns[0]])
            full = n - n % batch_size
            for start in range(0, full, batch_size):
                yield {k: v[start:start + batch_size] for k, v in part.items()}
            carry = {k: v[full:] for k, v in part.items()} if full < n else None
        if carry is not None:
            yield carry

    def load(self) -> dict[str, torch.Tensor]:
        """Every row at once (small collections and tests only)."""
        parts = list(self.iter_shards())
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
