"""The README's cluster recipe ("On a Ray cluster"), typed as written into a shell with a bare
environment: a token-authenticated Ray head on loopback, then ``ray job submit`` of a training job.

Four changes to the recipe: ``--smoke`` for ``--quick`` (seconds of training instead of minutes);
``ray job submit`` repeated (up to 30 times, 10 s apart) only while the new head answers "No
available agent to submit job" (seen on a loaded machine right after ``ray start``);
free ports for the head's GCS, dashboard and dashboard agent instead of 6379, 8265 and 52365 (on
a shared machine, such as ``make test``'s parallel workers, another local Ray instance may hold
them: its dashboard would then answer ``ray job submit``, and our head's agent, failing to bind
52365, would never come up, so every submission would be refused with "No available agent");
and no ``ray stop``, which stops every Ray process on the machine (other tests' and other users'
local instances too): the test ends the processes of its own shell session instead. The repository's code is
copied into a temporary folder with a ``.venv`` link to this interpreter's venv, so that ``$PWD``,
``--working-dir .`` and the outputs stay there; ``HOME`` is temporary too (the token file).
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # .venv/bin/python -> .venv


def recipe() -> list[str]:
    """The shell lines of the README's cluster recipe, ``\\`` continuations joined."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### On a Ray cluster"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]


# Right after `ray start` on a loaded machine the head's job agent may not be up yet: the submission
# is refused ("No available agent to submit job", no job created) and is safe to repeat; any other
# failure ends the shell.
RETRY = """for attempt in $(seq 30); do
  if out=$({submit} 2>&1); then echo "$out"; break; fi
  echo "$out"
  echo "$out" | grep -q "No available agent to submit job" || exit 1
  [ "$attempt" = 30 ] && exit 1
  sleep 10
done"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(sid: int) -> list[int]:
    """The processes of session ``sid`` and their descendants (Ray starts a job's driver in a
    session of its own)."""
    parent, found = {}, set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
                if os.getsid(int(entry.name)) == sid:
                    found.add(int(entry.name))
            except (OSError, ValueError):  # gone meanwhile
                pass
    grew = True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


def _end_session(sid: int) -> None:
    """SIGTERM, then SIGKILL, the processes of the shell's session (the Ray head it started)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _session_processes(sid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while _session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.5)


def test_recipe_lines_are_the_documented_ones():
    lines = recipe()
    assert lines[0].startswith(". .venv/bin/activate") and lines[-1] == "ray stop"
    assert any(ln.startswith("ray start --head") and "--dashboard-host=127.0.0.1" in ln for ln in lines)
    assert any(ln.startswith("export RAY_AUTH_MODE=token") for ln in lines)


@pytest.mark.skipif(not (VENV / "bin" / "activate").is_file() or not (VENV / "bin" / "ray").is_file(),
                    reason="needs the tests to run from a venv with the project installed (make test does)")
def test_readme_cluster_recipe_runs_as_written_in_a_fresh_shell(tmp_path):
    work, home = tmp_path / "repo", tmp_path / "home"
    home.mkdir()
    work.mkdir()
    for name in ("service", "jobs"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".gitignore", work)  # --working-dir . leaves out what it ignores (.venv, runs, mlflow.db)
    (work / ".venv").symlink_to(VENV)
    gcs, dashboard, agent = _free_port(), _free_port(), _free_port()
    lines = []
    for ln in recipe():
        if ln == "ray stop":
            continue
        if ln.startswith("ray start --head"):
            ln += f" --port={gcs} --dashboard-port={dashboard} --dashboard-agent-listen-port={agent}"
        ln = ln.replace("--quick", "--smoke").replace("http://127.0.0.1:8265", f"http://127.0.0.1:{dashboard}")
        if ln.startswith("ray job submit"):  # a person waits when the new head is not ready yet: so does the test
            ln = RETRY.format(submit=ln)
        lines.append(ln)
    assert sum(f":{dashboard}" in ln for ln in lines) == 1  # ray job submit --address (in its retry loop)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    # `ray start` records its head in Ray's current-cluster file, and `ray stop` (not run here) would
    # remove it: put back what was there, or a later ray.init() (make run after make test) waits for a dead head
    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_text() if current.is_file() else None
    shell = subprocess.Popen(["bash", "-e", "-c", "\n".join(lines)], cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = shell.communicate(timeout=900)
    finally:
        if shell.poll() is None:
            shell.kill()
        _end_session(shell.pid)
        # undo only our own write: another module's test cluster (test_e2e_multinode's) may have written or
        # removed the file meanwhile, and putting back what it held then names a cluster that is gone
        if current.is_file() and current.read_text().strip().endswith(f":{gcs}"):
            if before is None:
                current.unlink(missing_ok=True)
            else:
                current.write_text(before)
    print(out[-4000:])
    assert "command not found" not in out
    assert shell.returncode == 0, out[-3000:]
    assert re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-3000:]
    assert (home / ".ray" / "auth_token").is_file()
    metrics = work / "runs" / "sg" / "metrics.json"
    assert metrics.is_file() and "hist_kl" in metrics.read_text()
    assert (work / "mlflow.db").is_file()
