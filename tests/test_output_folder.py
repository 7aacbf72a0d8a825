"""A run does not replace another run's results: ``--output-dir`` holding another experiment is refused
before anything starts (``ray_train.check_output_folder``), naming the differing fields."""

import pytest

from jobs import train as train_job
from service.presets import get_preset, smoke
from service.config import apply_overrides, dump_yaml, to_dict
from service.ray_train import OutputTaken, check_output_folder


def _cfg(*overrides: str):
    return apply_overrides(smoke(get_preset("8gaussians/mog-ip-lc")), list(overrides))


def _results(folder, cfg):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    (folder / "metrics.json").write_text('{"hist_kl": 1.5}')
    (folder / "checkpoint.pt").write_bytes(b"weights")


def test_a_new_or_empty_folder_is_free(tmp_path):
    check_output_folder(_cfg(), tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("mine")  # a user's own file is not a run's result
    check_output_folder(_cfg(), tmp_path / "empty")


def test_the_same_experiment_may_replace_its_results(tmp_path):
    _results(tmp_path, _cfg())
    check_output_folder(_cfg(), tmp_path)
    # fields that do not define the experiment (how often to log, how many workers, tracking) may differ
    check_output_folder(_cfg("schedule.eval_every=50", "scaling.workers=2", "tracking.model_name=other"), tmp_path)


def test_another_experiment_is_refused_naming_the_fields(tmp_path):
    _results(tmp_path, _cfg())
    with pytest.raises(OutputTaken) as e:
        check_output_folder(_cfg("seed=3", "objective.beta_neg=0.5"), tmp_path)
    text = str(e.value)
    assert str(tmp_path) in text and "another experiment" in text
    assert "seed: 0 -> 3" in text
    assert "objective.beta_neg: 0.9 -> 0.5" in text
    assert "schedule" not in text  # only what differs
    assert (tmp_path / "metrics.json").read_text() == '{"hist_kl": 1.5}'  # nothing touched


def test_a_resume_with_an_intended_change_may_replace_its_own_results(tmp_path):
    started = _cfg()
    _results(tmp_path, started)
    check_output_folder(_cfg("objective.beta_neg=0.5"), tmp_path, own=to_dict(started))
    with pytest.raises(OutputTaken):  # but not another run's
        check_output_folder(_cfg("objective.beta_neg=0.5"), tmp_path, own=to_dict(_cfg("seed=7")))


@pytest.mark.parametrize("content", ["just: a user's file\n", "[1, 2, 3]\n", "name: {unclosed\n"])
def test_a_config_yaml_that_is_not_a_run_config_is_refused(tmp_path, content):
    (tmp_path / "config.yaml").write_text(content)
    with pytest.raises(OutputTaken, match="not a run config"):
        check_output_folder(_cfg(), tmp_path)
    assert (tmp_path / "config.yaml").read_text() == content


@pytest.mark.parametrize("orphan", ["checkpoint.pt", "metrics.json"])
def test_results_without_their_config_are_refused(tmp_path, orphan):
    (tmp_path / orphan).write_bytes(b"x")
    with pytest.raises(OutputTaken, match=f"holds {orphan} of an unknown run"):
        check_output_folder(_cfg(), tmp_path)


def test_jobs_train_exits_2_before_ray_starts_and_leaves_the_folder_as_it_was(tmp_path, capsys):
    import ray

    out = tmp_path / "runs" / "first"
    _results(out, _cfg())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = train_job.main(["--preset", "8gaussians/mog-ip-lc", "--smoke", "--workers", "1", "--set", "seed=1",
                           "--output-dir", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: output folder" in err and "seed: 0 -> 1" in err
    assert not ray.is_initialized()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was started for it


def test_an_output_uri_is_read_through_its_filesystem(tmp_path):
    _results(tmp_path / "out", _cfg())
    uri = (tmp_path / "out").as_uri()  # file://...: read through pyarrow.fs, as s3:// or gs:// would be
    check_output_folder(_cfg(), uri)
    with pytest.raises(OutputTaken, match="seed: 0 -> 2"):
        check_output_folder(_cfg("seed=2"), uri)
