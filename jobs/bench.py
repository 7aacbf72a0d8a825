"""Benchmark: iterations/s of the adversarial step (SPEC §2.2), and the mixture log-density kernel.

    python -m jobs.bench                         # SG and IP+LC (M=64, T=100), batch 512, 2 threads
    python -m jobs.bench --threads 1 --iterations 50 --configs sintro,mog-ip-lc

Run it alone: other processes on the same cores distort the figures (STACK.md, threads).
"""

from __future__ import annotations

import argparse
import time

import torch


def bench_step(preset: str, iterations: int, warmup: int) -> float:
    """Iterations/s of ``introspective_step`` on 8gaussians batches for a preset."""
    from service.data import make_source
    from service.model import build_model
    from service.presets import get_preset
    from service.step import introspective_step, make_optimizers

    cfg = get_preset(preset)
    model = build_model(cfg, (2,), prior_type="mog" if cfg.prior.kind == "mog" else None)
    if cfg.prior.use_soft_clip:
        model.prior.init_clip_bounds()
    opt, source = make_optimizers(model, cfg), make_source(cfg.data)
    gen, data_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    batches = [source.sample(cfg.data.batch_size, data_gen)[0] for _ in range(iterations + warmup)]
    for x in batches[:warmup]:
        introspective_step(model, opt, x, cfg, generator=gen)
    start = time.perf_counter()
    for x in batches[warmup:]:
        introspective_step(model, opt, x, cfg, generator=gen)
    return iterations / (time.perf_counter() - start)


def bench_kernel(n: int = 51_200, m: int = 64, d: int = 2, repeats: int = 10) -> tuple[float, float]:
    """Milliseconds for log p(z) + backward: fused kernel vs plain autograd."""
    from service.gaussian import mixture_component_log_prob, mixture_log_prob

    z = torch.randn(n, d, requires_grad=True)
    params = [torch.randn(m, d, requires_grad=True), torch.zeros(m, d, requires_grad=True),
              torch.full((m,), -float(torch.log(torch.tensor(float(m)))), requires_grad=True)]

    def fused():
        mixture_log_prob(z, *params)[0].sum().backward()

    def plain():
        torch.logsumexp(mixture_component_log_prob(z, *params), -1).sum().backward()

    out = []
    for fn in (fused, plain):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out.append((time.perf_counter() - start) / repeats * 1e3)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="sintro,mog-ip-lc", help="comma-separated 8gaussians configurations")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 512, 8gaussians")
    for name in args.configs.split(","):
        rate = bench_step(f"8gaussians/{name}", args.iterations, args.warmup)
        print(f"adversarial step  {name:<12} {rate:6.1f} it/s  ({1e3 / rate:6.1f} ms/it)")
    fused, plain = bench_kernel()
    print(f"mixture log p + backward, N=51,200 M=64 D=2: fused {fused:.1f} ms, plain autograd {plain:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
