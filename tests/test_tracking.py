"""MlflowSink through tracking outages (a fake client; the real server is in test_e2e_faults.py), and
the console's progress display on a real (smoke) training run, in a log and on a terminal."""

import io
import os
import re

from service.tracking import ConsoleSink, FanoutSink, MlflowSink, ProgressDisplay
from service.config import apply_overrides


class _FlakyClient:
    """``log_batch`` fails while ``down``; records what got through."""

    def __init__(self) -> None:
        self.down, self.calls, self.logged, self.env = False, 0, [], []

    def log_batch(self, run_id, metrics=(), params=()):
        self.calls += 1
        self.env.append((os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"), os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")))
        if self.down:
            raise ConnectionError("Connection refused")
        self.logged.extend((m.key, m.value, m.timestamp, m.step) for m in metrics)


def _sink(monkeypatch, **kw):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    import mlflow.tracking

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", lambda uri: _FlakyClient())  # no store is opened
    return MlflowSink("http://127.0.0.1:1", "run", stream=io.StringIO(), **kw)


def test_an_outage_queues_values_warns_once_and_sends_them_in_order_when_back(monkeypatch):
    sink = _sink(monkeypatch, retry_every_s=0.0)
    sink.log_metrics(1, {"a": 1.0})
    sink.client.down = True
    for step in range(2, 6):
        sink.log_metrics(step, {"a": float(step), "b": -1.0})  # no exception: training goes on
    assert len(sink.pending()) == 8 and [k[1] for k in sink.client.logged] == [1.0]
    sink.client.down = False
    sink.log_metrics(6, {"a": 6.0})
    assert sink.pending() == []
    assert [(k, v, s) for k, v, _, s in sink.client.logged] == [
        ("a", 1.0, 1), *[(k, v, s) for s in range(2, 6) for k, v in (("a", float(s)), ("b", -1.0))], ("a", 6.0, 6)]
    warnings = sink.stream.getvalue().splitlines()
    assert len(warnings) == 2 and "MLflow logging failed (ConnectionError: Connection refused)" in warnings[0]
    assert "training continues" in warnings[0] and "reachable again" in warnings[1]


def test_retries_are_spaced_and_each_request_fails_fast(monkeypatch):
    sink = _sink(monkeypatch, retry_every_s=3600.0, request_timeout_s=7)
    sink.client.down = True
    for step in range(10):
        sink.log_metrics(step, {"a": 1.0})
    assert sink.client.calls == 1  # one failed attempt, then none until retry_every_s has passed
    assert sink.client.env == [("0", "7")]  # MLflow's own 4-minute retry loop is off during the call
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # and restored afterwards


def test_flush_waits_up_to_its_deadline_then_reports_what_is_left(monkeypatch):
    sink = _sink(monkeypatch, retry_every_s=0.01)
    sink.client.down = True
    sink.log_metrics(1, {"a": 1.0, "b": 2.0})
    assert sink.flush(0.05) == 2 and sink.client.calls >= 2
    sink.client.down = False
    assert sink.flush(0.05) == 0 and len(sink.client.logged) == 2


def test_the_buffer_is_bounded_and_drops_the_oldest(monkeypatch):
    sink = _sink(monkeypatch, retry_every_s=3600.0, max_buffer=5)
    sink.client.down = True
    for step in range(4):
        sink.log_metrics(step, {"a": float(step), "b": float(step)})
    assert sink.dropped == 3 and [(k, s) for k, _, _, s in sink.pending()] == [
        ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]


def test_user_set_request_variables_are_kept(monkeypatch):
    sink = _sink(monkeypatch)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    sink.log_metrics(1, {"a": 1.0})
    assert sink.client.env[0][0] == "3" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"


