"""Benchmark: iterations/s of the adversarial step (SPEC §2.2), and the mixture log-density kernel.

    python -m jobs.bench                         # SG and IP+LC (M=64, T=100), batch 512, 2 threads
    python -m jobs.bench --threads 1 --iterations 50 --configs sintro,mog-ip-lc
    python -m jobs.bench --precision             # the mixture kernel against float64, broad to sharp priors

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


def precision_table(n: int = 20_000, m: int = 64, d: int = 2) -> list[str]:
    """Relative error of the float32 mixture log-density and its gradients against float64, with the
    precision guard (as trained) and with it switched off, from broad to sharp components."""
    import service.gaussian as gaussian

    def run(inputs, weight, wide_tolerance):
        gaussian.WIDE_TOLERANCE, saved = wide_tolerance, gaussian.WIDE_TOLERANCE
        try:
            xs = [t.detach().clone().requires_grad_() for t in inputs]
            out = gaussian.mixture_log_prob(*xs)[0]
            (out * weight.to(out.dtype)).sum().backward()
            return [out.detach().double()] + [x.grad.double() for x in xs]
        finally:
            gaussian.WIDE_TOLERANCE = saved

    rows = []
    for logvar, scale in ((0.0, 1.0), (-2.5, 2.0), (-4.0, 3.0), (-7.0, 5.0), (-9.0, 5.0)):
        g = torch.Generator().manual_seed(0)
        means = (scale * torch.randn(m, d, generator=g, dtype=torch.float64)).float()
        logvars = (logvar + 0.3 * torch.randn(m, d, generator=g, dtype=torch.float64)).float()
        log_w = torch.log_softmax(torch.randn(m, generator=g, dtype=torch.float64), 0).float()
        idx = torch.randint(0, m, (n,), generator=g)
        z = (means[idx] + torch.exp(0.5 * logvars[idx]) * torch.randn(n, d, generator=g)).float()
        weight = torch.randn(n, generator=g, dtype=torch.float64)
        ref = run([t.double() for t in (z, means, logvars, log_w)], weight, gaussian.WIDE_TOLERANCE)
        cells = []
        for tol in (gaussian.WIDE_TOLERANCE, float("inf")):
            got = run([z, means, logvars, log_w], weight, tol)
            cells.append(max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref)))
        path = gaussian.accumulation_dtype(z, means, logvars)
        rows.append(f"log-variance {logvar:5.1f}, |mu| ~{scale}: guard ({str(path).split('.')[-1]}) {cells[0]:.1e}, "
                    f"float32 only {cells[1]:.1e}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="sintro,mog-ip-lc", help="comma-separated 8gaussians configurations")
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", action="store_true",
                   help="print the mixture kernel's largest relative error against float64 per regime, and exit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.precision:
        print("mixture log p and gradients, float32 vs float64 (largest relative error over value and 4 gradients):")
        print("\n".join(precision_table()))
        return 0
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 512, 8gaussians")
    for name in args.configs.split(","):
        rate = bench_step(f"8gaussians/{name}", args.iterations, args.warmup)
        print(f"adversarial step  {name:<12} {rate:6.1f} it/s  ({1e3 / rate:6.1f} ms/it)")
    fused, plain = bench_kernel()
    print(f"mixture log p + backward, N=51,200 M=64 D=2: fused {fused:.1f} ms, plain autograd {plain:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
