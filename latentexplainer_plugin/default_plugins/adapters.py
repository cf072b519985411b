"""Built-in adapters."""

from ..hookspecs import hookimpl


@hookimpl
def latentexplainer_register_adapters(register):
    from ..adapters.diffusion import DDPMAdapter
    from ..adapters.vae import VAEAdapter

    register("vae", VAEAdapter)
    register("ddpm", DDPMAdapter)
