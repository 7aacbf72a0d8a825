"""Residual image networks (SPEC §7.2), BatchNorm policy, speed switches, image presets and schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.config import ConfigError, ExperimentConfig, NetworkConfig, ScalingConfig, apply_overrides
from service.networks import (ResidualBlock, apply_speed_switches, build_networks, default_channels,
                              use_local_batchnorm, use_sync_batchnorm)


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("shape, latent, enc_params, dec_params", [
    ((1, 28, 28), 32, 928_512, 697_025),  # (F)MNIST, official counts
    ((3, 32, 32), 128, 3_382_848, 2_382_531),  # CIFAR-10, official counts
])
def test_official_parameter_counts_and_shapes(shape, latent, enc_params, dec_params):
    enc, dec = build_networks(NetworkConfig(kind="resnet", latent_dim=latent), shape)
    assert (_count(enc), _count(dec)) == (enc_params, dec_params)
    mu, logvar = enc(torch.rand(3, *shape))
    assert mu.shape == logvar.shape == (3, latent)
    assert dec(mu).shape == (3, *shape)


def test_default_channels_follow_the_image_size():
    assert default_channels(28, 28) == (64, 128) and default_channels(32, 32) == (64, 128, 256)
    assert default_channels(64, 48) == (64, 128, 256)  # 48 / 16 = 3 < 4 pixels: three poolings
    enc, dec = build_networks(NetworkConfig(kind="resnet", latent_dim=4, channels=(8, 16)), (3, 12, 20))
    assert dec(enc(torch.rand(2, 3, 12, 20))[0]).shape == (2, 3, 12, 20)  # non-square, custom channels
    with pytest.raises(ConfigError, match="network.channels: images of 7x7 pixels do not fit"):
        build_networks(NetworkConfig(kind="resnet"), (1, 7, 7))
    with pytest.raises(ConfigError, match=r"network.channels: \[8, 16, 32\] halves the image 3 times; 28x28"):
        build_networks(NetworkConfig(kind="resnet", channels=(8, 16, 32)), (1, 28, 28))


def test_residual_block_shortcut_is_identity_only_for_equal_channels():
    assert isinstance(ResidualBlock(8, 8).shortcut, nn.Identity)
    conv = ResidualBlock(8, 16).shortcut
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None


def test_sync_batchnorm_round_trip_keeps_tensors_and_state_keys():
    enc, _ = build_networks(NetworkConfig(kind="resnet", latent_dim=4, channels=(4, 8)), (1, 8, 8))
    keys = list(enc.state_dict())
    first_bn = enc.features[1]
    use_sync_batchnorm(enc)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in enc.modules()) == 5  # stem + 2 per residual block
    assert list(enc.state_dict()) == keys  # checkpoints stay interchangeable
    x = torch.rand(5, 1, 8, 8)
    out_sync = enc(x)[0]  # no process group: SyncBatchNorm falls back to local statistics
    use_local_batchnorm(enc)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in enc.modules())
    assert enc.features[1].weight is first_bn.weight and enc.features[1].running_mean is first_bn.running_mean
    assert torch.allclose(enc(x)[0], out_sync, atol=1e-6)


def test_channels_last_and_bf16_autocast_run_on_cpu_and_keep_float32_outputs():
    cfg = NetworkConfig(kind="resnet", latent_dim=8, channels=(8, 16))
    ref_enc, ref_dec = build_networks(cfg, (1, 16, 16), seed=1)
    enc, dec = build_networks(cfg, (1, 16, 16), seed=1)
    apply_speed_switches(enc, dec, ScalingConfig(channels_last=True, amp_bf16=True))
    assert enc.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 16, 16)
    mu, logvar = enc(x)
    y = dec(mu)
    assert mu.dtype == logvar.dtype == y.dtype == torch.float32
    ref_mu = ref_enc(x)[0]
    assert torch.allclose(mu, ref_mu, atol=0.1, rtol=0.05) and not torch.equal(mu, ref_mu)  # bf16 rounding only
    y.pow(2).sum().backward()  # gradients reach float32 parameters
    assert dec.body[-1].weight.grad is not None and dec.body[-1].weight.grad.dtype == torch.float32


def test_image_specific_switches_are_rejected_for_2d_networks():
    with pytest.raises(ConfigError, match="scaling.channels_last / scaling.amp_bf16 / network.sync_bn: only for"):
        ExperimentConfig(scaling=ScalingConfig(amp_bf16=True))
    with pytest.raises(ConfigError, match="network.kind: 'mlp' does not fit data.dataset='fmnist'; allowed resnet"):
        apply_overrides(ExperimentConfig(), {"data.dataset": "fmnist"})


# --------------------------------------------------------------------------------------------
# Presets (SPEC §7.3) and the epoch-based schedule
# --------------------------------------------------------------------------------------------

def test_image_presets_follow_spec_7_3():
    from service.presets import PRESETS, get_preset

    for dataset in ("mnist", "fmnist", "cifar10"):
        names = {k.split("/", 1)[1] for k in PRESETS if k.startswith(f"{dataset}/")}
        assert names == {"sintro"} | {f"mog{m}-{c}" for m in (10, 100) for c in ("fixed", "fixed-lc", "ip", "ip-lc")}
    cfg = get_preset("fmnist/mog100-ip-lc")
    assert (cfg.network.kind, cfg.network.latent_dim, cfg.data.batch_size) == ("resnet", 32, 128)
    assert (cfg.objective.beta_rec, cfg.objective.beta_kl, cfg.objective.beta_neg) == (1.0, 1.0, 256.0)
    assert (cfg.prior.num_components, cfg.prior.learnable_weights, cfg.prior.trainable) == (100, True, True)
    assert cfg.prior.use_soft_clip and cfg.objective.r_entropy == 10.0 and cfg.objective.mc_samples == 100
    assert (cfg.schedule.unit, cfg.schedule.iterations, cfg.schedule.warmup, cfg.prior.mog_warmup) == ("epochs", 220, 20, 5)
    assert cfg.optim.milestones == (350,)  # constant lr over 220 epochs
    assert get_preset("mnist/sintro").objective.beta_neg == 128.0 and get_preset("mnist/sintro").objective.r_entropy == 0
    cifar = get_preset("cifar10/mog10-fixed")
    assert (cifar.network.latent_dim, cifar.data.batch_size, cifar.prior.trainable) == (128, 32, False)


def test_epoch_schedule_converts_to_iterations():
    from service.config import in_iterations
    from service.presets import get_preset

    cfg = get_preset("fmnist/mog10-ip-lc")
    it = in_iterations(cfg, steps_per_epoch=468)  # 60,000 // 128
    assert it.schedule.unit == "iterations" and it.schedule.iterations == 220 * 468
    assert it.schedule.warmup == 20 * 468 and it.conversion_iteration == 15 * 468  # conversion at epoch 15
    assert it.schedule.checkpoint_every == 10 * 468 and it.optim.milestones == (350 * 468,)
    assert it.schedule.log_every == cfg.schedule.log_every  # logging cadence stays in iterations
    assert in_iterations(it, 999) is it  # already in iterations
    with pytest.raises(ConfigError, match="schedule.unit: 'epochs' needs an image dataset"):
        apply_overrides(get_preset("8gaussians/sintro"), {"schedule.unit": "epochs"})
    with pytest.raises(ConfigError, match="network.sync_bn: torch's SyncBatchNorm runs on GPUs only"):
        apply_overrides(cfg, {"network.sync_bn": True, "scaling.workers": 2})
