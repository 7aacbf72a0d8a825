"""Benchmark: the adversarial step (SPEC §2.2) of SG against IP + LC, and the mixture log-density kernel.

    python -m jobs.bench                         # SG and IP+LC (M=64, T=100), batch 512, 2 threads
    python -m jobs.bench --threads 1 --iterations 50 --configs sintro,mog-ip-lc
    python -m jobs.bench --configs sintro,mog-ip-lc,mog-ip-lc:samples   # also the step before the MC form
    python -m jobs.bench --precision             # the mixture kernel against float64, broad to sharp priors

The configurations run in alternating rounds inside one process and each figure is the median of
its rounds, so a machine that speeds up or slows down during the run moves every configuration
alike and the ratio stays meaningful. Beside the step times it prints what bounds them: the
step's matrix-product rate against this machine's (a plain GEMM of the networks' shapes), and
the mixture kernel's rate in components x points per second, with the memory bandwidth of a
large copy for scale. Run it alone: other processes on the same cores distort the figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


class Stepper:
    """A model, its optimisers and a fixed stream of 8gaussians batches for one preset, on one device
    (``batch``: the preset's batch size unless given). ``jobs.gpu_steps`` times it on a GPU."""

    def __init__(self, preset: str, seed: int = 0, batch: int | None = None, device: str | torch.device = "cpu"):
        # "8gaussians/mog-ip-lc:samples": the same step with the Monte-Carlo KL's samples formed in PyTorch
        # and passed to the kernel row by row (the path before the kernel's Monte-Carlo form)
        preset, _, variant = preset.partition(":")
        if variant not in ("", "samples"):
            raise ValueError(f"unknown step variant {variant!r} of {preset!r}: allowed '' or 'samples'")
        self.mc_form = variant != "samples"
        from service.config import apply_overrides
        from service.data import make_source
        from service.model import build_model
        from service.presets import get_preset
        from service.step import make_optimizers

        self.cfg = get_preset(preset)
        if batch is not None:
            self.cfg = apply_overrides(self.cfg, {"data.batch_size": batch})
        self.model = build_model(self.cfg, (2,), prior_type="mog" if self.cfg.prior.kind == "mog" else None)
        if self.cfg.prior.use_soft_clip:  # the adversarial phase: bounds frozen at the end of the warm-up
            self.model.prior.init_clip_bounds()
        self.device = torch.device(device)
        self.model.to(self.device)
        self.opt = make_optimizers(self.model, self.cfg)  # after .to(): Adam states follow the parameters
        source, data_gen = make_source(self.cfg.data), torch.Generator().manual_seed(seed + 1)
        self.batches = [source.sample(self.cfg.data.batch_size, data_gen)[0].to(self.device) for _ in range(8)]
        self.gen = torch.Generator(device=self.device).manual_seed(seed)  # noise drawn where the model is
        self.i = 0

    def step(self) -> None:
        import service.gaussian as gaussian
        from service.step import introspective_step

        gaussian.MC_FORM = self.mc_form
        try:
            introspective_step(self.model, self.opt, self.batches[self.i % len(self.batches)], self.cfg,
                               generator=self.gen)
        finally:
            gaussian.MC_FORM = True
        self.i += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self, iterations: int) -> float:
        self._sync()
        start = time.perf_counter()
        for _ in range(iterations):
            self.step()
        self._sync()
        return (time.perf_counter() - start) / iterations

    def matmul_flops(self) -> float:
        """Floating-point operations of the matrix products in one step (forward and backward)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.step()
        return float(counter.get_total_flops())


def bench_steps(presets: list[str], iterations: int, rounds: int, warmup: int = 5,
                **stepper: object) -> dict[str, list[float]]:
    """Seconds per step of each preset, ``rounds`` alternating rounds of ``iterations`` steps each
    (``stepper``: ``batch`` / ``device`` for every ``Stepper``)."""
    steppers = {p: Stepper(p, **stepper) for p in presets}  # type: ignore[arg-type]
    for s in steppers.values():
        s.seconds(warmup)
    times: dict[str, list[float]] = {p: [] for p in presets}
    for _ in range(rounds):
        for p, s in steppers.items():
            times[p].append(s.seconds(iterations))
    return times


def _best_ms(fn, repeats: int = 5, rounds: int = 5) -> float:
    """The fastest of ``rounds`` averages of ``repeats`` calls, in ms (noise only ever adds time)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def gemm_gflops(rows: int = 512, width: int = 256, repeats: int = 200) -> float:
    """GFLOP/s of a plain (rows x width) @ (width x width) product: the networks' hidden layers."""
    a, b = torch.randn(rows, width), torch.randn(width, width)
    return 2.0 * rows * width * width / (_best_ms(lambda: torch.mm(a, b), repeats) * 1e-3) / 1e9


