"""The three inductive biases of the LatentExplainer paper (arXiv 2406.14862, Sec. 3.2)."""

from __future__ import annotations

from .base import InductiveBias

DISENTANGLEMENT = InductiveBias(
    name="disentanglement",
    formula="p(z_i | z_j = a) = p(z_i | z_j = b) for all j != i, a != b",
    symbols={
        "z_i": "the change produced by {latent}",
        "z_j": "{other}",
        "a": "one value",
        "b": "another value",
        "j != i": "any other latent",
        "a != b": "any two different values",
    },
    rows=2,
    description="Each latent controls one factor, whatever the other latents are.",
    template=(
        "The image shows how a generated picture changes as latent {latent} goes from {low} to {high} "
        "(values above the columns). Each row repeats the same change with {other} held at a different value "
        "({rows}). The model is built so that {formula_in_words}: the change caused by {latent} does not depend "
        "on the other latents. In one sentence, describe the same pattern of change that appears in every row, "
        "despite the other variations between rows."
    ),
    example="Increasing z2 moves the object from left to right.",
)

COMBINATION = InductiveBias(
    name="combination",
    formula="x = g(sum_k alpha_k v_k)",
    symbols={
        "x": "the image",
        "g": "the generator",
        "alpha_k": "the strengths",
        "v_k": "the latent directions that move together as {latent}",
        "sum_k": "the combination of",
    },
    rows=1,
    prompt_bases=2,
    description="Several latents (or one direction mixing them) move together; explain the joint change.",
    template=(
        "Each row of the image shows a generated picture as {latent} goes from {low} to {high} (values above the "
        "columns); rows start from different random pictures. Here {formula_in_words}. In one sentence, describe "
        "the joint change that these latents produce together."
    ),
    example="Moving along dir0 makes the face older and the hair greyer.",
)

CONDITIONAL = InductiveBias(
    name="conditional",
    formula="w ~ p(w | y)",
    symbols={"w": "the direction {latent}", "y": "the property '{property}'", "p(w | y)": "tied to the property '{property}'"},
    rows=1,
    prompt_bases=2,
    requires=("property",),
    description="A direction tied to a label y; explain how the images change with respect to y.",
    template=(
        "Each row of the image shows a generated picture as {latent} goes from {low} to {high} (values above the "
        "columns); rows start from different random pictures. The direction is {formula_in_words}. In one sentence, "
        "describe how the images change with respect to the property '{property}', naming it."
    ),
    example="Moving along dir1 makes the person smile more: the property 'smiling' increases.",
)

BUILTIN_BIASES = (DISENTANGLEMENT, COMBINATION, CONDITIONAL)
