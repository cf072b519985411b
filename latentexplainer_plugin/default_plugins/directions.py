"""Built-in direction finders."""

from ..hookspecs import hookimpl


@hookimpl
def latentexplainer_register_direction_finders(register):
    from ..directions import axes, given

    register("axes", axes)
    register("given", given)
