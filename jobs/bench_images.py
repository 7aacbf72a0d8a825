"""Benchmark: training images/s per worker on (F)MNIST- and CIFAR-10-shaped data (SPEC §7), 1 and N workers.

    python -m jobs.bench_images                                   # fmnist + cifar10, 1 and 2 CPU workers
    python -m jobs.bench_images --datasets cifar10 --workers 1,2 --iterations 5
    python -m jobs.bench_images --device cuda --workers 1 --channels-last --amp-bf16 --compile
    python -m jobs.bench_images --device cuda --workers 1 --json runs/bench_images.json   # also machine-readable

Every worker is a process (gloo on CPU, NCCL on GPUs, one GPU each) with ``--threads`` torch
threads. It runs the training steps of ``service.step`` with the preset's official networks and
global batch (split over the workers: 128 for (F)MNIST, 32 for CIFAR-10) on random uint8 images
of the dataset's shape, with the gradient all-reduce of ``service/distributed.py`` and the
epoch-sharded batches of ``service/images.py``. The prior is the preset's converted MoG (clip
bounds set), so the adversarial step costs what it costs after the warm-up. After ``--warmup``
untimed steps it times ``--iterations`` warm-up (VAE) steps and ``--iterations`` adversarial
steps and prints images/s per worker (local batch x steps / seconds, slowest rank). ``--json PATH``
also writes the rows (rewritten after every row, so a run stopped part-way keeps what it measured).
Run it alone: other processes on the same cores distort the figures (STACK.md, threads).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from jobs.common import free_port

SHAPES = {"mnist": (1, 28, 28), "fmnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def _worker(rank: int, world: int, port: int, args: dict, out: str) -> None:
    import torch.distributed as dist

    from service.config import apply_overrides
    from service.distributed import allreduce_mean
    from service.images import ImageSource
    from service.model import build_model
    from service.networks import apply_speed_switches, use_sync_batchnorm
    from service.presets import get_preset
    from service.step import introspective_step, make_optimizers, vae_step

    torch.set_num_threads(args["threads"])
    cuda = args["device"] == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    try:
        cfg = apply_overrides(get_preset(f"{args['dataset']}/{args['config']}"), {
            "scaling.channels_last": args["channels_last"], "scaling.amp_bf16": args["amp_bf16"],
            "scaling.compile": args["compile"], "scaling.use_gpu": cuda, "scaling.workers": world,
            "network.sync_bn": args["sync_bn"], **({"data.batch_size": args["batch"]} if args["batch"] else {})})
        shape, batch = SHAPES[args["dataset"]], cfg.data.batch_size
        steps = 2 * (args["warmup"] + args["iterations"])
        g = torch.Generator().manual_seed(0)
        source = ImageSource("random", torch.randint(0, 256, (batch * steps, *shape), generator=g, dtype=torch.uint8),
                             torch.zeros(batch * steps, dtype=torch.long))
        model = build_model(cfg, shape, prior_type="mog" if cfg.prior.kind == "mog" else None).to(device)
        if cfg.prior.use_soft_clip:
            model.prior.init_clip_bounds()
        if cfg.network.sync_bn and world > 1:
            use_sync_batchnorm(model)
        apply_speed_switches(model.encoder, model.decoder, cfg.scaling)
        opt = make_optimizers(model, cfg)
        noise = torch.Generator(device=device).manual_seed(rank)
        sync = allreduce_mean if world > 1 else (lambda params: None)
        it = 0

        def run(step, n: int) -> float:
            nonlocal it
            if world > 1:
                dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(n):
                x = source.batch_at(it, batch, rank, world, device=device)[0]
                step(model, opt, x, cfg, generator=noise, iteration=it, grad_sync=sync)
                it += 1
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        result = {}
        for name, step in (("warm-up (VAE) step", vae_step), ("adversarial step", introspective_step)):
            run(step, args["warmup"])
            seconds = run(step, args["iterations"])
            result[name] = (batch // world) * args["iterations"] / seconds
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def bench(dataset: str, world: int, args: argparse.Namespace) -> dict[str, float]:
    """Images/s per worker of the slowest rank, per phase."""
    import torch.multiprocessing as mp

    opts = {k: getattr(args, k) for k in ("config", "threads", "device", "channels_last", "amp_bf16", "compile",
                                          "sync_bn", "warmup", "iterations", "batch")}
    opts["dataset"] = dataset
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(world, free_port(), opts, out), nprocs=world, join=True,
                           start_method="spawn")
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]
    return {phase: min(r[phase] for r in ranks) for phase in ranks[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="fmnist,cifar10", help="comma-separated: mnist, fmnist, cifar10")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--config", default="mog10-ip-lc", help="image preset configuration (sintro, mog10-ip-lc, ...)")
    p.add_argument("--iterations", type=int, default=10, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per phase")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--batch", type=int, help="global batch (default: the preset's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp-bf16", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (GPUs)")
    p.add_argument("--json", metavar="PATH", help="also write the settings and rows as JSON to PATH")
    args = p.parse_args(argv)
    switches = [s for s in ("channels_last", "amp_bf16", "compile", "sync_bn") if getattr(args, s)]
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": args.device,
              "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "config": args.config, "batch": args.batch, "switches": switches, "threads": args.threads,
              "iterations": args.iterations, "warmup": args.warmup, "rows": []}
    if args.json:
        _write_json(args.json, report)
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s)/worker, preset */{args.config}, "
          f"switches: {', '.join(switches) or 'none'}; {args.iterations} timed steps per phase")
    print(f"{'dataset':<8} {'workers':>7} {'batch/worker':>12} {'phase':<20} {'images/s/worker':>16} {'total':>8}")
    for dataset in args.datasets.split(","):
        from service.presets import get_preset

        batch = args.batch or get_preset(f"{dataset}/{args.config}").data.batch_size
        for world in (int(w) for w in args.workers.split(",")):
            for phase, rate in bench(dataset, world, args).items():
                print(f"{dataset:<8} {world:>7} {batch // world:>12} {phase:<20} {rate:>16.1f} {rate * world:>8.1f}",
                      flush=True)
                report["rows"].append({"dataset": dataset, "workers": world, "batch_per_worker": batch // world,
                                       "phase": phase, "images_per_s_per_worker": rate, "images_per_s": rate * world})
                if args.json:
                    _write_json(args.json, report)
    return 0


def _write_json(path: str, report: dict) -> None:
    """Atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
