"""Single-process training steps (SPEC §2): plain PyTorch, seeded, no Ray.

A step computes a loss, back-propagates into exactly the parameters it owns
(``backward(inputs=...)``: the encoder step never even computes decoder gradients), calls the
``grad_sync`` hook (identity here; an all-reduce under Ray Train) and steps the optimisers.
It returns named floats for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .config import ExperimentConfig
from .objectives import decoder_prior_objective, encoder_objective, vae_objective
from .model import Model
from .priors import MixturePrior, active_components, normalized_entropy

GradSync = Callable[[list[nn.Parameter]], None]


def no_sync(params: list[nn.Parameter]) -> None:
    """Single process: nothing to synchronise."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN or Inf (SPEC §2)."""


@dataclass
class Optimizers:
    """One Adam per player; ``prior`` is None when the prior has no trainable parameter."""

    encoder: torch.optim.Optimizer
    decoder: torch.optim.Optimizer
    prior: torch.optim.Optimizer | None = None
    base_lrs: dict[str, float] = field(default_factory=dict)

    def items(self) -> Iterable[tuple[str, torch.optim.Optimizer]]:
        yield "encoder", self.encoder
        yield "decoder", self.decoder
        if self.prior is not None:
            yield "prior", self.prior

    def set_lr(self, iteration: int, milestones: tuple[int, ...], decay: float) -> None:
        """MultiStepLR stepped every iteration, with absolute milestones (SPEC §5)."""
        factor = decay ** sum(1 for m in milestones if m <= iteration)
        for name, opt in self.items():
            for group in opt.param_groups:
                group["lr"] = self.base_lrs[name] * factor


def make_optimizers(model: Model, cfg: ExperimentConfig) -> Optimizers:
    """Fresh Adam states (also used after the VampPrior -> MoG conversion, SPEC §3.4)."""
    lrs = {"encoder": cfg.optim.lr_encoder, "decoder": cfg.optim.lr_decoder, "prior": cfg.prior.lr}
    prior_params = model.prior.trainable_parameters()
    return Optimizers(
        encoder=torch.optim.Adam(model.encoder.parameters(), lr=lrs["encoder"]),
        decoder=torch.optim.Adam(model.decoder.parameters(), lr=lrs["decoder"]),
        prior=torch.optim.Adam(prior_params, lr=lrs["prior"]) if prior_params else None,
        base_lrs=lrs,
    )


def _check_finite(name: str, loss: Tensor, iteration: int) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"{name} is {value} at iteration {iteration}; the adversarial game diverged. "
            "Usually helps: raise objective.beta_neg, or lower optim.lr_encoder / optim.lr_decoder / prior.lr."
        )
    return value


def _backward_step(loss: Tensor, params: list[nn.Parameter], opts: list[torch.optim.Optimizer],
                   grad_sync: GradSync) -> None:
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward(inputs=params)
    grad_sync(params)
    for opt in opts:
        opt.step()


def _summarise(prefix: str, terms: dict[str, Tensor], out: dict[str, float]) -> None:
    for name, value in terms.items():
        if name == "usage":
            out["prior/entropy_norm"] = float(normalized_entropy(value))
            out["prior/active_components"] = float(active_components(value))
        else:
            out[f"{prefix}/{name}"] = float(value.mean())


def vae_step(model: Model, opt: Optimizers, x: Tensor, cfg: ExperimentConfig, *, generator: torch.Generator,
             iteration: int = 0, grad_sync: GradSync = no_sync) -> dict[str, float]:
    """Warm-up iteration: encoder, decoder and whatever the prior has, trained jointly (SPEC §2.1)."""
    loss, terms = vae_objective(model, x, cfg.objective, generator)
    out = {"train/loss_vae": _check_finite("loss_vae", loss, iteration)}
    params = [p for p in model.parameters() if p.requires_grad]
    _backward_step(loss, params, [o for _, o in opt.items()], grad_sync)
    _summarise("train", terms, out)
    return out


def introspective_step(model: Model, opt: Optimizers, x: Tensor, cfg: ExperimentConfig, *,
                       generator: torch.Generator, iteration: int = 0,
                       grad_sync: GradSync = no_sync) -> dict[str, float]:
    """One adversarial iteration: encoder step, then decoder (+ prior) step (SPEC §2.2)."""
    loss_e, terms_e, z, posterior = encoder_objective(model, x, cfg.objective, generator)
    out = {"train/loss_encoder": _check_finite("loss_encoder", loss_e, iteration)}
    _backward_step(loss_e, list(model.encoder.parameters()), [opt.encoder], grad_sync)

    prior_trains = cfg.prior.trainable and isinstance(model.prior, MixturePrior)
    loss_d, terms_d = decoder_prior_objective(model, x, z, posterior, cfg.objective, generator,
                                              prior_trains=prior_trains)
    out["train/loss_decoder"] = _check_finite("loss_decoder", loss_d, iteration)
    params = list(model.decoder.parameters())
    opts = [opt.decoder]
    if prior_trains and opt.prior is not None:
        params += model.prior.trainable_parameters()
        opts.append(opt.prior)
    _backward_step(loss_d, params, opts, grad_sync)

    _summarise("train/enc", terms_e, out)
    _summarise("train/dec", terms_d, out)
    return out