def copy_gbytes_per_s(mib: int = 256) -> float:
    """GB/s of a large tensor copy (read + write counted): the memory bandwidth these cores reach."""
    src = torch.empty(mib * 2**18)  # float32
    dst = torch.empty_like(src)
    src.fill_(1.0)
    dst.fill_(0.0)
    return 2.0 * src.numel() * 4 / (_best_ms(lambda: dst.copy_(src), 3, 3) * 1e-3) / 1e9


KERNEL_CALLS = (  # the mixture evaluations of one IP + LC step at batch 512, T = 100 (SPEC §2.2)
    ("encoder, real (dz)", 51_200, True, False),
    ("encoder, negatives (dz)", 102_400, True, False),
    ("decoder, negatives (dz)", 102_400, True, False),
    ("decoder, prior KL (parameters)", 51_200, False, True),
)


def bench_kernel(logvar: float = 0.0, m: int = 64, d: int = 2) -> dict[str, list[float]]:
    """ms of log p + backward per call of one step, for each implementation: the C kernel
    (``native``), the PyTorch kernel (``pytorch``) and plain autograd (``autograd``)."""
    from service.gaussian import _MixtureLogProb, mixture_component_log_prob, mixture_log_prob_and_usage

    def make(n, need_z, need_params):
        g = torch.Generator().manual_seed(0)
        z = (1.5 * torch.randn(n, d, generator=g)).requires_grad_(need_z)
        params = [torch.randn(m, d, generator=g), logvar + 0.3 * torch.randn(m, d, generator=g),
                  torch.log_softmax(torch.randn(m, generator=g), 0)]
        return z, [p.requires_grad_(need_params) for p in params]

    paths = {
        "native": lambda z, p: mixture_log_prob_and_usage(z, *p, usage=False)[0],
        "pytorch": lambda z, p: _MixtureLogProb.apply(z, *p, "none")[0],
        "autograd": lambda z, p: torch.logsumexp(mixture_component_log_prob(z, *p), -1),
    }
    out: dict[str, list[float]] = {name: [] for name in paths}
    for _, n, need_z, need_params in KERNEL_CALLS:
        z, params = make(n, need_z, need_params)
        for name, fn in paths.items():
            out[name].append(_best_ms(lambda: fn(z, params).sum().backward(), repeats=3, rounds=4))
    return out


