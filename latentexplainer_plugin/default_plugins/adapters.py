"""Built-in adapters."""

from ..hookspecs import hookimpl


@hookimpl
def latentexplainer_register_adapters(register):
    from ..adapters.diffusion import DDPMAdapter
    from ..adapters.generator import GeneratorAdapter
    from ..adapters.stable_diffusion import StableDiffusionAdapter
    from ..adapters.vae import VAEAdapter

    register("vae", VAEAdapter)
    register("generator", GeneratorAdapter)
    register("ddpm", DDPMAdapter)
    register("sd", StableDiffusionAdapter)
