"""Built-in direction finders."""

from ..hookspecs import hookimpl


@hookimpl
def latentexplainer_register_direction_finders(register):
    from ..directions import axes, conditional, given, pca, pullback

    register("axes", axes)
    register("given", given)
    register("pca", pca)
    register("pullback", pullback)
    register("conditional", conditional)
