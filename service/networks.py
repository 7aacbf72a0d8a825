"""Encoder and decoder networks, built from ``NetworkConfig`` through a registry.

- ``mlp``: the 2D networks of SPEC §6.2.
- ``resnet``: the official Soft-Intro VAE residual encoder / decoder of SPEC §7.2, sized from the
  image shape ((F)MNIST 28x28x1: channels (64, 128); CIFAR-10 32x32x3: (64, 128, 256)).

BatchNorm and data parallelism (``resnet``): by default every worker normalises with the
statistics of its own batch share, as the single-GPU reference does with its whole batch
(per-worker BN). Running statistics are buffers, not parameters: the gradient all-reduce does
not touch them, so workers drift apart slightly; rank 0's buffers are the ones checkpointed and
evaluated (the behaviour of DDP's default ``broadcast_buffers``), and on resume every rank starts
from them. All ranks build the same initial weights and buffers from the seed, so no broadcast is
needed at start. ``network.sync_bn=true`` converts BN to ``torch.nn.SyncBatchNorm`` under a
process group (GPUs only in torch): batch statistics over the global batch, identical running
statistics on every rank. ``use_sync_batchnorm`` / ``use_local_batchnorm`` convert in place (the
VampPrior holds the encoder by reference, so module identity is kept).

Speed switches (``scaling.channels_last``, ``scaling.amp_bf16``, ``scaling.compile``) are applied by
``apply_speed_switches``: channels-last weights and inputs; the networks' bodies under bfloat16
autocast with float32 outputs, so every loss, KL and mixture density stays float32; and
``nn.Module.compile`` (in place: state-dict keys do not change).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn

from .config import ConfigError, NetworkConfig, ScalingConfig


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


# --------------------------------------------------------------------------------------------
# Residual conv nets for images (SPEC §7.2)
# --------------------------------------------------------------------------------------------

def _conv(c_in: int, c_out: int, k: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=1, padding=k // 2, bias=bias)


class ResidualBlock(nn.Module):
    """``LeakyReLU(main(x) + shortcut(x))``; main = conv3x3-BN-LeakyReLU-conv3x3-BN (no conv biases).

    The shortcut is a 1x1 conv (no bias) when the channel count changes, else the identity.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.shortcut = _conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.main = nn.Sequential(_conv(c_in, c_out, 3), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True),
                                  _conv(c_out, c_out, 3), nn.BatchNorm2d(c_out))
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.main(x) + self.shortcut(x))


