"""Built-in direction finders, each a :class:`~latentexplainer_plugin.directions.finders.Finder`
called ``finder(adapter, *, seed, data, **options)`` like any third-party finder."""

from ..hookspecs import hookimpl


@hookimpl
def latentexplainer_register_direction_finders(register):
    from ..directions.finders import BUILTIN_FINDERS

    for finder in BUILTIN_FINDERS:
        register(finder.name, finder)
