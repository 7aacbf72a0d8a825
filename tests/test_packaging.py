"""Packaging: every job is a console script that answers ``--help``, every imported distribution is
declared, the files ``deploy/Dockerfile`` copies build the project's wheel (with every script), the
image it builds is the one ``deploy/rayjob.yaml`` runs, and the docs name only files that exist.

The console scripts of an installed checkout are written by ``pip install -e .`` (``make setup``
re-runs it whenever ``pyproject.toml`` changes); these tests check the targets themselves, as the
generated scripts call them: ``sys.argv = [script, ...]; sys.exit(main())``.
"""

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]

CALL_ALL = """
import contextlib, importlib, io, json, sys
results = {}
for name, target in json.loads(sys.argv[1]).items():
    module, attr = target.split(":")
    main = getattr(importlib.import_module(module), attr)
    out = io.StringIO()
    sys.argv = [name, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            code = main()
        except SystemExit as e:
            code = e.code
    results[name] = [callable(main), code, out.getvalue()]
print(json.dumps(results))
"""


def _requirement_name(req: str) -> str:
    return re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_every_job_is_a_console_script_whose_main_answers_help():
    jobs = {p.stem for p in (REPO / "jobs").glob("*.py")
            if re.search(r"^def main\(", p.read_text(), re.M)}
    assert {t.split(":")[0].removeprefix("jobs.") for t in SCRIPTS.values()} == jobs  # none forgotten
    for name, target in SCRIPTS.items():  # introprior-<job with dashes>
        assert name == "introprior-" + target.split(":")[0].removeprefix("jobs.").replace("_", "-")
    proc = subprocess.run([sys.executable, "-c", CALL_ALL, json.dumps(SCRIPTS)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (is_callable, code, out) in results.items():
        assert is_callable and code == 0, (name, code)
        assert out.startswith(f"usage: {name} "), (name, out[:200])  # argparse names the script


def test_every_imported_distribution_is_declared():
    """Each top-level import of ``service/`` and ``jobs/`` outside the standard library comes from a
    distribution named in ``[project.dependencies]`` (not merely pulled in by another one)."""
    declared = {_requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    owners = metadata.packages_distributions()
    missing = {}
    for path in sorted((REPO / "service").rglob("*.py")) + sorted((REPO / "jobs").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"service", "jobs"}:
                dists = {_requirement_name(d) for d in owners.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def _dockerfile() -> list[list[str]]:
    lines = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    return [ln.split() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_the_files_the_dockerfile_copies_build_the_wheel_with_every_console_script(tmp_path):
    """Copy what ``deploy/Dockerfile`` copies before its ``pip install``, build the wheel from that
    alone (offline: no build isolation, no dependencies), and open it."""
    app = tmp_path / "app"
    app.mkdir()
    steps = _dockerfile()
    install = next(i for i, s in enumerate(steps) if s[0] == "RUN" and "pip" in s and "install" in s)
    for step in steps[:install]:
        if step[0] == "COPY":
            *sources, dest = [a for a in step[1:] if not a.startswith("--")]
            for src in sources:
                target = app / dest.removeprefix("./") if dest not in ("./", ".") else app
                if (REPO / src).is_dir():
                    shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(REPO / src, target / Path(src).name if dest.endswith("/") else target)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "-w", str(tmp_path / "dist"), str(app)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("introprior-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = dict(re.findall(r"^(\S+) = (\S+)$", z.read(entry_points).decode(), re.M))
    assert scripts == SCRIPTS
    for module in {t.split(":")[0] for t in SCRIPTS.values()} | {"service.ray_train", "service.serving",
                                                                  "service.metrics.density"}:
        assert module.replace(".", "/") + ".py" in names, module
    assert "service/mixture_kernel.c" in names  # the C mixture kernel is built from the installed source


def test_the_image_is_the_one_rayjob_runs_with_the_pinned_ray_and_the_documented_build_command():
    steps = _dockerfile()
    (base,) = [s[1] for s in steps if s[0] == "FROM"]
    ray_pin = next(r for r in PYPROJECT["project"]["dependencies"] if _requirement_name(r) == "ray")
    job = yaml.safe_load((REPO / "deploy" / "rayjob.yaml").read_text())
    cluster = job["spec"]["rayClusterSpec"]
    assert base == f"rayproject/ray:{cluster['rayVersion']}-py311" and ray_pin.endswith(f"=={cluster['rayVersion']}")
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    (image,) = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    build = f"docker build -f deploy/Dockerfile -t {image} ."
    for doc in ("README.md", "docs/sweeps.md", "deploy/Dockerfile", "deploy/rayjob.yaml"):
        assert build in (REPO / doc).read_text(), doc
    space = job["spec"]["entrypoint"].split()[3]  # python -m jobs.sweep /app/tune_spaces/<file>
    assert any(s[:2] == ["COPY", "--chown=ray:users"] and s[2] == "tune_spaces" and s[3] == "./tune_spaces"
               for s in steps) and (REPO / space.removeprefix("/app/")).is_file()


# paths of this repository in backquotes, e.g. `deploy/serve.yaml`, `tune_spaces/smoke_seeds.yaml`
PATH_REF = re.compile(r"`((?:service|jobs|tests|deploy|docs|tune_spaces)/[A-Za-z0-9_./-]*|[A-Z]+\.md)`")


@pytest.mark.parametrize("doc", ["README.md", *(f"docs/{p.name}" for p in sorted((REPO / "docs").glob("*.md")))])
def test_files_the_docs_name_exist(doc):
    text = (REPO / doc).read_text()
    refs = set(PATH_REF.findall(text)) | set(re.findall(r"\]\(([^)#:]+)\)", text))  # and markdown links
    missing = [r for r in sorted(refs) if not any(
        p.exists() for p in (REPO / r.rstrip("/.,"), (REPO / doc).parent / r)) and "{" not in r and "*" not in r
        and not r.endswith("/<name>.yaml")]
    assert not missing, f"{doc} names files that do not exist: {missing}"
    assert "`SPEC`" not in text  # the spec is the file SPEC.md