class _ImageNet(nn.Module):
    """Shared speed switches of the image networks (set by ``apply_speed_switches``)."""

    channels_last = False
    amp_bf16 = False

    def _autocast(self, x: Tensor):
        if not self.amp_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class ResNetEncoder(_ImageNet):
    """``x (B, C, H, W) -> (mu, logvar)``, each (B, d_z).

    5x5 conv-BN-LeakyReLU-AvgPool, then per further channel count a residual block and an
    AvgPool, a final residual block, flatten, linear to ``2 d_z``. (F)MNIST: 928,512 parameters;
    CIFAR-10: 3,382,848.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, channels: tuple[int, ...]):
        super().__init__()
        c, h, w = image_shape
        layers: list[nn.Module] = [_conv(c, channels[0], 5), nn.BatchNorm2d(channels[0]),
                                   nn.LeakyReLU(0.2, inplace=True), nn.AvgPool2d(2)]
        cc = channels[0]
        for ch in channels[1:]:
            layers += [ResidualBlock(cc, ch), nn.AvgPool2d(2)]
            cc = ch
        layers.append(ResidualBlock(cc, cc))
        self.features = nn.Sequential(*layers)
        scale = 2 ** len(channels)
        self.fc = nn.Linear(cc * (h // scale) * (w // scale), 2 * latent_dim)
        self.latent_dim = latent_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with self._autocast(x):
            out = self.fc(self.features(self._layout(x)).flatten(1))
        mu, logvar = out.float().chunk(2, dim=-1)
        return mu, logvar


class ResNetDecoder(_ImageNet):
    """``z (B, d_z) -> x (B, C, H, W)`` (a mean, no output activation).

    Linear to ``F = channels[-1] * (H / 2^L) * (W / 2^L)``, ReLU, reshape; per channel count in
    reverse a residual block and a nearest x2 upsample; a final residual block; 5x5 conv (with
    bias) to the image channels. (F)MNIST: 697,025 parameters; CIFAR-10: 2,382,531.
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, channels: tuple[int, ...]):
        super().__init__()
        c, h, w = image_shape
        scale = 2 ** len(channels)
        cc = channels[-1]
        self.start = (cc, h // scale, w // scale)
        self.fc = nn.Sequential(nn.Linear(latent_dim, cc * (h // scale) * (w // scale)), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        for ch in reversed(channels):
            layers += [ResidualBlock(cc, ch), nn.Upsample(scale_factor=2, mode="nearest")]
            cc = ch
        layers += [ResidualBlock(cc, cc), _conv(cc, c, 5, bias=True)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        with self._autocast(z):
            h = self._layout(self.fc(z).view(-1, *self.start))
            x = self.body(h)
        return x.float().contiguous()


def default_channels(height: int, width: int) -> tuple[int, ...]:
    """SPEC §7.2 channels from the image size: as many x2 poolings L (at most 5) as keep the
    feature map integral and at least 4 pixels wide; channels (64, 128, 256, 512, 512)[:L].

    28x28 -> (64, 128) (7x7 maps); 32x32 -> (64, 128, 256) (4x4 maps).
    """
    levels = 0
    while (levels < 5 and height % 2 ** (levels + 1) == 0 and width % 2 ** (levels + 1) == 0
           and min(height, width) // 2 ** (levels + 1) >= 4):
        levels += 1
    if levels == 0:
        raise ConfigError(f"network.channels: images of {height}x{width} pixels do not fit network.kind='resnet' "
                          f"(height and width must be even and at least 8); resize them")
    return (64, 128, 256, 512, 512)[:levels]


def _build_resnet(cfg: NetworkConfig, data_shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module]:
    if len(data_shape) != 3:
        raise ConfigError(f"network.kind: 'resnet' needs images (C, H, W); the data has shape {data_shape}")
    c, h, w = data_shape
    channels = tuple(cfg.channels) or default_channels(h, w)
    scale = 2 ** len(channels)
    if h % scale or w % scale:
        raise ConfigError(f"network.channels: {list(channels)} halves the image {len(channels)} times; "
                          f"{h}x{w} pixels are not divisible by {scale}; use fewer channel counts, or () for "
                          f"the default of this image size")
    return (ResNetEncoder((c, h, w), cfg.latent_dim, channels),
            ResNetDecoder((c, h, w), cfg.latent_dim, channels))


NETWORKS: dict[str, Callable[[NetworkConfig, tuple[int, ...]], tuple[nn.Module, nn.Module]]] = {
    "mlp": _build_mlp,
    "resnet": _build_resnet,
}


def build_networks(cfg: NetworkConfig, data_shape: tuple[int, ...], seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Encoder and decoder for data of ``data_shape`` (without batch), initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NETWORKS[cfg.kind](cfg, data_shape)


# --------------------------------------------------------------------------------------------
# BatchNorm policy and speed switches (in place)
# --------------------------------------------------------------------------------------------

def use_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm*d`` child by ``SyncBatchNorm`` (same weights and buffers), in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            use_sync_batchnorm(child)
    return module


def use_local_batchnorm(module: nn.Module) -> nn.Module:
    """Inverse of ``use_sync_batchnorm``: ``SyncBatchNorm`` -> ``BatchNorm2d`` sharing its tensors, in place.

    Used before rank-0-only work (evaluation): a SyncBatchNorm in train mode would wait for the
    other ranks.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats, device=child.running_mean.device)
            bn.weight, bn.bias = child.weight, child.bias
            bn.running_mean, bn.running_var = child.running_mean, child.running_var
            bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            use_local_batchnorm(child)
    return module


def apply_speed_switches(encoder: nn.Module, decoder: nn.Module, scaling: ScalingConfig) -> None:
    """``scaling.channels_last`` / ``amp_bf16`` (image networks) and ``compile`` (any), in place."""
    for net in (encoder, decoder):
        if isinstance(net, _ImageNet):
            net.amp_bf16 = scaling.amp_bf16
            net.channels_last = scaling.channels_last
            if scaling.channels_last:
                net.to(memory_format=torch.channels_last)
        if scaling.compile:
            net.compile()
