"""The training loop: warm-up -> VampPrior->MoG conversion -> clip bounds -> adversarial phase.

Knows nothing of Ray or MLflow: it talks to a ``MetricSink`` and to an ``on_checkpoint``
callback, and takes a ``grad_sync`` hook that the Ray Train adapter fills with an all-reduce.

Image sources (``images.ImageSource``) are epoch-based: an epoch-unit schedule is converted to
iterations once the dataset size is known (``config.in_iterations``), and the batch of every
iteration is a function of ``(seed, iteration, global batch)`` sharded over the ranks, so a
checkpoint taken with N workers resumes with M workers on the same data order.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import make_state
from .config import ExperimentConfig, in_iterations
from .data import PointSource
from .evaluation import evaluate
from .ex_post import refit_prior
from .model import Model, build_model, convert_prior
from .networks import apply_speed_switches, use_local_batchnorm, use_sync_batchnorm
from .priors import MixturePrior, VampPrior
from .step import GradSync, Optimizers, introspective_step, make_optimizers, no_sync, vae_step
from .tracking import MetricSink, NullSink

# on_checkpoint(state, iteration, metrics, final) is called on *every* rank at the same iterations
# (Ray Train's report is a barrier); only the main rank's state is complete.
CheckpointHook = Callable[[dict[str, Any] | None, int, dict[str, float], bool], None]
# gather(obj) is a collective called on every rank at the same iterations; it returns every rank's
# obj in rank order (the Ray Train adapter fills it with all_gather_object).
Gather = Callable[[Any], list[Any]]


def gather_local(obj: Any) -> list[Any]:
    """Single process: the only rank's object."""
    return [obj]


@dataclass
class TrainResult:
    model: Model
    metrics: dict[str, float]
    iteration: int
    state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _generators(cfg: ExperimentConfig, rank: int, device: torch.device) -> dict[str, torch.Generator]:
    """Per-rank seeded generators: data on CPU, model noise on the model's device (SPEC §5)."""
    data = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    noise = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + 10_007 + rank)
    return {"data": data, "noise": noise}


def _restore_generators(gens: dict[str, torch.Generator], saved: dict[str, Any], cfg: ExperimentConfig, rank: int,
                        iteration: int, rank_states: list[dict[str, Any]] | None = None,
                        world_size: int = 1) -> None:
    """Rank 0 continues its saved streams. Other ranks continue theirs when the checkpoint carries
    every rank's streams (``rank_states``) from a run with the same number of ranks, so a resumed
    multi-worker run is bit-identical to an uninterrupted one; otherwise (an older checkpoint, or
    another number of workers) they reseed from (seed, rank, iteration), so ranks never draw alike."""
    same_world = rank_states is not None and len(rank_states) == world_size
    for name, g in gens.items():
        if rank == 0:
            g.set_state(saved[name])
        elif same_world and name in rank_states[rank]:
            g.set_state(rank_states[rank][name])
        else:
            g.manual_seed(cfg.seed * 1_000_003 + 10_007 * (name == "noise") + rank + 7_919 * iteration)


def _gather_generators(gens: dict[str, torch.Generator], gather: Gather) -> list[dict[str, torch.Tensor]]:
    """Every rank's generator states, in rank order (a collective: all ranks call it together)."""
    return gather({name: g.get_state() for name, g in gens.items()})


