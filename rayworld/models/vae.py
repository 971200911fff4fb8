"""Convolutional VAE from World Models (Ha & Schmidhuber 2018), 3x64x64 frames."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ConvVAE(nn.Module):
    def __init__(self, latent: int = 32):
        super().__init__()
        self.latent = latent
        # 64 -> 31 -> 14 -> 6 -> 2 spatial, so 256*2*2 = 1024 features.
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 128, 4, stride=2), nn.ReLU(),
            nn.Conv2d(128, 256, 4, stride=2), nn.ReLU(),
            nn.Flatten(),
        )
        self.fc_mu = nn.Linear(1024, latent)
        self.fc_logvar = nn.Linear(1024, latent)
        self.fc_dec = nn.Linear(latent, 1024)
        # 1 -> 5 -> 13 -> 30 -> 64 spatial.
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(1024, 128, 5, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(128, 64, 5, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 6, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(32, 3, 6, stride=2), nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.fc_dec(z).view(-1, 1024, 1, 1))

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu  # deterministic reconstructions for evaluation
        return self.decode(z), mu, logvar


def foreground(x: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """1 where a pixel differs from the batch's per-pixel median frame (the static screen)."""
    background = x.median(dim=0).values
    return ((x - background).abs().sum(1, keepdim=True) > threshold).to(x.dtype)


def vae_loss(x, x_hat, mu, logvar, beta: float = 1.0, kl_tolerance: float = 0.5,
             foreground_weight: float = 0.0) -> dict:
    """Paper loss: per-image summed L2 plus KL with free bits.

    As in the paper's code the free-bits floor is applied per sample before the
    batch mean, so samples already under the floor contribute no KL gradient.
    foreground_weight > 0 adds that multiple of the error on pixels that differ from the
    batch's median frame: a ball of two pixels otherwise costs less than the KL of coding it.
    """
    err = (x_hat - x).pow(2)
    if foreground_weight > 0:
        err = err * (1 + foreground_weight * foreground(x))
    recon = err.flatten(1).sum(1).mean()
    kl_per = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
    kl_clamped = torch.clamp(kl_per, min=kl_tolerance * mu.shape[1]).mean()
    return {"loss": recon + beta * kl_clamped, "recon": recon, "kl": kl_per.mean()}


def kl_beta(step: int, beta: float, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return float(beta)
    return float(beta) * min(1.0, max(0, step) / warmup_steps)


def to_float(frames_uint8) -> torch.Tensor:
    """uint8 [..., H, W, C] (tensor or array) -> float [..., C, H, W] in [0, 1]."""
    t = frames_uint8 if torch.is_tensor(frames_uint8) else torch.from_numpy(np.asarray(frames_uint8))
    return t.movedim(-1, -3).float().div_(255.0)
