"""Encoder and decoder networks (SPEC §6.2), built from ``NetworkConfig`` through a registry."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .config import NetworkConfig


def _mlp(d_in: int, d_out: int, hidden: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]  # in place: Linear saves its input, not its output
        width = hidden
    layers.append(nn.Linear(width, d_out))  # linear output
    return nn.Sequential(*layers)


class MlpEncoder(nn.Module):
    """``x (B, d_x) -> (mu, logvar)``, each (B, d_z): 2 -> 256 x4 -> 2 d_z with ReLU."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: int = 256, depth: int = 4):
        super().__init__()
        self.latent_dim = latent_dim
        self.net = _mlp(data_dim, 2 * latent_dim, hidden, depth)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=-1)
        return mu, logvar


class MlpDecoder(nn.Module):
    """``z (B, d_z) -> x (B, d_x)``: d_z -> 256 x4 -> 2, linear output (a mean)."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: int = 256, depth: int = 4):
        super().__init__()
        self.net = _mlp(latent_dim, data_dim, hidden, depth)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def _build_mlp(cfg: NetworkConfig, data_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    (data_dim,) = data_shape
    return (MlpEncoder(data_dim, cfg.latent_dim, cfg.hidden, cfg.depth),
            MlpDecoder(data_dim, cfg.latent_dim, cfg.hidden, cfg.depth))


NETWORKS: dict[str, Callable[[NetworkConfig, tuple[int, ...]], tuple[nn.Module, nn.Module]]] = {
    "mlp": _build_mlp,
}


def build_networks(cfg: NetworkConfig, data_shape: tuple[int, ...], seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Encoder and decoder for data of ``data_shape`` (without batch), initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NETWORKS[cfg.kind](cfg, data_shape)
