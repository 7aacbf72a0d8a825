r"""Refit a trained mixture prior to its encoder's aggregate posterior, after training (an option beside
the paper; service/ex_post.py, docs/modes.md).

    python -m jobs.refit --checkpoint runs/quick-8gaussians-mog-ip-lc/checkpoint.pt --noise 0.5
    python -m jobs.refit --checkpoint CKPT --noise 0.3 --output-dir runs/refit-t0.3

Fits the mixture (same number of components; weights too where the prior has learnable weights)
by EM to ``--points`` encoded training points ``mu(x) + noise * sigma(x) * eps``, evaluates the
model before and after (2D: gnELBO, histogram KL / JSD, mode purity; images: the end-of-training
summary), and writes ``checkpoint.pt`` (config with ``prior.ex_post = "em"``), ``metrics.json``,
``config.yaml`` and the plots into ``--output-dir`` (default ``<checkpoint folder>/ex-post-t<noise>``;
one that holds another run's results is refused, as by ``jobs.train``). The new
checkpoint serves like any other (``python -m jobs.serve --checkpoint DIR/checkpoint.pt``).
Prints both evaluations as JSON. ``--tracking-uri`` also logs the refit as an MLflow run (params, ``eval/*``,
the files, the checkpoint as a pyfunc model) and registers it as a new version of the training run's
model (``--model-name`` another, ``--no-register`` none), as ``jobs.train`` logs and registers a run. The same refit at the end of training: ``jobs.train --set
prior.ex_post=em [--set prior.ex_post_noise=T]``. Exit status 2 for bad input (an unreadable
checkpoint, a model without a mixture prior, a value out of range, an output folder of another run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from jobs.common import CheckpointInputError, load_checkpoint, register_model
from jobs.common import fail as _fail


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a run with a mixture prior")
    p.add_argument("--noise", type=float, default=None,
                   help="t in [0, 1]: share of the posterior's standard deviation in the fitted points "
                        "(default: the checkpoint's prior.ex_post_noise, 0.5 unless set)")
    p.add_argument("--points", type=int, default=None, help="encoded training points (default 50,000)")
    p.add_argument("--iterations", type=int, default=None, help="EM iterations (default 100)")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--no-before", action="store_true", help="skip evaluating the checkpoint as it is")
    p.add_argument("--tracking-uri", default=None,
                   help="also log the refit as an MLflow run of this store: config params, eval/* metrics, the "
                        "output files, and the checkpoint as a pyfunc model (servable as runs:/<id>/...)")
    p.add_argument("--run-name", default=None, help="that run's name (default: ex-post-t<noise>-<time>)")
    p.add_argument("--model-name", default=None,
                   help="with --tracking-uri: the registered model the refit becomes a new version of (default: "
                        "the checkpoint's tracking.model_name, else the model name jobs.train gives its config)")
    p.add_argument("--no-register", dest="register", action="store_false",
                   help="with --tracking-uri: log the refit's pyfunc model but register no model version")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.tracking_uri and (args.model_name is not None or not args.register or args.run_name is not None):
        return _fail("--model-name, --no-register and --run-name name the MLflow run and model version of "
                     "--tracking-uri; give --tracking-uri too (nothing was written)", 2)
    from service import checkpoint
    from service.config import ConfigError, dump_yaml
    from service.evaluation import evaluate
    from service.ex_post import refit_prior
    from service.storage import file_stamps, written_since

    ckpt = Path(args.checkpoint).resolve()
    try:
        state, cfg, model = load_checkpoint(ckpt)
    except CheckpointInputError as e:
        return _fail(str(e), 2)
    if not model.prior.is_mixture:
        return _fail(f"checkpoint: {str(ckpt)!r} has a {model.prior_type!r} prior; jobs.refit needs a mixture "
                     f"(prior.kind='mog')", 2)
    p = cfg.prior
    try:
        prior_cfg = dataclasses.replace(
            p, ex_post="em", ex_post_noise=p.ex_post_noise if args.noise is None else args.noise,
            ex_post_points=p.ex_post_points if args.points is None else args.points,
            ex_post_iterations=p.ex_post_iterations if args.iterations is None else args.iterations)
    except ConfigError as e:
        flag = str(e).split(":")[0].replace("prior.ex_post_", "--").replace("_", "-")
        return _fail(f"{flag} ({e})", 2)
    new_cfg = dataclasses.replace(cfg, prior=prior_cfg)
    out = Path(args.output_dir) if args.output_dir else ckpt.parent / f"ex-post-t{prior_cfg.ex_post_noise:g}"
    from service.ray_train import CONFIG_FILE, OutputTaken, check_output_folder

    try:  # another run's results in --output-dir are not replaced (the same refit again may replace its own)
        check_output_folder(new_cfg, out)
    except OutputTaken as e:
        return _fail(str(e), 2)
    if cfg.data.is_image:
        from service.images import make_image_source

        source = make_image_source(cfg.data, "train")
    else:
        from service.data import make_source

        source = make_source(cfg.data)
    result: dict[str, dict[str, float]] = {}
    if not args.no_before:
        result["before"], _ = evaluate(model, source, cfg)
    fit = refit_prior(model, source, new_cfg)
    before = file_stamps(out)  # only what this refit writes becomes an artifact
    after, extra = evaluate(model, source, new_cfg, plot_dir=out)
    result["after"] = {**after, **fit}
    new_state = checkpoint.make_state(model, new_cfg, iteration=int(state["iteration"]),
                                      data_shape=tuple(state["data_shape"]),
                                      extra={**extra, "metrics": after, "ex_post_from": str(ckpt)})
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save(out / "checkpoint.pt", new_state)
    checkpoint.atomic_write_text(out / "metrics.json", json.dumps(after, indent=2) + "\n")
    checkpoint.atomic_write_text(out / CONFIG_FILE, dump_yaml(new_cfg))
    logged = {}
    if args.tracking_uri:
        logged = _track(args, new_cfg, out, written_since(out, before), after, fit, int(state["iteration"]), ckpt)
        if args.register:
            named = new_cfg if args.model_name is None else dataclasses.replace(
                new_cfg, tracking=dataclasses.replace(new_cfg.tracking, model_name=args.model_name))
            registered = register_model(named, logged, out=sys.stderr)  # stdout stays one JSON document
            if registered:
                logged["registered_model"] = registered
    print(json.dumps({"checkpoint": str(out / "checkpoint.pt"), **logged, **result}, indent=2))
    return 0


def _track(args: argparse.Namespace, cfg, out: Path, files: list[Path], metrics: dict[str, float], fit: dict[str, float],
           iteration: int, source: Path) -> dict[str, str]:
    """The refit as an MLflow run (the same run layout as ``jobs.train``'s: params, metrics, files, model)."""
    import time

    from mlflow.tracking import MlflowClient

    from service.ray_train import MLFLOW_FINAL_WAIT_S, _finish_tracking, start_mlflow_run
    from service.tracking import MlflowSink

    name = args.run_name or f"ex-post-t{cfg.prior.ex_post_noise:g}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = start_mlflow_run(cfg, args.tracking_uri, name, tags={"ex_post.source": str(source)})
    sink = MlflowSink(args.tracking_uri, run_id)
    sink.log_metrics(iteration, {**{f"eval/{k}": v for k, v in metrics.items()}, **fit})
    sink.flush(MLFLOW_FINAL_WAIT_S)
    _finish_tracking(MlflowClient(args.tracking_uri), run_id, out, MLFLOW_FINAL_WAIT_S, args.tracking_uri, files)
    return {"mlflow_run_id": run_id, "tracking_uri": args.tracking_uri}


if __name__ == "__main__":
    raise SystemExit(main())
