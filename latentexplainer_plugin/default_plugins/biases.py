"""Built-in inductive biases (disentanglement, combination, conditional)."""

from ..hookspecs import hookimpl


@hookimpl
def latentexplainer_register_biases(register):
    from ..biases.builtin import BUILTIN_BIASES

    for bias in BUILTIN_BIASES:
        register(bias.name, lambda bias=bias: bias)
