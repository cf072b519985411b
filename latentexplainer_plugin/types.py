"""The plain objects passed forward along the data flow: Site -> Traversal -> Prompt -> Response -> Explanation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import torch

SiteKind = Literal["input", "output", "update"]
SITE_KINDS: tuple[str, ...] = ("input", "output", "update")


@dataclass(frozen=True)
class Site:
    """A place in a model where a latent lives: a module path and which of the module's values.

    ``kind`` is ``"input"`` (the module's first argument), ``"output"`` (its output; the first
    element of a tuple) or ``"update"``: the block's residual update u = output - input (input and
    output of the same shape). An edit at an update site replaces the output by input + edit(u).
    """

    path: str
    kind: SiteKind = "output"

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"site kind must be one of {', '.join(SITE_KINDS)}, got {self.kind!r}")

    def __str__(self) -> str:
        return f"{self.path}.{self.kind}"

    @classmethod
    def parse(cls, text: str) -> "Site":
        """Parse ``"decoder.input"``, ``"transformer_blocks.3.update"`` or ``"mid_block"`` (output by default)."""
        path, _, last = text.rpartition(".")
        if last in SITE_KINDS and path:
            return cls(path, last)  # type: ignore[arg-type]
        return cls(text, "output")


@dataclass
class Edit:
    """How to change the activation at a site, per batch item.

    ``rule`` names an edit rule (built in: ``add`` = a + strength * direction, ``set`` = coordinate
    ``index`` := strength); plugins add others through the ``latentexplainer_register_edit_rules`` hook.
    ``strengths`` has one value per batch item of the edited forward pass.
    """

    rule: str
    strengths: torch.Tensor
    direction: torch.Tensor | None = None
    index: int | None = None
    calls: slice | None = None  # which calls of the site to edit when it runs many times (None: all)


@dataclass
class Traversal:
    """Images decoded while one latent (or direction) moves over ``strengths``.

    ``images`` is (n_bases, n_rows, n_steps, C, H, W) in [0, 1]: one strip per row, one row set per
    base latent. Rows share the traversal and differ in what else is held fixed (``row_labels``).
    """

    latent_id: str
    images: torch.Tensor
    strengths: torch.Tensor
    rule: str
    index: int | None = None
    direction: torch.Tensor | None = None
    base_latents: torch.Tensor | None = None
    row_labels: list[str] = field(default_factory=lambda: [""])
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 6:
            raise ValueError(
                f"Traversal.images must be (n_bases, n_rows, n_steps, C, H, W), got shape {tuple(self.images.shape)}"
            )
        if self.images.shape[2] != len(self.strengths):
            raise ValueError(f"{self.images.shape[2]} steps of images but {len(self.strengths)} strengths")

    @property
    def n_bases(self) -> int:
        return self.images.shape[0]

    @property
    def n_rows(self) -> int:
        return self.images.shape[1]


@dataclass
class Prompt:
    """What a backend is asked: text plus the images it refers to (PIL images, laid out by the bias)."""

    text: str
    images: list[Any]
    bias: str
    system: str | None = None


@dataclass
class Response:
    """One sampled answer. ``text`` is None when the sample failed (``error`` says why).

    ``abstained`` marks an answer that says nothing visible changes or that it cannot tell: a
    valid answer, but never a clear explanation.
    """

    text: str | None
    error: str | None = None
    abstained: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.text is not None and self.error is None


@dataclass
class Explanation:
    """The agreed explanation of a latent, or none (``clear`` False) with the certainty that was measured.

    ``certainty`` is None when it cannot be measured (a single valid answer); ``note`` says why.
    """

    explanation: str | None
    certainty: float | None
    clear: bool
    responses: list[Response]
    similarity: str
    threshold: float
    abstentions: int = 0
    failures: int = 0
    note: str | None = None


@dataclass
class ExampleSet:
    """Example evidence for one feature: images where it fires, contrasted with images where it does not.

    ``activating`` is (K, C, H, W) in [0, 1] (strongest first is usual, not required) with their
    activations (K,) and optional activation maps (K, h, w) on the feature's own grid (upsampled
    to the image when drawn); ``inactive`` is (M, C, H, W): images where the feature is 0 at every
    position. K may be 0 (a dead feature). ``meta`` carries what the source knows (feature number,
    items, frequency, IoU against object masks, ...).
    """

    latent_id: str
    activating: torch.Tensor
    activations: torch.Tensor
    inactive: torch.Tensor
    maps: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("activating", "inactive"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.ndim != 4:
                raise ValueError(f"ExampleSet.{name} must be a (N, C, H, W) tensor, got "
                                 f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        k = self.activating.shape[0]
        if not isinstance(self.activations, torch.Tensor) or tuple(self.activations.shape) != (k,):
            raise ValueError(f"ExampleSet.activations must have shape ({k},), one per activating image, got "
                             f"{tuple(getattr(self.activations, 'shape', ()))}")
        if self.maps is not None and (self.maps.ndim != 3 or self.maps.shape[0] != k):
            raise ValueError(f"ExampleSet.maps must be (K, h, w) with K={k}, got {tuple(self.maps.shape)}")
        if k and len(self.inactive) and self.activating.shape[1:] != self.inactive.shape[1:]:
            raise ValueError(f"activating images are {tuple(self.activating.shape[1:])} but inactive ones "
                             f"{tuple(self.inactive.shape[1:])}; both must be (C, H, W) alike")

    @property
    def n_active(self) -> int:
        return int(self.activating.shape[0])

    @property
    def n_inactive(self) -> int:
        return int(self.inactive.shape[0])

    def as_traversal(self) -> Traversal:
        """The activating images as a one-row Traversal (strengths = activations), for backends whose
        ``explain`` takes a traversal but reads only the prompt (chat models)."""
        images = self.activating[None, None]
        return Traversal(latent_id=self.latent_id, images=images, strengths=self.activations.float(), rule="examples",
                         meta={"examples": True} | {k: v for k, v in self.meta.items() if isinstance(v, (int, float, str))})


def usage_of(responses: Iterable[Response]) -> dict[str, int]:
    """Tokens and requests this run spent on ``responses`` (answers served from the cache cost 0).

    A backend puts a request's ``usage`` on one of its answers only, so n answers from one request
    count its prompt tokens once.
    """
    total = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
    for r in responses:
        meta = r.meta or {}
        usage = meta.get("usage")
        if meta.get("cached") or not isinstance(usage, dict):
            continue
        for key in total:
            value = usage.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                total[key] += value
    return total
