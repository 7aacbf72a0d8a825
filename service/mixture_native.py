"""The fused C kernel of the mixture log-density (``mixture_kernel.c``): built on first use, cached.

The Monte-Carlo KL of a mixture prior evaluates T * B points against M components six times per
adversarial step. In PyTorch every elementwise step is a pass over the (T * B, M) matrix through
memory; the C kernel makes one pass per row with the row in L1, never stores the matrix (the
backward recomputes it) and uses an exp that is exact to float32 for arguments <= 0 without
Sleef's general-purpose cost. Its Monte-Carlo form (``mc_forward``) takes the posteriors and the
noise instead of the points and forms each sample z = mu + sigma eps where it evaluates it.
``service.gaussian`` uses it for float32 CPU tensors and keeps its PyTorch path for everything else.

Build: ``cc -O3 -march=native -shared`` (no -ffast-math: the kernel relies on IEEE rounding) into
``$INTROPRIOR_KERNEL_CACHE`` (default ``~/.cache/introprior/kernels``; the system temp directory when that is not writable), one file
per source, flags and CPU (a cache shared between different machines never loads code built
for another CPU). ``INTROPRIOR_NATIVE=0`` turns it off; without a C compiler, or if the build
fails, a warning is logged once and the PyTorch path is used. Compiling takes about a second.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mixture_kernel.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast", "-fPIC", "-shared", "-fopenmp")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    """``INTROPRIOR_NATIVE`` is not set to 0/false/no/off."""
    return os.environ.get("INTROPRIOR_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("INTROPRIOR_KERNEL_CACHE")
    candidates = [Path(root)] if root else [Path.home() / ".cache" / "introprior" / "kernels"]
    candidates.append(Path(tempfile.gettempdir()) / "introprior-kernels")
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    raise OSError("no writable directory for the compiled mixture kernel")


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + compiler.encode() + _cpu_signature().encode())
    target = _cache_dir() / f"mixture_kernel-{key.hexdigest()[:16]}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build beside it, then an atomic rename
            built = Path(tmp) / target.name
            proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise OSError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    i64, f32p, f64p = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p
    lib.mixture_forward.argtypes = [i64, i64, i64, f32p, f32p, f32p, f32p, f32p, f64p, ctypes.c_int, f32p,
                                    ctypes.c_int]
    lib.mixture_forward.restype = None
    lib.mixture_backward.argtypes = [i64, i64, i64, f32p, f32p, f32p, f32p, f32p, f32p, f32p, f64p, ctypes.c_int]
    lib.mixture_backward.restype = None
    lib.mixture_mc_forward.argtypes = [i64, i64, i64, i64, f32p, f32p, f32p, f32p, f32p, f32p, f32p, f64p, ctypes.c_int,
                                       f32p, f32p, ctypes.c_int]
    lib.mixture_mc_forward.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first use; None when off or unavailable (warned once)."""
    global _lib, _tried
    if not enabled():
        return None
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except Exception as exc:  # any failure: the PyTorch path is always there
                log.warning("mixture kernel: using the PyTorch path (the C kernel is unavailable: %s)", exc)
                _lib = None
            _tried = True
    return _lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def forward(z: torch.Tensor, mu_t: torch.Tensor, iv_t: torch.Tensor, bias: torch.Tensor,
            sums: torch.Tensor | None, dlogp_dz: torch.Tensor | None = None) -> torch.Tensor:
    """log p (N,) of float32 contiguous ``z`` (N, D). ``sums`` (float64) receives sum_n r_nm when it
    has M entries, or S0 | S1 | S2 with g = 1 when it has (1 + 2D) * M; ``dlogp_dz`` (N, D), when
    given, the gradient of each row's log p with respect to its z."""
    lib = library()
    assert lib is not None
    n, d = z.shape
    m = mu_t.shape[1]
    moments = sums is not None and sums.numel() == (1 + 2 * d) * m
    log_p = torch.empty(n, dtype=torch.float32)
    lib.mixture_forward(n, m, d, _ptr(z), _ptr(mu_t), _ptr(iv_t), _ptr(bias), _ptr(log_p),
                        _ptr(sums), int(moments), _ptr(dlogp_dz), torch.get_num_threads())
    return log_p


def backward(z: torch.Tensor, mu_t: torch.Tensor, iv_t: torch.Tensor, bias: torch.Tensor, log_p: torch.Tensor,
             grad: torch.Tensor, dz: torch.Tensor | None, stats: torch.Tensor | None) -> None:
    """Fills ``dz`` (N, D) and/or ``stats`` ((1 + 2D) * M float64: S0 | S1 | S2, see the C source)."""
    lib = library()
    assert lib is not None
    n, d = z.shape
    lib.mixture_backward(n, mu_t.shape[1], d, _ptr(z), _ptr(mu_t), _ptr(iv_t), _ptr(bias), _ptr(log_p),
                         _ptr(grad), _ptr(dz), _ptr(stats), torch.get_num_threads())


def mc_forward(mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, mu_t: torch.Tensor, iv_t: torch.Tensor,
               bias: torch.Tensor, sums: torch.Tensor | None, grads: bool) -> tuple[torch.Tensor, ...]:
    """The Monte-Carlo form: ``mean_t log p(mu + sigma * eps_t)`` (B,) for float32 contiguous ``mu``,
    ``sigma`` (B, D) and ``eps`` (T, B, D); the samples are formed in the kernel and never stored.
    With ``grads`` also ``mean_t dlogp/dz`` and ``mean_t eps_t * dlogp/dz`` (B, D) each; ``sums`` as in
    ``forward`` over all T * B samples."""
    lib = library()
    assert lib is not None
    t, b, d = eps.shape
    m = mu_t.shape[1]
    moments = sums is not None and sums.numel() == (1 + 2 * d) * m
    mean_log_p = torch.empty(b, dtype=torch.float32)
    dmu = torch.empty(b, d, dtype=torch.float32) if grads else None
    deps = torch.empty(b, d, dtype=torch.float32) if grads else None
    lib.mixture_mc_forward(b, t, m, d, _ptr(mu), _ptr(sigma), _ptr(eps), _ptr(mu_t), _ptr(iv_t), _ptr(bias),
                           _ptr(mean_log_p), _ptr(sums), int(moments), _ptr(dmu), _ptr(deps), torch.get_num_threads())
    return (mean_log_p, dmu, deps) if grads else (mean_log_p,)
