"""MlflowSink through tracking outages (a fake client; the real server is in test_e2e_faults.py)."""

import io
import os

from service.tracking import MlflowSink


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
