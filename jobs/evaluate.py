r"""Evaluate a trained image model (SPEC §7.4): FID(GEN), FID(REC), precision / recall, latent probes,
prior usage, mode purity (mixtures, labelled images), plots and a Parquet export of the latents; or
re-evaluate a 2D / tabular model (SPEC §6.5) with today's metrics.

    python -m jobs.evaluate --checkpoint runs/fmnist-mog10/checkpoint.pt --protocol cnn
    python -m jobs.evaluate --checkpoint ckpt.pt --protocol paper --n-samples 50000 \
        --tracking-uri sqlite:////abs/mlflow.db --run-id <id of the training run>

Protocols: ``clean`` (default; clean-fid's InceptionV3), ``paper`` (the paper's train-mode
Inception, comparable with its tables), ``cnn`` (offline: a classifier trained by the project on the
dataset, reported as ``fid_<dataset>_cnn``, not FID). The Inception weights must be downloadable
or already in place (see ``service.feature_extractor``); no protocol falls back to another.

Mixture priors on labelled images also get ``mode_purity`` / ``modes_covered``: ``--purity-samples``
decoded images per component (default ``eval.purity_samples``, 50 with ``--smoke``, 0 skips),
labelled by the offline classifier of the ``cnn`` protocol (whatever ``--protocol``; trained and
cached on first use); the per-component lists go to ``evaluation.json``.

2D and tabular checkpoints get the evaluation that ends ``jobs.train`` (SPEC §6.5: gnELBO, histogram
KL / JSD, prior usage, mode purity and each data mode's placement, calibrated-decoder KL / JSD, plots)
with today's code: ``--seed 0`` repeats the run's own draws, so a checkpoint trained before a metric
existed gets it, and the metrics it had come out the same; ``--seed S`` draws afresh (the metrics'
sampling noise). ``--protocol`` and the image flags do not apply; the files go to ``<checkpoint
folder>/eval`` by default, and per-mode shares, offsets and widths into ``evaluation.json``.

    python -m jobs.evaluate --checkpoint runs/gnelbo/checkpoint.pt

Writes ``metrics.json``, ``evaluation.json`` (protocol, extractor, checkpoint provenance), the plots
and ``latents.parquet`` into ``--output-dir`` (default ``<checkpoint folder>/eval-<protocol>``),
prints the metrics as JSON, and with ``--tracking-uri`` / ``--run-id`` logs them as ``eval/<name>``
with the files as artifacts under ``evaluation/`` (a new run when only the URI is given). Exit
status 2 for bad input (missing or unreadable checkpoint, unknown protocol, missing data), 1 when
the protocol's network is unavailable here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from jobs.common import CheckpointInputError, load_checkpoint
from jobs.common import fail as _fail
from service.feature_extractor import PROTOCOLS

DEFAULT_SAMPLES = {"clean": 50_000, "paper": 50_000, "cnn": 10_000}


def _positive(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value} is too small; allowed integers >= 2")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; allowed integers >= 0")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt of a run (image, 2D or tabular)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="clean", help="feature extractor (default: clean)")
    p.add_argument("--n-samples", type=_positive,
                   help="images per FID set (default 50,000 for clean/paper, 10,000 for cnn; capped at the train split)")
    p.add_argument("--output-dir", help="where metrics.json, plots and latents.parquet go")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (with --run-id: log into that run)")
    p.add_argument("--run-id", help="MLflow run to log into (default URI: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    p.add_argument("--probe-train", type=_positive, help="training latents for the probes (default: the whole split)")
    p.add_argument("--tsne-points", type=_positive, help="test latents in the t-SNE plot (default 2,000)")
    p.add_argument("--extractor-train-images", type=_positive,
                   help="cnn and mode purity: train the classifier on the first N training images (default: all)")
    p.add_argument("--cache-dir", help="cnn and mode purity: classifier cache "
                                       "(default $INTROPRIOR_CACHE_DIR or ~/.cache/introprior/extractors)")
    p.add_argument("--purity-samples", type=_non_negative,
                   help="mixtures: decoded images per component for mode purity (default eval.purity_samples, "
                        "50 with --smoke; 0 skips)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every evaluation draw (2D: added to the run's seed; 0 repeats its final evaluation)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long check: 200 FID images, 500 probe latents, 300 test images, 200 t-SNE points, "
                        "50 purity samples per component")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from service.config import ConfigError
    from service.feature_extractor import ExtractorUnavailable, file_sha256
    from service.image_eval import FID_SEED_OFFSET, classifier_for, evaluate_image_model, extractor_for
    from service.images import ImageSource, make_image_source

    ckpt = Path(args.checkpoint).resolve()
    try:
        state, cfg, model = load_checkpoint(ckpt, args.device)
    except CheckpointInputError as e:
        return _fail(str(e), 2)
    if args.run_id:  # fail before the long part, not after it
        try:
            from mlflow.tracking import MlflowClient

            from service.ray_train import default_tracking_uri

            MlflowClient(args.tracking_uri or default_tracking_uri()).get_run(args.run_id)
        except Exception as e:  # noqa: BLE001 - MlflowException for an unknown id, others for a bad URI
            return _fail(f"--run-id: {args.run_id!r} is not a run of {args.tracking_uri or 'the default store'} ({e})", 2)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731 - stdout holds only the JSON
    if not cfg.data.is_image:
        return _evaluate_points(args, ckpt, state, cfg, model, log)
    extractor = None
    if args.protocol != "cnn":  # Inception protocols need no data: fail fast when unavailable
        try:
            extractor = extractor_for(args.protocol, cfg, None, device=args.device, log=log)
        except ExtractorUnavailable as e:
            return _fail(str(e), 1)
    # explicit flags win over --smoke's sizes, which win over the defaults
    n_samples = args.n_samples or (200 if args.smoke else DEFAULT_SAMPLES[args.protocol])
    probe_train = args.probe_train or (500 if args.smoke else None)
    tsne_points = args.tsne_points or (200 if args.smoke else 2000)
    purity_samples = args.purity_samples if args.purity_samples is not None else (
        min(50, cfg.eval.purity_samples) if args.smoke else cfg.eval.purity_samples)
    try:  # the full training split: FID statistics and the extractor never depend on data.subset
        data_cfg = dataclasses.replace(cfg.data, subset=None)
        train, test = make_image_source(data_cfg, "train"), make_image_source(data_cfg, "test")
    except ConfigError as e:
        return _fail(str(e), 2)
    if args.smoke:
        test = ImageSource(test.name, test.images[:300], test.labels[:300])
    if extractor is None:  # cnn: the classifier of this dataset's train split (cached)
        try:
            extractor = extractor_for("cnn", cfg, train, device=args.device, cache_dir=args.cache_dir,
                                      train_images=args.extractor_train_images, log=log)
        except ValueError as e:  # unlabelled images
            return _fail(str(e), 2)
    classifier = None
    if model.prior.is_mixture and purity_samples > 0:  # the cnn protocol's file: a cache hit after the extractor
        classifier = classifier_for(cfg, train, device=args.device, cache_dir=args.cache_dir,
                                    train_images=args.extractor_train_images, log=log)
        if classifier is None:
            log("evaluate: mode purity skipped (the train labels hold one class)")
    out = Path(args.output_dir or ckpt.parent / f"eval-{args.protocol}").resolve()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed + FID_SEED_OFFSET + args.seed)
    extra: dict = {}
    metrics = evaluate_image_model(model, cfg, train, test, extractor=extractor, n_samples=n_samples, out_dir=out,
                                   generator=gen, probe_train=probe_train, tsne_points=tsne_points,
                                   classifier=classifier, purity_samples=purity_samples, extra=extra, log=log)
    info = {"protocol": args.protocol, "extractor": extractor.info, "n_samples": int(metrics["fid_samples"]),
            "probe_train": probe_train or len(train), "test_images": len(test), "seed": args.seed,
            "checkpoint": {"path": str(ckpt), "sha256": file_sha256(ckpt), "iteration": state["iteration"],
                           "preset": cfg.name}, "seconds": round(time.perf_counter() - t0, 1)}
    if "mode_purity" in extra:  # per component, in component order
        info["purity"] = {"samples_per_component": purity_samples, "classifier": classifier.info,
                          "per_component": extra["mode_purity"], "majority_class": extra["majority_mode"],
                          "class_shares": {"generated": extra.get("mode_shares"), "data": extra.get("data_shares")}}
    (out / "evaluation.json").write_text(json.dumps(info, indent=2) + "\n")
    if args.tracking_uri or args.run_id:
        run_id = _log_to_mlflow(args, cfg, out, metrics, int(state["iteration"]))
        log(f"evaluate: logged to MLflow run {run_id}")
    print(json.dumps(metrics, indent=2))
    log(f"evaluate: results in {out}")
    return 0


def _evaluate_points(args: argparse.Namespace, ckpt: Path, state: dict, cfg, model, log) -> int:
    """A 2D / tabular checkpoint: the evaluation ``jobs.train`` runs at its end (``service.evaluation.evaluate``,
    the same random streams, so today's code gives the same numbers for the metrics it had), with the metrics
    added since. The checkpoint is only read."""
    from service.config import ConfigError
    from service.data import make_source
    from service.evaluation import evaluate
    from service.feature_extractor import file_sha256

    try:
        source = make_source(cfg.data)
    except (ConfigError, OSError) as e:
        return _fail(f"data: {e}", 2)
    out = Path(args.output_dir or ckpt.parent / "eval").resolve()
    t0 = time.perf_counter()
    draws = dataclasses.replace(cfg, seed=cfg.seed + args.seed)  # --seed 0: the training run's own draws
    metrics, extra = evaluate(model, source, draws, device=args.device, plot_dir=out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    info = {"checkpoint": {"path": str(ckpt), "sha256": file_sha256(ckpt), "iteration": state["iteration"],
                           "preset": cfg.name}, "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1)}
    placed = {k: extra[k] for k in ("mode_shares", "data_shares", "mode_offsets", "mode_widths") if k in extra}
    if placed:  # data mode -> value (JSON keys are strings)
        info["modes"] = {name: {str(k): v for k, v in table.items()} for name, table in placed.items()}
    (out / "evaluation.json").write_text(json.dumps(info, indent=2) + "\n")
    if args.tracking_uri or args.run_id:
        run_id = _log_to_mlflow(args, cfg, out, metrics, int(state["iteration"]), "2d")
        log(f"evaluate: logged to MLflow run {run_id}")
    print(json.dumps(metrics, indent=2))
    log(f"evaluate: results in {out}")
    return 0


def _log_to_mlflow(args: argparse.Namespace, cfg, out: Path, metrics: dict[str, float], step: int,
                   kind: str | None = None) -> str:
    """Metrics as ``eval/<name>`` at the checkpoint's iteration; files under ``evaluation/``."""
    from service.ray_train import default_tracking_uri, start_mlflow_run
    from service.tracking import MlflowSink

    uri = args.tracking_uri or default_tracking_uri()
    run_id = args.run_id or start_mlflow_run(cfg, uri, f"evaluate-{cfg.name.replace('/', '-')}-{kind or args.protocol}-"
                                                      f"{time.strftime('%Y%m%d-%H%M%S')}")
    sink = MlflowSink(uri, run_id)
    sink.log_metrics(step, {f"eval/{k}": v for k, v in metrics.items()})
    for path in sorted(out.iterdir()):
        if path.is_file():
            sink.log_artifact(path, "evaluation")
    left = sink.flush(60.0)  # metrics queued through a tracking outage: retry before the process exits
    if left:
        print(f"warning: {left} metric values could not be sent to {uri} (run {run_id}); "
              f"{out}/metrics.json holds them", file=sys.stderr)
    return run_id


if __name__ == "__main__":
    raise SystemExit(main())
