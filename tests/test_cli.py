"""``python -m jobs.train`` on bad input: exit 2 with ``error: <field>...``, before Ray, writing nothing.

``tests/test_e2e_train.py`` runs the happy path through Ray. Here every case runs in one fresh
interpreter, which then proves that none of them imported Ray.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import train as train_job
from service.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]

CASES = [  # (extra argv, what stderr says)
    (["--preset", "rings/nope"], r"^error: preset: 'rings/nope' is unknown; valid presets are \[.*'rings/sintro'"),
    (["--set", "objective.beta_negg=2"], r"^error: objective\.beta_negg: unknown key; known keys are \[.*'beta_neg'"),
    (["--set", "prior.num_components=many"], r"^error: prior\.num_components: expected an integer, got 'many'"),
    (["--set", "objective.beta_neg=-0.1"], r"^error: objective\.beta_neg: -0\.1 is out of range; allowed \[0, inf\]"),
    (["--preset", "2spirals/mog-ip", "--set", "prior.num_components=0"],
     r"^error: prior\.num_components: 0 is out of range; allowed \[1, inf\]"),
    (["--smoke", "--set", "schedule.warmup=13"],
     r"^error: schedule\.warmup: 13 is longer than the run; allowed \[0, schedule\.iterations=12\]"),
    (["--set", "objective.beta_kl"], r"^error: --set 'objective\.beta_kl': expected dotted\.key=value"),
    (["--workers", "0"], r"^error: scaling\.workers: 0 is out of range; allowed \[1, inf\]"),
    (["--seed", "x"], r"error: argument --seed: invalid int value: 'x'"),
    (["--config", "{bad_yaml}"], r"^error: config: '.*bad\.yaml' is not valid YAML"),
    (["--config", "{unknown_key_yaml}"], r"^error: objective\.beta_kll: unknown key"),
    (["--config", "{missing_yaml}"], r"^error: .*No such file or directory: '.*missing\.yaml'"),
]

RUN_ALL = """
import contextlib, io, json, sys
from jobs import train
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = train.main(argv)
        except SystemExit as e:
            code = e.code
    results.append([code, err.getvalue()])
ray = sorted(m for m in sys.modules if m.split(".")[0] == "ray")
print(json.dumps({"results": results, "ray": ray[:5]}))
"""


def test_bad_input_exits_2_naming_the_field_before_ray_and_writes_nothing(tmp_path):
    files = {"bad_yaml": tmp_path / "bad.yaml", "unknown_key_yaml": tmp_path / "unknown.yaml",
             "missing_yaml": tmp_path / "missing.yaml"}
    files["bad_yaml"].write_text("seed: [1,\n")
    files["unknown_key_yaml"].write_text("objective:\n  beta_kll: 0.5\n")
    out = tmp_path / "out"
    argvs = [[a.format(**files) for a in argv] + ["--output-dir", str(out)] for argv, _ in CASES]
    proc = subprocess.run([sys.executable, "-c", RUN_ALL, json.dumps(argvs)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, message), (code, err) in zip(CASES, report["results"]):
        assert code == 2, (argv, code, err)
        assert re.search(message, err.strip().splitlines()[-1]), (argv, err)
    assert report["ray"] == []  # every case stopped before Ray was imported
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "unknown.yaml"]


def test_list_presets_prints_one_name_per_line(tmp_path, capsys):
    assert train_job.main(["--list-presets", "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == sorted(PRESETS) and out.endswith("\n")
    assert "8gaussians/mog-ip-lc" in out.splitlines() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,field", [
    (["--set", "prior.trainable=yes"], "prior.trainable: expected true or false"),
    (["--set", "optim.milestones=[20, 10]"], "optim.milestones: [20, 10] must be increasing positive integers"),
])
def test_bad_input_in_process(argv, field, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_job.main(argv + ["--output-dir", str(tmp_path / "out")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith(f"error: {field}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("job", sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__"))
def test_help_keeps_the_shell_line_continuations_of_its_examples(job):
    """A ``\\`` ending a usage line in a job's docstring must reach ``--help``: a non-raw docstring
    would join the two lines, and the example would no longer paste into a shell as written."""
    source = (REPO / "jobs" / f"{job}.py").read_text()
    written = source.split('"""')[1]  # the module docstring as it stands in the file
    continued = [line for line in written.splitlines() if line.endswith("\\")]
    doc = __import__(f"jobs.{job}", fromlist=["_"]).__doc__ or ""
    assert [line for line in doc.splitlines() if line.endswith("\\")] == continued


def test_a_finished_run_says_how_to_serve_it():
    """The line after ``results:``: the checkpoint on this machine, else the MLflow run's copy with its store."""
    from jobs.train import serve_source

    assert serve_source({"output_dir": "/tmp/my runs/a", "mlflow_run_id": "abc"}) == "'/tmp/my runs/a/checkpoint.pt'"
    assert serve_source({"output_dir": "runs/a", "mlflow_run_id": "abc"}) == "runs/a/checkpoint.pt"
    assert (serve_source({"output_dir": "s3://bucket/runs/a", "mlflow_run_id": "abc",
                          "tracking_uri": "http://mlflow:5000"})
            == "runs:/abc/checkpoint/checkpoint.pt --tracking-uri http://mlflow:5000")
