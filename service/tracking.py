"""Metric sinks: the training loop calls ``sink.log_metrics(step, {...})`` and nothing else.

``MlflowSink`` imports mlflow lazily, so the core never depends on it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

# Every metric name the service logs (MLflow-valid: letters, digits, '_', '/', no '@').
METRIC_NAMES = (
    "train/loss_vae", "train/rec_real", "train/kl_real",
    "train/loss_encoder", "train/loss_decoder",
    "train/enc/rec_real", "train/enc/kl_real", "train/enc/rec_fake", "train/enc/kl_fake",
    "train/enc/rec_rec", "train/enc/kl_rec", "train/enc/exp_elbo_fake", "train/enc/exp_elbo_rec",
    "train/dec/rec_real", "train/dec/kl_rec", "train/dec/kl_fake", "train/dec/rec_rec_rec",
    "train/dec/rec_fake_rec", "train/dec/kl_prior", "train/lr", "train/iterations_per_s",
    "prior/entropy_norm", "prior/active_components",
    "eval/gnelbo_x1e7", "eval/hist_kl", "eval/hist_jsd", "eval/prior_entropy_norm",
    "eval/prior_active_components", "eval/decoder_sigma", "eval/hist_kl_calibrated", "eval/hist_jsd_calibrated",
    "eval/gnelbo_data_energy", "eval/gnelbo_grid_energy",
)
# The gnELBO and its two parts (the data's and the grid's mean energy): an evaluation with
# ``eval.intermediate_gnelbo = false`` leaves out all three.
GNELBO_METRICS = ("gnelbo_x1e7", "gnelbo_data_energy", "gnelbo_grid_energy")


class MetricSink(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


class NullSink:
    """For non-main ranks: drops everything."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass


