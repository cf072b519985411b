"""Test-wide settings: no external plugins, no hub access, few threads, seeded RNGs."""

import os

os.environ.setdefault("LATENTEXPLAINER_NO_PLUGINS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LATENTEXPLAINER_THRESHOLDS", "none")  # a developer's calibration file must not change tests

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: with 2, torch's workers busy-wait whenever another process (a CLI subprocess,
# chromium) shares the 2 cores, and small models get 10-100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    # Library code may change the process-wide thread count (train_vae sets TrainConfig.threads and
    # keeps it): pin it per test so a test's float results do not depend on which tests ran before.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_vae():
    """An untrained 16x16 ConvVAE with 4 latents (fast; structure tests only)."""
    from latentexplainer_plugin.models.conv_vae import ConvVAE, ConvVAEConfig

    torch.manual_seed(0)
    return ConvVAE(ConvVAEConfig(latent_dim=4, image_size=16, width=8, hidden=32)).eval()


@pytest.fixture(scope="session")
def tiny_trained_vae(tmp_path_factory):
    """A directory with ``data.npz`` (64 shapes images, 16x16) and ``model/`` trained by ``train-vae`` (3 latents,
    300 steps, about 3 s: enough for every latent to change the images consistently, so the image evidence
    lets answers about them be clear)."""
    import numpy as np

    from latentexplainer_plugin.cli import main
    from latentexplainer_plugin.data.shapes import ShapesSpec, make_dataset

    root = tmp_path_factory.mktemp("tiny-vae")
    np.savez(root / "data.npz", **make_dataset(64, ShapesSpec(size=16), seed=3))
    code = main(["train-vae", "--data", str(root / "data.npz"), "--out", str(root / "model"),
                 "--steps", "300", "--latents", "3", "--batch-size", "8", "--threads", "1", "--quiet"])
    assert code == 0
    return root