def _batch(source: PointSource, cfg: ExperimentConfig, it: int, rank: int, world_size: int,
           generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """This rank's real batch on ``device``: an epoch-based shard (images) or fresh samples (2D)."""
    if hasattr(source, "batch_at"):
        return source.batch_at(it, cfg.data.batch_size, rank, world_size, seed=cfg.seed, device=device)[0]
    return source.sample(cfg.data.batch_size // world_size, generator)[0].to(device)


def in_iteration_units(cfg: ExperimentConfig, source: PointSource) -> ExperimentConfig:
    """``cfg`` with an epoch-unit schedule in iterations of ``source`` (images); 2D configs unchanged."""
    if hasattr(source, "steps_per_epoch"):
        return in_iterations(cfg, source.steps_per_epoch(cfg.data.batch_size))
    return cfg


def _build(cfg: ExperimentConfig, source: PointSource, resume: dict[str, Any] | None) -> Model:
    if resume is not None:
        model = build_model(cfg, source.shape, prior_type=resume["prior_type"])
        model.load_state_dict(resume["model"])
        return model
    # pseudo-inputs from M training points, drawn with a rank-independent generator (SPEC §3.3)
    init = source.sample(cfg.prior.num_components, torch.Generator().manual_seed(cfg.seed))[0]
    return build_model(cfg, source.shape, init_points=init)


def _phase_change(model: Model, opt: Optimizers, cfg: ExperimentConfig, it: int) -> Optimizers:
    """Conversion (fresh Adam states) and soft-clip bounds, at their iterations (SPEC §3.4, §4)."""
    if isinstance(model.prior, VampPrior) and it == cfg.conversion_iteration:
        convert_prior(model, cfg)
        opt = make_optimizers(model, cfg)
    if it == cfg.schedule.warmup and isinstance(model.prior, MixturePrior) and cfg.prior.use_soft_clip:
        model.prior.init_clip_bounds()
    return opt


def _state(model: Model, opt: Optimizers, gens: dict[str, torch.Generator], cfg: ExperimentConfig,
           source: PointSource, it: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return make_state(model, cfg, iteration=it, data_shape=source.shape,
                      optimizers={k: o.state_dict() for k, o in opt.items()},
                      generators={k: g.get_state() for k, g in gens.items()}, extra=extra)


def _evaluate_during_training(model: Model, source: PointSource, cfg: ExperimentConfig, device: torch.device,
                              sink: MetricSink, done: int, world_size: int) -> None:
    """The ``schedule.eval_every`` evaluation (main rank, no plots), logged as ``eval/*`` at ``done``.

    The same metrics as the final evaluation (2D: SPEC §6.5, less the gnELBO where
    ``eval.intermediate_gnelbo`` is off; images: the summary, plus FID,
    precision/recall and probes when ``eval.fid_protocol`` is set). It draws from its own seeded
    generators, so training continues exactly as without it. With SyncBatchNorm on several
    workers it runs on a copy with per-worker BatchNorm: the other ranks take no part.
    """
    probe = model
    if cfg.network.sync_bn and world_size > 1:
        probe = use_local_batchnorm(copy.deepcopy(model))
    metrics, _ = evaluate(probe, source, cfg, device=device, plot_dir=None, gnelbo=cfg.eval.intermediate_gnelbo)
    sink.log_metrics(done, {f"eval/{k}": v for k, v in metrics.items()})


def train(cfg: ExperimentConfig, source: PointSource, *, sink: MetricSink | None = None,
          on_checkpoint: CheckpointHook | None = None, grad_sync: GradSync = no_sync, rank: int = 0,
          world_size: int = 1, device: str | torch.device = "cpu", resume: dict[str, Any] | None = None,
          plot_dir: str | Path | None = None, gather: Gather = gather_local) -> TrainResult:
    """Train ``cfg`` on ``source``; returns the model and the final evaluation (main rank).

    ``gather`` collects every rank's generator states at each checkpoint (``extra["rank_generators"]``
    of the main rank's state), so that every rank resumes its own random streams.
    """
    device, sink, is_main = torch.device(device), sink or NullSink(), rank == 0
    user_cfg = cfg  # checkpoints keep the config as given (epochs stay epochs)
    cfg = in_iteration_units(cfg, source)
    model = _build(cfg, source, resume).to(device)
    if cfg.network.sync_bn and world_size > 1:
        use_sync_batchnorm(model)
    apply_speed_switches(model.encoder, model.decoder, cfg.scaling)
    opt, gens = make_optimizers(model, cfg), _generators(cfg, rank, device)
    start = 0
    if resume is not None:
        start = int(resume["iteration"])
        for name, o in opt.items():
            if name in resume["optimizers"]:
                o.load_state_dict(resume["optimizers"][name])
        _restore_generators(gens, resume["generators"], cfg, rank, start,
                            rank_states=resume.get("extra", {}).get("rank_generators"), world_size=world_size)
    sched, metrics, tick = cfg.schedule, {}, time.perf_counter()
    for it in range(start, sched.iterations):
        opt = _phase_change(model, opt, cfg, it)
        opt.set_lr(it, cfg.optim.milestones, cfg.optim.lr_decay)
        x = _batch(source, cfg, it, rank, world_size, gens["data"], device)
        step = vae_step if it < sched.warmup else introspective_step
        metrics = step(model, opt, x, cfg, generator=gens["noise"], iteration=it, grad_sync=grad_sync)
        done = it + 1
        if is_main and sched.log_every and (done % sched.log_every == 0 or done == sched.iterations):
            now = time.perf_counter()
            metrics["train/iterations_per_s"] = sched.log_every / max(now - tick, 1e-9)
            metrics["train/lr"] = opt.encoder.param_groups[0]["lr"]
            sink.log_metrics(done, metrics)
            tick = now
        if is_main and sched.eval_every and done % sched.eval_every == 0 and done < sched.iterations:
            started = time.perf_counter()
            _evaluate_during_training(model, source, cfg, device, sink, done, world_size)
            tick += time.perf_counter() - started  # train/iterations_per_s counts training time only
        if on_checkpoint and sched.checkpoint_every and done % sched.checkpoint_every == 0 and done < sched.iterations:
            ranks = {"rank_generators": _gather_generators(gens, gather)}
            on_checkpoint(_state(model, opt, gens, user_cfg, source, done, extra=ranks) if is_main else None,
                          done, metrics, False)
    # every rank's streams, gathered before the main rank's evaluation (which draws from its own generators)
    ranks = {"rank_generators": _gather_generators(gens, gather)} if on_checkpoint else {}
    use_local_batchnorm(model)  # rank-0-only evaluation must not wait for other ranks
    final: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if is_main:
        if cfg.prior.ex_post != "none" and isinstance(model.prior, MixturePrior):  # an option beside the paper
            sink.log_metrics(sched.iterations, refit_prior(model, source, cfg))
        final, extra = evaluate(model, source, cfg, device=device, plot_dir=plot_dir)
        sink.log_metrics(sched.iterations, {f"eval/{k}": v for k, v in final.items()})
    state = (_state(model, opt, gens, user_cfg, source, sched.iterations, extra={**extra, "metrics": final, **ranks})
             if is_main else None)
    if on_checkpoint:
        on_checkpoint(state, sched.iterations, final, True)
    return TrainResult(model, final, sched.iterations, state, extra)