class MemorySink(NullSink):
    """Keeps everything in lists (tests assert on it)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.artifacts: list[tuple[str, str | None]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def last(self, name: str) -> float | None:
        for _, m in reversed(self.metrics):
            if name in m:
                return m[name]
        return None


# --------------------------------------------------------------------------------------------
# Console: one progress display per run (the full metrics are MLflow's)
# --------------------------------------------------------------------------------------------

# What the console shows of a training step, with its short name.
HEADLINE = {"train/loss_vae": "loss_vae", "train/loss_encoder": "loss_enc", "train/loss_decoder": "loss_dec",
            "prior/entropy_norm": "entropy", "prior/active_components": "active"}
RATE = "train/iterations_per_s"


def _number(v: float) -> str:
    return f"{int(v):,}" if float(v).is_integer() and abs(v) < 1e7 else f"{v:.4g}"


def _duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressDisplay:
    """One progress display for a training run: phase (warm-up / adversarial), iteration of total,
    it/s, ETA and a few headline numbers; evaluations get a line of their own.

    On a terminal one status line is redrawn in place (carriage return, with a bar), and each phase
    leaves its last status as a line. Elsewhere (a log file, ``ray job submit``) it prints a line
    when a phase starts and then every ``total / lines`` iterations: about ``lines`` + 3 lines per
    run whatever its length. ``update`` takes what the loop logs (``train/*`` at ``log_every``, or
    ``eval/*``). The ETA is the remaining iterations at the current training rate; during the
    warm-up, which runs faster, only the warm-up's end is estimated.
    """

    def __init__(self, total: int, warmup: int, *, stream=None, tty: bool | None = None, lines: int = 20) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.total, self.warmup, self.every = total, warmup, max(1, total // max(1, lines))
        self._phase: str | None = None
        self._next, self._width, self._done = 0, 0, False

    def phase(self, step: int) -> str:
        """The phase of the iteration after which ``step`` iterations are done."""
        return "warm-up" if step <= self.warmup else "adversarial"

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if "ex_post/loglik" in metrics:  # service.ex_post, once, after the last iteration
            self.line(f"[ex-post] mixture refit by EM to {int(metrics.get('ex_post/points', 0)):,} encoded training "
                      f"points (t = {_number(metrics.get('ex_post/noise', float('nan')))}); mean log-likelihood "
                      f"{_number(metrics['ex_post/loglik'])}")
            return
        evals = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")}
        if evals:
            self.line(f"[eval] iteration {step:,}: " + "  ".join(f"{k} {_number(v)}" for k, v in evals.items()))
            return
        phase = self.phase(step)
        status = self._status(step, phase, metrics)
        if self.tty:
            if self._phase is not None and phase != self._phase and self._width:
                self.stream.write("\n")  # the finished phase keeps its last status
                self._width = 0
            self.stream.write("\r" + status.ljust(self._width))
            self.stream.flush()
            self._width = len(status)
        elif phase != self._phase or step >= self._next or step >= self.total:
            self.line(status)
            self._next = (step // self.every + 1) * self.every
        self._phase = phase
        if step >= self.total and not self._done:
            self._done = True
            self.close()  # on a terminal the last status stays
            self.line(f"[evaluating] {self.total:,} iterations done; final evaluation")

    def line(self, text: str) -> None:
        """A line of its own (on a terminal: above the status line, which is cleared)."""
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0

    def _status(self, step: int, phase: str, metrics: dict[str, float]) -> str:
        fraction = min(1.0, step / max(1, self.total))
        head = f"[{phase}] {step:,}/{self.total:,} {fraction:4.0%}"
        if self.tty:
            filled = int(round(20 * fraction))
            head = f"[{phase}] |{'#' * filled}{'.' * (20 - filled)}| {step:,}/{self.total:,} {fraction:4.0%}"
        parts = [head]
        rate = metrics.get(RATE)
        if rate:  # the warm-up is faster than the adversarial phase: it gives only its own end
            end, what = (self.warmup, "warm-up ends in") if phase == "warm-up" and self.warmup < self.total else (
                self.total, "ETA")
            parts += [f"{rate:.1f} it/s", f"{what} {_duration((end - step) / rate)}"]
        parts += [f"{short} {_number(metrics[k])}" for k, short in HEADLINE.items() if k in metrics]
        return "  ".join(parts)


class ConsoleSink(NullSink):
    """A ``MetricSink`` that shows a single-process run on a ``ProgressDisplay`` (a Ray Train run
    shows it on the driver instead: ``service.ray_progress``)."""

    def __init__(self, display: ProgressDisplay) -> None:
        self.display = display

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.display.update(step, metrics)


class FanoutSink(NullSink):
    """Forwards every call to several sinks."""

    def __init__(self, *sinks: MetricSink) -> None:
        self.sinks = sinks

    def log_params(self, params: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log_params(params)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for s in self.sinks:
            s.log_metrics(step, metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        for s in self.sinks:
            s.log_artifact(path, artifact_path)


@contextlib.contextmanager
def env_defaults(defaults: dict[str, str]) -> Iterator[None]:
    """Environment variables set for the block where the user has not set them; removed after it."""
    added = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _fail_fast_requests(timeout_s: int) -> contextlib.AbstractContextManager[None]:
    """MLflow's HTTP client retries a refused request for about 4 minutes by default (7 retries,
    backoff 2): the sink retries on its own schedule instead, so each attempt fails in at most
    ``timeout_s``. Variables the user has set are kept."""
    return env_defaults({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)})


class MlflowSink(NullSink):
    """Logs to an active MLflow run (``run_id``) through the client API; mlflow imported lazily.

    Metric logging survives tracking outages: values are queued, sent in order, and a failed send
    keeps them queued and is retried at most every ``retry_every_s`` seconds (training goes on;
    one warning when the outage starts, one when it ends). At most ``max_buffer`` values are kept
    (the oldest are dropped, counted in ``dropped``). ``flush(wait_s)`` retries for up to
    ``wait_s`` seconds and returns what is still queued (``pending()``).
    """

    def __init__(self, tracking_uri: str, run_id: str, *, retry_every_s: float = 5.0, request_timeout_s: int = 10,
                 max_buffer: int = 1_000_000, stream=None) -> None:
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.retry_every_s, self.request_timeout_s, self.max_buffer = retry_every_s, request_timeout_s, max_buffer
        self.stream = stream or sys.stderr
        self.dropped = 0
        self._queue: collections.deque = collections.deque()
        self._down_since: float | None = None
        self._next_try = 0.0

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # the time of the measurement, not of a late send
        self._queue.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self._queue) > self.max_buffer:
            n = len(self._queue) - self.max_buffer
            for _ in range(n):
                self._queue.popleft()
            self.dropped += n
        if time.monotonic() >= self._next_try:
            self._send()

    def pending(self) -> list[tuple[str, float, int, int]]:
        """Queued values as ``(key, value, timestamp_ms, step)``."""
        return [(m.key, m.value, m.timestamp, m.step) for m in self._queue]

    def flush(self, wait_s: float = 0.0) -> int:
        """Send what is queued, retrying for up to ``wait_s`` seconds; returns the number still queued."""
        deadline = time.monotonic() + wait_s
        while self._queue and not self._send():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(self.retry_every_s, left))
        return len(self._queue)

    def _send(self) -> bool:
        try:
            with _fail_fast_requests(self.request_timeout_s):
                while self._queue:
                    batch = [self._queue[i] for i in range(min(500, len(self._queue)))]
                    self.client.log_batch(self.run_id, metrics=batch)
                    for _ in batch:
                        self._queue.popleft()
        except Exception as e:  # noqa: BLE001 - any tracking failure: keep the values, keep training
            self._next_try = time.monotonic() + self.retry_every_s
            if self._down_since is None:
                self._down_since = time.monotonic()
                print(f"warning: MLflow logging failed ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); "
                      f"training continues, {len(self._queue)} metric values queued, retrying every "
                      f"{self.retry_every_s:g} s", file=self.stream, flush=True)
            return False
        if self._down_since is not None:
            print(f"warning: MLflow reachable again after {time.monotonic() - self._down_since:.0f} s; queued metric "
                  f"values logged{f' ({self.dropped} oldest dropped)' if self.dropped else ''}",
                  file=self.stream, flush=True)
            self._down_since = None
        return True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
