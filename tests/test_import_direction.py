"""The math never imports the edges: no ray, mlflow or fastapi under the core modules (STYLE 6.2).

Checked in a fresh interpreter, so that modules other tests imported do not hide an offender.
"""

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import service.metrics

REPO = Path(__file__).resolve().parents[1]

CORE = ["service.config", "service.gaussian", "service.priors", "service.networks", "service.model",
        "service.objectives", "service.step", "service.loop", "service.ex_post", "service.data", "service.images",
        "service.sampling", "service.evaluation", "service.checkpoint", "service.presets", "service.tracking",
        "service.distributed", "service.plots", "service.feature_extractor", "service.image_eval",
        "service.spaces", "service.selection", "service.tables"]
METRICS = [f"service.metrics.{m.name}" for m in pkgutil.iter_modules(service.metrics.__path__)]
FORBIDDEN = ("ray", "mlflow", "fastapi")

# Imports each module in turn and reports which one first brought in a forbidden package.
PROBE = """
import importlib, json, sys
forbidden = {forbidden!r}
offenders = {{}}
for name in {modules!r}:
    importlib.import_module(name)
    found = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
    if found:
        offenders[name] = found[:5]
        break
print(json.dumps(offenders))
"""


def _offenders(modules: list[str], forbidden: tuple[str, ...] = FORBIDDEN) -> dict[str, list[str]]:
    code = PROBE.format(forbidden=forbidden, modules=modules)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_math_modules_import_no_ray_mlflow_or_fastapi():
    assert "service.metrics.density" in METRICS
    assert _offenders(CORE + METRICS + ["jobs.common"]) == {}


def test_the_probe_names_the_first_module_that_imports_a_package():
    # the same probe, pointed at a package that service.config does import (cheap: no torch)
    offenders = _offenders(["service", "service.config"], forbidden=("yaml",))
    assert list(offenders) == ["service.config"] and offenders["service.config"][0] == "yaml"
