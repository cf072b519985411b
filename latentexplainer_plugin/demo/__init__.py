"""The demo: procedural shapes data, a small beta-TCVAE trained on it, and its shipped weights."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEMO_SEED = 0
DEMO_TRAIN_SIZE = 30000
DEMO_EVAL_SEED = 1  # held-out images for KL and factor scores


def load_demo_model(device: str = "cpu"):
    """The shipped demo VAE (10 latents, 64x64 shapes)."""
    from ..models.conv_vae import ConvVAE

    if not (WEIGHTS_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"demo weights are missing from {WEIGHTS_DIR}; run `latentexplainer train-demo`")
    return ConvVAE.from_pretrained(WEIGHTS_DIR, device=device)


def demo_data(n: int = 2000, seed: int = DEMO_EVAL_SEED) -> dict:
    """Held-out demo images with their factors (the ``train-vae`` npz layout)."""
    from ..data.shapes import make_dataset

    return make_dataset(n, seed=seed)
