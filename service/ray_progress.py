"""The console of a Ray Train run: rank 0 sends its headline numbers to the driver, which shows one
``tracking.ProgressDisplay`` (a progress bar on a terminal, concise lines in logs and under
``ray job submit``).

Why on the driver: a worker's output reaches the console only through Ray's log forwarding,
prefixed, line by line and never on a terminal, so a worker cannot draw a progress bar. Rank 0
sends small events with fire-and-forget calls to a zero-CPU actor (calls from one caller run in
order); a driver thread drains it about once a second. Sweeps do not use it: Tune's status table
is their console.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from .tracking import HEADLINE, RATE, NullSink, ProgressDisplay

POLL_S = 1.0


class _Board:
    """Events from rank 0, kept until the driver takes them."""

    def __init__(self) -> None:
        self._events: list[tuple] = []

    def put(self, event: tuple) -> None:
        self._events.append(event)

    def take(self) -> list[tuple]:
        events, self._events = self._events, []
        return events


def create_board():
    """The actor the workers send to (no CPU reserved: it only stores a few events)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(_Board).remote()


class ProgressSink(NullSink):
    """Rank 0's sink: sends ``(total, warmup)`` once, then each logged step's headline numbers and
    every ``eval/*`` and ``ex_post/*`` metric (the rest goes to MLflow only)."""

    def __init__(self, board, total: int, warmup: int) -> None:
        self.board = board
        board.put.remote(("begin", total, warmup))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        shown = {k: float(v) for k, v in metrics.items()
                 if k in HEADLINE or k == RATE or k.startswith(("eval/", "ex_post/"))}
        self.board.put.remote(("metrics", step, shown))


class Watcher:
    """Driver side: a thread that drains the board into a ``ProgressDisplay``; a context manager."""

    def __init__(self, board, stream=None, tty: bool | None = None) -> None:
        self.board, self.stream, self.tty = board, stream or sys.stdout, tty
        self.display: ProgressDisplay | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="introprior-progress", daemon=True)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        if self.display is not None:
            self.display.close()

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(POLL_S)
            self._drain()
            if stopping:
                return

    def _drain(self) -> None:
        import ray

        try:
            events = ray.get(self.board.take.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the display must never stop a run
            return
        for event in events:
            if event[0] == "begin":  # also after a restart from a checkpoint
                if self.display is None or (self.display.total, self.display.warmup) != event[1:]:
                    self.display = ProgressDisplay(event[1], event[2], stream=self.stream, tty=self.tty)
            elif self.display is not None:
                self.display.update(event[1], event[2])
