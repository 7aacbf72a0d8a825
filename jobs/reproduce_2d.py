"""Reproduce (part of) the paper's Table 1: selected hyperparameters, N seeds, ours beside the paper's.

    python -m jobs.reproduce_2d --datasets 8gaussians --configs sintro,mog-ip-lc --seeds 3
    python -m jobs.reproduce_2d --datasets all --configs all --seeds 5      # the whole of Table 1
    python -m jobs.reproduce_2d --datasets 8gaussians --configs sintro --seeds 2 --smoke   # seconds a trial

The hyperparameters are those of ``tune_spaces/reproduce_table1.yaml``: the paper's own grid
selection for the standard Gaussian (paper Table 3), the presets' official S-Intro VAE values
(SPEC §6.3) for the MoG configurations (the paper does not publish their selections). Every
trial is a Ray Tune trial running one Ray Train run (``jobs.sweep`` underneath: same resources,
MLflow parent run, resume by re-running with the same ``--output-dir``). Full schedule: 30,000
iterations, roughly 30 min (SG) to 51 min (MoG IP + LC) per trial alone on 2 CPU threads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from service.config import TOY_DATASETS, ConfigError
from service.presets import CONFIGURATIONS
from service.spaces import spec_from_dict
from service.tables import aggregate, render_comparison
from service.tuning import run_sweep

TABLE1_SPACE = Path(__file__).resolve().parents[1] / "tune_spaces" / "reproduce_table1.yaml"


def _choices(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    names = list(allowed) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ConfigError(f"{flag}: {bad or text!r} not allowed; allowed a comma-separated subset of "
                          f"{list(allowed)} or 'all'")
    return names


def build_space(datasets: list[str], configs: list[str], seeds: int) -> tuple[dict, str]:
    """The chosen rows of reproduce_table1.yaml with ``seeds`` seeds, as a space dict and its YAML text."""
    table1 = yaml.safe_load(TABLE1_SPACE.read_text())
    presets = {f"{d}/{c}": table1["presets"][f"{d}/{c}"] or {} for d in datasets for c in configs}
    space = {"presets": presets, "seeds": list(range(seeds)), "metric": "hist_kl", "mode": "min", "smoke": False}
    return space, f"# jobs.reproduce_2d, from {TABLE1_SPACE.name}\n" + yaml.safe_dump(space, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="8gaussians", help=f"comma-separated subset of {list(TOY_DATASETS)}, or all")
    p.add_argument("--configs", default="sintro,mog-ip-lc",
                   help=f"comma-separated subset of {list(CONFIGURATIONS)}, or all")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (0..N-1; the paper used 5)")
    shrink = p.add_mutually_exclusive_group()
    shrink.add_argument("--smoke", action="store_const", const="smoke", dest="shrink", help="seconds-long trials")
    shrink.add_argument("--quick", action="store_const", const="quick", dest="shrink", help="5,000 iterations")
    p.add_argument("--output-dir", help="default runs/reproduce_2d-<full|quick|smoke>; re-use to resume")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the CPUs/GPUs fit)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, fractions allowed")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)")
    args = p.parse_args(argv)
    shrink_name = args.shrink or "full"
    try:
        if args.seeds < 1:
            raise ConfigError(f"--seeds: {args.seeds} is invalid; allowed integers >= 1")
        datasets = _choices(args.datasets, TOY_DATASETS, "--datasets")
        configs = _choices(args.configs, tuple(CONFIGURATIONS), "--configs")
        space, text = build_space(datasets, configs, args.seeds)
        spec = spec_from_dict(space, "reproduce_2d", text)
        spec.configs(shrink_name)
        out = Path(args.output_dir or f"runs/reproduce_2d-{shrink_name}")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        df = run_sweep(spec, output_dir=out, shrink=shrink_name, max_concurrent=args.max_concurrent,
                       gpus_per_trial=args.gpus_per_trial, tracking_uri=args.tracking_uri)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tables = aggregate(df, spec.metric, spec.mode)
    print(f"\nTable 1 subset, {shrink_name} schedule, {args.seeds} seed(s); lower is better; gnELBO x 1e7.\n")
    print(render_comparison(tables.summary))
    ok = int((df["status"] == "ok").sum())
    print(f"{ok}/{len(df)} trials completed; results: {out.resolve() / 'results.parquet'}, "
          f"{out.resolve() / 'table.md'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
