"""Built-in explainer backends."""

from ..hookspecs import hookimpl


def _offline(arg=None, **options):
    from ..backends.offline import OfflineBackend

    return OfflineBackend(**options)


@hookimpl
def latentexplainer_register_backends(register):
    register("offline", _offline)
