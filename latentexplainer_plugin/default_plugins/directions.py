"""Built-in direction finders."""

from ..hookspecs import hookimpl


@hookimpl
def latentexplainer_register_direction_finders(register):
    from ..directions import axes, conditional, ganspace, given, pca, pullback, sefa

    register("axes", axes)
    register("given", given)
    register("pca", pca)
    register("pullback", pullback)
    register("conditional", conditional)
    register("sefa", sefa)
    register("ganspace", ganspace)
