"""A run name stands for one experiment; which failures are retried (no Ray cluster needed)."""

import pytest

from service import checkpoint
from service.checkpoint import CheckpointError, NonFiniteCheckpointError
from service.config import ConfigError, apply_overrides, dump_yaml
from service.presets import get_preset, smoke
from service.ray_train import (RUN_RECORD, ConfigChanged, check_same_experiment, config_diff, config_fingerprint,
                               is_non_retryable)
from service.step import TrainingDiverged


def _cfg(**overrides):
    return apply_overrides(smoke(get_preset("8gaussians/mog-ip-lc")), overrides)


def test_the_fingerprint_names_the_experiment_not_where_it_runs():
    base = _cfg()
    assert config_fingerprint(base) == config_fingerprint(_cfg())  # deterministic: the same command resumes
    assert len(config_fingerprint(base)) == 10
    for same in ({"scaling.workers": 2}, {"schedule.log_every": 3}, {"tracking.run_name": "x"}):
        assert config_fingerprint(_cfg(**same)) == config_fingerprint(base), same
    for other in ({"seed": 1}, {"objective.beta_neg": 2.0}, {"schedule.iterations": 18}):
        assert config_fingerprint(_cfg(**other)) != config_fingerprint(base), other


def test_a_changed_config_is_refused_with_every_differing_field(tmp_path):
    (tmp_path / RUN_RECORD).write_text(dump_yaml(_cfg()))
    assert check_same_experiment(_cfg(**{"scaling.workers": 2}), tmp_path, "r") == []
    changed = _cfg(**{"objective.beta_neg": 2.0, "seed": 3})
    with pytest.raises(ConfigChanged) as e:
        check_same_experiment(changed, tmp_path, "r")
    msg = str(e.value)
    assert msg.startswith("run 'r' exists with another config; resuming it would mix two experiments")
    assert "  objective.beta_neg: 0.9 -> 2.0\n  seed: 0 -> 3\n" in msg and "--allow-config-change" in msg
    assert isinstance(e.value, ConfigError)
    assert check_same_experiment(changed, tmp_path, "r", allow_change=True) == [
        ("objective.beta_neg", 0.9, 2.0), ("seed", 0, 3)]


def test_runs_without_a_record_are_checked_against_their_latest_checkpoint(tmp_path, smoke_checkpoint):
    assert check_same_experiment(_cfg(seed=5), tmp_path, "new") == []  # a new run name: nothing to compare
    state = checkpoint.load(smoke_checkpoint)
    checkpoint.save(tmp_path / "checkpoint_2026-01-01_00-00-00.000001" / "checkpoint.pt", state)
    with pytest.raises(ConfigChanged, match=r"  seed: 0 -> 5\n"):
        check_same_experiment(_cfg(seed=5), tmp_path, "old")
    assert config_diff(state["config"], _cfg()) == []


@pytest.mark.parametrize("error, retried", [
    (TrainingDiverged("loss_vae is nan"), False),
    (NonFiniteCheckpointError("nan"), False),
    (CheckpointError("unreadable"), False),
    (ConfigChanged("changed"), False),
    (RuntimeError("Connection closed by peer"), True),
    (OSError("No space left on device"), True),
])
def test_only_failures_that_could_pass_on_a_retry_are_retried(error, retried):
    assert is_non_retryable(error) is not retried


def test_the_default_run_name_makes_the_same_command_resume(monkeypatch, tmp_path):
    import service.ray_train
    from jobs import train as train_job

    names = []

    def fake_fit(cfg, *, run_name, output_dir, **kw):
        names.append(run_name)
        return {"metrics": {}, "output_dir": str(output_dir), "mlflow_run_id": "-", "iteration": 0}

    monkeypatch.setattr(service.ray_train, "fit", fake_fit)
    base = ["--preset", "8gaussians/mog-ip-lc", "--smoke", "--storage-path", str(tmp_path / "ray"),
            "--output-dir", str(tmp_path / "a")]
    for argv in (base, base, base + ["--workers", "2"], base + ["--seed", "1"],
                 base[:-1] + [str(tmp_path / "b")], base + ["--run-name", "mine"]):
        assert train_job.main(argv) == 0
    same, again, workers, seed, folder, explicit = names
    assert same == again == workers and same.startswith("8gaussians-mog-ip-lc-") and len(same) == 31
    assert len({same, seed, folder}) == 3 and explicit == "mine"
