"""A small convolutional VAE (the demo model and what ``train-vae`` trains).

Saved as a directory with ``config.json`` and ``model.safetensors``, loaded only through
safetensors: no pickle is ever read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ConvVAEConfig:
    """Architecture of :class:`ConvVAE`; ``image_size`` must be a power of two >= 16."""

    latent_dim: int = 10
    image_size: int = 64
    channels: int = 3
    width: int = 32
    hidden: int = 256
    model_type: str = "conv-vae"

    def __post_init__(self) -> None:
        size = self.image_size
        if size < 16 or size & (size - 1):
            raise ValueError(f"image_size must be a power of two >= 16, got {size}")
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim}")


def _n_down(config: ConvVAEConfig) -> int:
    return int(math.log2(config.image_size)) - 2  # down to 4x4


class Encoder(nn.Module):
    def __init__(self, config: ConvVAEConfig):
        super().__init__()
        chans = [config.channels] + [config.width * min(2, 1 + i // 2) for i in range(_n_down(config))]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.SiLU()]
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * 16, config.hidden), nn.SiLU())
        self.head = nn.Linear(config.hidden, 2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.fc(self.conv(x))).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    """Maps latents ``z`` (B, latent_dim) to images in [0, 1] (B, C, H, W)."""

    def __init__(self, config: ConvVAEConfig):
        super().__init__()
        n = _n_down(config)
        chans = [config.width * min(2, 1 + i // 2) for i in range(n)][::-1] + [config.channels]
        self.top = chans[0]
        self.fc = nn.Sequential(
            nn.Linear(config.latent_dim, config.hidden), nn.SiLU(),
            nn.Linear(config.hidden, chans[0] * 16), nn.SiLU(),
        )
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers.append(nn.ConvTranspose2d(cin, cout, 4, 2, 1))
            if i < n - 1:
                layers.append(nn.SiLU())
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.top, 4, 4)
        return torch.sigmoid(self.deconv(h))


class ConvVAE(nn.Module):
    """Gaussian-latent VAE with an ``encoder`` and a ``decoder`` whose input is the latent."""

    def __init__(self, config: ConvVAEConfig | None = None):
        super().__init__()
        self.config = config or ConvVAEConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z), mu, logvar, z

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config) | (extra or {})
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu", allow_pickle: bool = False) -> "ConvVAE":
        """Load config.json + model.safetensors (a pickle checkpoint only with ``allow_pickle``)."""
        from ..safe_load import find_weights, read_config

        directory = Path(directory)
        raw = read_config(directory / CONFIG_NAME)
        known = {f.name for f in fields(ConvVAEConfig)}
        if raw.get("model_type", "conv-vae") != "conv-vae":
            raise ValueError(f"{directory} holds a {raw.get('model_type')!r} model, not a conv-vae")
        model = cls(ConvVAEConfig(**{k: v for k, v in raw.items() if k in known}))
        state = find_weights(directory, WEIGHTS_NAME, allow_pickle=allow_pickle)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # tensor shapes that do not fit the config
            from ..safe_load import LoadError

            detail = "; ".join(line.strip().rstrip(".") for line in str(exc).splitlines()[1:3])
            raise LoadError(f"the weights in {directory} do not match its config.json: {detail}") from None
        if missing or unexpected:
            raise ValueError(
                f"{directory / WEIGHTS_NAME} does not match the config: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        model.extra_config = {k: v for k, v in raw.items() if k not in known}
        return model.to(device).eval()


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N,H,W,C) uint8 -> (N,C,H,W) float in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