def precision_table(n: int = 20_000, m: int = 64, d: int = 2) -> list[str]:
    """Relative error of the float32 mixture log-density and its gradients against float64, from
    broad to sharp components: the C kernel (centred form), and the PyTorch kernel with its
    precision guard (as trained) and with the guard switched off."""
    import service.gaussian as gaussian

    def run(fn, inputs, weight, wide_tolerance=gaussian.WIDE_TOLERANCE):
        gaussian.WIDE_TOLERANCE, saved = wide_tolerance, gaussian.WIDE_TOLERANCE
        try:
            xs = [t.detach().clone().requires_grad_() for t in inputs]
            out = fn(*xs)
            (out * weight.to(out.dtype)).sum().backward()
            return [out.detach().double()] + [x.grad.double() for x in xs]
        finally:
            gaussian.WIDE_TOLERANCE = saved

    def native(*a):
        assert gaussian.native_applies(*a)
        return gaussian.mixture_log_prob_and_usage(*a, usage=False)[0]

    def pytorch(*a):
        return gaussian._MixtureLogProb.apply(*a, "none")[0]

    has_native = gaussian.mixture_native.library() is not None
    rows = []
    for logvar, scale in ((0.0, 1.0), (-2.5, 2.0), (-4.0, 3.0), (-7.0, 5.0), (-9.0, 5.0)):
        g = torch.Generator().manual_seed(0)
        means = (scale * torch.randn(m, d, generator=g, dtype=torch.float64)).float()
        logvars = (logvar + 0.3 * torch.randn(m, d, generator=g, dtype=torch.float64)).float()
        log_w = torch.log_softmax(torch.randn(m, generator=g, dtype=torch.float64), 0).float()
        idx = torch.randint(0, m, (n,), generator=g)
        z = (means[idx] + torch.exp(0.5 * logvars[idx]) * torch.randn(n, d, generator=g)).float()
        weight = torch.randn(n, generator=g, dtype=torch.float64)
        ref = run(pytorch, [t.double() for t in (z, means, logvars, log_w)], weight)

        def err(got):
            return max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref))

        inputs = [z, means, logvars, log_w]
        cells = [f"C kernel {err(run(native, inputs, weight)):.1e}" if has_native else "C kernel unavailable"]
        path = gaussian.accumulation_dtype(z, means, logvars)
        cells.append(f"PyTorch kernel, guard ({str(path).split('.')[-1]}) {err(run(pytorch, inputs, weight)):.1e}")
        cells.append(f"float32 only {err(run(pytorch, inputs, weight, float('inf'))):.1e}")
        rows.append(f"log-variance {logvar:5.1f}, |mu| ~{scale}: " + ", ".join(cells))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="sintro,mog-ip-lc", help="comma-separated 8gaussians configurations")
    p.add_argument("--iterations", type=int, default=20, help="steps per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", action="store_true",
                   help="print the mixture kernels' largest relative error against float64 per regime, and exit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.precision:
        print("mixture log p and gradients, float32 vs float64 (largest relative error over value and 4 gradients):")
        print("\n".join(precision_table()))
        return 0
    from service.gaussian import mixture_native

    native = mixture_native.library() is not None
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 512, 8gaussians; "
          f"mixture kernel: {'C (native)' if native else 'PyTorch (the C kernel is unavailable)'}")
    presets = [f"8gaussians/{c}" for c in args.configs.split(",")]
    times = bench_steps(presets, args.iterations, args.rounds)
    gemm = gemm_gflops()
    base = statistics.median(times[presets[0]])
    for preset in presets:
        med = statistics.median(times[preset])
        flops = Stepper(preset).matmul_flops()
        spread = f"{1e3 * min(times[preset]):.1f} - {1e3 * max(times[preset]):.1f}"
        print(f"adversarial step  {preset.split('/')[1]:<18} {1 / med:6.1f} it/s  ({1e3 * med:6.1f} ms/it, rounds "
              f"{spread}; {med / base:4.2f}x {presets[0].split('/')[1]}); matrix products "
              f"{flops / med / 1e9:5.1f} GFLOP/s of {gemm:5.1f} for a plain 512x256x256 GEMM")
    bandwidth = copy_gbytes_per_s()
    for logvar in (0.0, -3.5):
        ms = bench_kernel(logvar)
        elements = sum(n for _, n, _, _ in KERNEL_CALLS) * 64
        total = {k: sum(v) for k, v in ms.items()}
        print(f"mixture log p + backward, the 4 calls of one step (307,200 points x 64 components), "
              f"log-variance ~{logvar}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in total.items()))
        for i, (what, n, _, _) in enumerate(KERNEL_CALLS):
            print(f"    {what:<32} N={n:>7,}: " + ", ".join(f"{k} {v[i]:5.1f} ms" for k, v in ms.items()))
        rate = elements / (total["native"] * 1e-3) / 1e9
        print(f"    C kernel: {rate:.2f} G point-components/s; at the 4 bytes per element a stored (N, M) matrix "
              f"would cost in each direction, that is {rate * 8:.1f} GB/s of the {bandwidth:.1f} GB/s a large copy "
              f"reaches here: the kernel is bound by its arithmetic (the exp), not by memory")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
