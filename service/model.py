"""The model bundle (encoder, decoder, prior) and how it is built, converted and rebuilt."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ExperimentConfig
from .networks import build_networks
from .priors import MixturePrior, Prior, StandardNormalPrior, VampPrior, vamp_to_mixture


class Model(nn.Module):
    """Encoder, decoder and prior of one run."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: Prior):
        super().__init__()
        self.encoder, self.decoder, self.prior = encoder, decoder, prior

    @property
    def prior_type(self) -> str:
        return {StandardNormalPrior: "standard", MixturePrior: "mog", VampPrior: "vamp"}[type(self.prior)]


def build_prior(prior_type: str, cfg: ExperimentConfig, encoder: nn.Module, data_shape: tuple[int, ...],
                init_points: Tensor | None = None) -> Prior:
    """A prior of ``prior_type`` ('standard', 'mog' or 'vamp') for ``cfg``.

    'vamp' takes its pseudo-inputs from ``init_points`` (M training points, SPEC §3.3); without
    them (rebuilding from a checkpoint) they are zeros, to be overwritten by the state dict.
    """
    p, d = cfg.prior, cfg.network.latent_dim
    if prior_type == "standard":
        return StandardNormalPrior(d)
    if prior_type == "mog":
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        return MixturePrior(p.num_components, d, learnable_weights=p.learnable_weights, softclip_k=p.softclip_k,
                            softclip_lower=p.softclip_lower, generator=gen)
    if prior_type == "vamp":
        u = init_points if init_points is not None else torch.zeros(p.num_components, *data_shape)
        return VampPrior(u, encoder, learnable_weights=p.learnable_weights, clamp_unit=len(data_shape) > 1)
    raise ValueError(f"prior_type: {prior_type!r} is not one of ['standard', 'mog', 'vamp']")


def initial_prior_type(cfg: ExperimentConfig) -> str:
    """Prior at iteration 0: SG, a VampPrior to be converted (SPEC §3.4), or a MoG from the start."""
    if cfg.prior.kind == "standard":
        return "standard"
    return "vamp" if cfg.prior.init == "vamp" and cfg.schedule.warmup > 0 else "mog"


def build_model(cfg: ExperimentConfig, data_shape: tuple[int, ...], init_points: Tensor | None = None,
                prior_type: str | None = None) -> Model:
    """Networks seeded from ``cfg.seed`` (identical on every rank) plus the initial prior."""
    encoder, decoder = build_networks(cfg.network, data_shape, seed=cfg.seed)
    prior_type = prior_type or initial_prior_type(cfg)
    return Model(encoder, decoder, build_prior(prior_type, cfg, encoder, data_shape, init_points))


def convert_prior(model: Model, cfg: ExperimentConfig) -> None:
    """Replace the VampPrior by the MoG ``encoder(u_k)`` in place (SPEC §3.4)."""
    assert isinstance(model.prior, VampPrior)
    model.prior = vamp_to_mixture(model.prior, softclip_k=cfg.prior.softclip_k, carry_logits=cfg.prior.carry_logits,
                                  softclip_lower=cfg.prior.softclip_lower)
