"""What a component declares about itself: its options (a validated model) and its capabilities.

Every adapter, backend, bias, direction finder and edit rule may carry two class attributes:

* ``Options``: a :class:`ComponentOptions` subclass (pydantic; unknown fields are refused) whose
  fields are the keyword options its factory accepts, with types, defaults and help
  (``Field(..., description=...)``). The command line is built from these declarations:
  ``-o KEY=VALUE`` goes to the selected component that declares ``KEY``.
* ``capabilities``: a frozenset of words from :data:`KNOWN_CAPABILITIES` (``needs_key``,
  ``supports_images``, ...), so callers ask what a component can do instead of checking its name.

A component without ``Options`` takes no options.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from .errors import OptionError

#: Capabilities a component may declare, and what each means.
KNOWN_CAPABILITIES: dict[str, str] = {
    "needs_key": "backend: needs an API key (checked before any request)",
    "needs_network": "backend: talks to a server (reachability checked before any model loads)",
    "supports_images": "backend: can look at images",
    "supports_n": "backend: returns n samples from one request",
    "calls_model": "backend: asks a language model (can write prompts: --prompt-from-llm)",
    "directions": "adapter: explains directions found by a direction finder (--direction)",
    "latent_axes": "adapter: explains the axes of a latent vector",
    "sampling_loop": "adapter: edits every step of a sampling loop (--steps, --t-edit)",
    "inversion": "adapter: maps images back to the noises it samples from (--direction conditional)",
    "site_edits": "adapter: renders any edit rule at any site (render_edited, site_activations): SAE features can steer it (--sae)",
    "needs_data": "direction finder: needs labelled images (--data)",
    "per_step": "edit rule: applied on each step of a sampling loop",
    "sae_features": "adapter: its latents are the features of a sparse autoencoder at a site (--sae)",
    "examples_only": "adapter: its latents are explained from example sets alone, no traversal (--data gives the images)",
}


class ComponentOptions(BaseModel):
    """Base of every component's ``Options``: typed, documented, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    #: Option names that the command line also accepts as friendly flags (``steps`` -> ``--steps``).
    flag_aliases: ClassVar[dict[str, str]] = {}


def options_of(component: Any) -> type[ComponentOptions]:
    """The ``Options`` model a component (class or factory) declares, or ``component`` itself when it is
    an ``Options`` model; an empty one when it declares none."""
    if isinstance(component, type) and issubclass(component, ComponentOptions):
        return component
    declared = getattr(component, "Options", None)
    if isinstance(declared, type) and issubclass(declared, ComponentOptions):
        return declared
    return ComponentOptions


def capabilities_of(component: Any) -> frozenset[str]:
    return frozenset(getattr(component, "capabilities", frozenset()) or ())


def _type_name(annotation: Any) -> str:
    """``Optional[Annotated[int, ...]]`` -> ``int | None``; readable names for help output."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def describe_options(component: Any) -> list[dict[str, Any]]:
    """One dict per declared option: name, type, default, help (for ``plugins --options``)."""
    rows = []
    for name, field in options_of(component).model_fields.items():
        type_name = _type_name(field.annotation)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        rows.append({"name": name, "type": type_name, "default": default, "required": field.is_required(),
                     "help": field.description or ""})
    return rows


def _clean(message: str) -> str:
    """pydantic's message in the project's voice: "must be ..." after the option's name."""
    message = message.removeprefix("Value error, ")
    if message.startswith("Input should be "):
        message = "must be " + message[len("Input should be "):]
    return message


def validate_options(component: Any, values: dict[str, Any], owner: str) -> dict[str, Any]:
    """Check ``values`` against the component's declaration; return them typed (defaults not added).

    ``owner`` names the component in messages ("the ddpm adapter"). Raises :class:`OptionError`
    with one problem per bad option: what it got and what is allowed.
    """
    model = options_of(component)
    unknown = sorted(set(values) - set(model.model_fields))
    if unknown:
        known = ", ".join(sorted(model.model_fields)) or "none"
        raise OptionError(owner, [(k, f"is not an option of {owner} (its options: {known})") for k in unknown])
    try:
        parsed = model(**values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ())) or "options"
            message = _clean(str(err.get("msg", "")))
            if err.get("type") != "value_error":  # our own validators say what they got
                message += f" (got {err.get('input')!r})"
            problems.append((where, message))
        raise OptionError(owner, problems) from None
    return {k: getattr(parsed, k) for k in values}


# -- reusable checks for Options fields (messages follow the option's name) ---------------------

def _at_least(low: float, what: str = ""):
    def check(value: Any) -> Any:
        if value is not None and (value < low or (isinstance(value, float) and not math.isfinite(value))):
            raise ValueError(f"must be >= {low:g}{what} (a finite number), got {value}" if isinstance(value, float)
                             else f"must be >= {low:g}{what}, got {value}")
        return value
    return AfterValidator(check)


def _finite_positive(value: Any) -> Any:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be > 0 (a finite number), got {value}")
    return value


PositiveInt = Annotated[int, _at_least(1)]
NonNegativeInt = Annotated[int, _at_least(0)]
PositiveFloat = Annotated[float, AfterValidator(_finite_positive)]
NonNegativeFloat = Annotated[float, _at_least(0)]


def _dtype(value: Any) -> Any:
    from .devices import dtype_name

    return None if value is None else dtype_name(value)


def _url(value: Any) -> Any:
    from urllib.parse import urlsplit

    if value is None:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        from .redaction import redact_url

        raise ValueError(f"must be an http:// or https:// URL, got {redact_url(value)!r}")
    return value


def _env_name(value: Any) -> Any:
    import re

    if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):  # never echo it: it may be the key
        raise ValueError("takes the NAME of an environment variable (letters, digits and _, not starting with a digit), "
                         "e.g. OPENAI_API_KEY; the value given is not a name and is not shown, in case it is the key "
                         "itself: export the key in a variable and pass that variable's name")
    return value


def _site(value: Any) -> Any:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"must name a module path such as decoder.input or mid_block.output, got {value!r}")
    return value


DtypeName = Annotated[str, AfterValidator(_dtype)]
HttpUrl = Annotated[str, AfterValidator(_url)]
EnvName = Annotated[str, AfterValidator(_env_name)]
SiteName = Annotated[str, AfterValidator(_site)]
