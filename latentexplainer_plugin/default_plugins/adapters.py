"""Built-in adapters."""

from ..hookspecs import hookimpl


@hookimpl
def latentexplainer_register_adapters(register):
    from ..adapters.diffusion import DDPMAdapter
    from ..adapters.generator import GeneratorAdapter
    from ..adapters.stable_diffusion import StableDiffusionAdapter
    from ..adapters.stylegan import StyleGANAdapter
    from ..adapters.mmdit import FluxAdapter, SD3Adapter
    from ..adapters.sdxl import SDXLAdapter
    from ..adapters.transformer_diffusion import DiTAdapter, PixArtAdapter
    from ..adapters.vae import VAEAdapter
    from ..vlm.adapter import VLMFeatureAdapter

    register("vae", VAEAdapter)
    register("generator", GeneratorAdapter)
    register("stylegan", StyleGANAdapter)
    register("ddpm", DDPMAdapter)
    register("sd", StableDiffusionAdapter)
    register("dit", DiTAdapter)
    register("pixart", PixArtAdapter)
    register("sdxl", SDXLAdapter)
    register("sd3", SD3Adapter)
    register("flux", FluxAdapter)
    register("vlm", VLMFeatureAdapter)
