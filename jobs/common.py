"""Shared command-line plumbing of the entry points: preset + overrides -> validated config."""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys

from service.config import ConfigError, ExperimentConfig, apply_overrides, load_yaml
from service.presets import PRESETS, get_preset, quick, smoke


def add_config_args(p: argparse.ArgumentParser, default_preset: str | None = "8gaussians/mog-ip-lc") -> None:
    p.add_argument("--preset", default=default_preset, help="experiment preset (see --list-presets)")
    p.add_argument("--config", help="YAML dump of a full config (config.yaml of an earlier run); replaces --preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set objective.beta_kl=0.5 (repeatable)")
    p.add_argument("--smoke", action="store_true", help="shrink to a seconds-long run (tests, CI)")
    p.add_argument("--quick", action="store_true", help="shrink to a minutes-long schedule (5,000 iterations; 2D batch 256)")
    p.add_argument("--workers", type=int, help="Ray Train workers (data parallel)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--list-presets", action="store_true", help="print preset names and exit")


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    """Preset (or --config), then --smoke/--quick, then --set overrides, then flags; all validated."""
    cfg = load_yaml(args.config) if args.config else get_preset(args.preset)
    if args.smoke:
        cfg = smoke(cfg)
    elif args.quick:
        cfg = quick(cfg)
    cfg = apply_overrides(cfg, args.overrides)
    if args.workers is not None or args.gpu:
        scaling = dataclasses.replace(cfg.scaling, workers=cfg.scaling.workers if args.workers is None else args.workers,
                                      use_gpu=args.gpu or cfg.scaling.use_gpu)
        cfg = apply_overrides(dataclasses.replace(cfg, scaling=scaling), {})
    if args.seed is not None:
        cfg = apply_overrides(cfg, {"seed": args.seed})
    return cfg


def config_or_exit(args: argparse.Namespace) -> ExperimentConfig | None:
    """Print presets or a config error (to stderr) and return None; nothing has been written."""
    if args.list_presets:
        print("\n".join(sorted(PRESETS)))
        return None
    try:
        return resolve_config(args)
    except (ConfigError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) else str(e)
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


def fail(message: str, code: int) -> int:
    """Print ``error: <message>`` to stderr and return ``code``: a job's ``main`` returns it as its exit status."""
    print(f"error: {message}", file=sys.stderr)
    return code


class CheckpointInputError(Exception):
    """A ``--checkpoint`` that is missing, unreadable, or does not build its model; the message starts with
    ``checkpoint``."""


def load_checkpoint(path, device="cpu"):
    """``(state, cfg, model)`` of the checkpoint file ``path``, model on ``device`` (``service.checkpoint``'s
    checks); any reason it cannot be used raises ``CheckpointInputError`` (torch is imported here, not at start)."""
    from service.checkpoint import CheckpointError, load, restore_model

    try:
        state = load(path)
        cfg, model = restore_model(state, device)
    except (CheckpointError, ConfigError, KeyError, RuntimeError) as e:
        raise CheckpointInputError(str(e) if str(e).startswith("checkpoint") else f"checkpoint: {e}") from None
    return state, cfg, model


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def register_model(cfg, result: dict, out=None) -> str | None:
    """A new version of the run's registered model: its ``models:/NAME/VERSION`` URI, printed to ``out``
    (stdout by default). A store without a registry (a file store) only warns (stderr) and gives None."""
    from service.mlflow_model import RegistrationError, default_model_name, register

    name = cfg.tracking.model_name or default_model_name(cfg.name)
    try:
        version = register(result["tracking_uri"], result["mlflow_run_id"], name)
    except RegistrationError as e:
        print(f"warning: {e}; the run and its logged model are complete (--no-register skips this step)",
              file=sys.stderr)
        return None
    uri = f"models:/{name}/{version.version}"
    print(f"registered model: {uri}  (mlflow models serve -m {uri} --env-manager local)", file=out or sys.stdout)
    return uri