def test_progress_display_of_a_training_run_in_a_log_and_on_a_terminal(one_thread):
    """One smoke run of ``loop.train`` (12 iterations, warm-up 6, logged every iteration) shown twice."""
    from service.data import make_source
    from service.loop import train
    from service.presets import get_preset, smoke

    cfg = smoke(get_preset("8gaussians/mog-ip-lc"))
    log, term = io.StringIO(), io.StringIO()
    displays = [ProgressDisplay(12, 6, stream=log, tty=False), ProgressDisplay(12, 6, stream=term, tty=True)]
    train(cfg, make_source(cfg.data), sink=FanoutSink(*(ConsoleSink(d) for d in displays)))
    for d in displays:
        d.close()
    lines = log.getvalue().splitlines()
    assert [ln.split()[0:2] for ln in lines[:12]] == [["[warm-up]", f"{i}/12"] for i in range(1, 7)] + [
        ["[adversarial]", f"{i}/12"] for i in range(7, 13)]
    assert re.search(r" it/s  warm-up ends in \d+s  loss_vae [-\d.]+", lines[0])
    assert re.search(r" it/s  ETA \d+s  loss_enc [-\d.]+  loss_dec [-\d.]+  entropy [\d.]+  active \d+$", lines[6])
    assert lines[12] == "[evaluating] 12 iterations done; final evaluation"
    assert lines[13].startswith("[eval] iteration 12: gnelbo_x1e7 ") and " hist_kl " in lines[13] and len(lines) == 14
    # a terminal: one status line per phase, redrawn in place ("\r"), with a bar; each phase keeps its last
    text = term.getvalue()
    assert text.count("\r[warm-up] |") == 6 and text.count("\r[adversarial] |") == 6
    final = [ln.rsplit("\r", 1)[-1].rstrip() for ln in text.split("\n") if ln.strip()]
    assert final[0].startswith("[warm-up] |##########..........| 6/12  50%")
    assert final[1].startswith("[adversarial] |####################| 12/12 100%")
    assert final[2:] == lines[12:]


def test_progress_display_prints_about_twenty_lines_however_long_the_run():
    out = io.StringIO()
    display = ProgressDisplay(30_000, 1_000, stream=out, tty=False)
    for step in range(100, 30_001, 100):
        display.update(step, {"train/iterations_per_s": 10.0, "train/loss_encoder": 1.0})
    assert len(out.getvalue().splitlines()) == 2 + 20 + 1  # 2 phase starts, 20 steps of 1,500, final evaluation


def test_the_ex_post_refit_gets_a_line_of_its_own_between_training_and_the_evaluation():
    from service.data import make_source
    from service.loop import train
    from service.presets import get_preset, smoke

    cfg = apply_overrides(smoke(get_preset("8gaussians/mog-ip-lc")), ["prior.ex_post=em", "prior.ex_post_points=500"])
    log = io.StringIO()
    train(cfg, make_source(cfg.data), sink=ConsoleSink(ProgressDisplay(12, 6, stream=log, tty=False)))
    lines = log.getvalue().splitlines()
    assert lines[12] == "[evaluating] 12 iterations done; final evaluation"
    assert re.fullmatch(r"\[ex-post\] mixture refit by EM to 500 encoded training points \(t = 0\.5\); "
                        r"mean log-likelihood -?[\d.]+", lines[13]), lines[13]
    assert lines[14].startswith("[eval] iteration 12: ") and " mode_purity " in lines[14] and len(lines) == 15


def test_a_ray_train_runs_progress_sink_forwards_headlines_evaluations_and_the_ex_post_refit():
    from service.ray_progress import ProgressSink

    class _Remote:
        def __init__(self):
            self.events = []

        def remote(self, event):
            self.events.append(event)

    class _Board:
        put = _Remote()

    board = _Board()
    sink = ProgressSink(board, 12, 6)
    sink.log_metrics(12, {"train/loss_encoder": 0.5, "train/iterations_per_s": 3.0, "train/rec_real": 1.0})
    sink.log_metrics(12, {"ex_post/loglik": -1.5, "ex_post/points": 500.0, "ex_post/noise": 0.5})
    sink.log_metrics(12, {"eval/hist_kl": 2.0})
    assert board.put.events == [("begin", 12, 6),
                                ("metrics", 12, {"train/loss_encoder": 0.5, "train/iterations_per_s": 3.0}),
                                ("metrics", 12, {"ex_post/loglik": -1.5, "ex_post/points": 500.0, "ex_post/noise": 0.5}),
                                ("metrics", 12, {"eval/hist_kl": 2.0})]
