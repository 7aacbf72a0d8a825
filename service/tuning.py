"""Ray Tune sweeps from plain YAML space files (SPEC §6.4, §7.3): the only place YAML becomes Tune objects.

A space file (``tune_spaces/*.yaml``) holds:

- ``preset:`` one preset name, or ``presets:`` a list of names (a grid dimension) or a mapping
  ``name -> fixed overrides`` (nested like the config; e.g. the paper's selected betas per preset);
- ``metric:`` / ``mode:`` the selection metric (``hist_kl`` / ``min``, SPEC §6.4);
- ``seeds:`` optional list, a grid dimension (innermost);
- ``smoke:`` default shrink (``presets.smoke``) when the command line does not say;
- ``requires:`` optional feature the space needs (``images``): presets that do not exist yet make
  ``load_space`` raise ``SpaceUnavailable`` ("fmnist is not available yet");
- ``param_space:`` mirroring ``ExperimentConfig``'s nesting, with ``{grid_search: [...]}`` leaves
  (plain values are constants). Special key ``objective.beta_neg_factor: k`` sets
  ``objective.beta_neg = k * objective.beta_kl`` (the paper's grid ``beta_neg = k * beta_kl``).

``load_space`` expands the cartesian product presets x grid x seeds itself and validates every
variant before Ray starts. ``run_sweep`` runs one Tune trial per variant: a 0.01-CPU driver that
calls ``ray_train.fit`` (the Train V2 pattern of STACK.md) and reports once at the end; a diverged
or failed training run is reported as ``status="failed"`` with its error, and the sweep goes on.
Each trial's MLflow run is nested under one parent run per sweep. ``aggregate`` selects the
hyperparameters with the lowest mean ``hist_kl`` per (dataset, configuration) and reports
mean ± standard error over seeds next to the paper's Table 1 (SPEC §8).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ConfigError, ExperimentConfig, apply_overrides, flatten, to_dict
from .presets import PRESETS, quick, smoke
from .tracking import METRIC_NAMES

Shrink = Literal["full", "quick", "smoke"]
TOP_KEYS = ("preset", "presets", "metric", "mode", "seeds", "smoke", "requires", "param_space")
FACTOR_KEY = "objective.beta_neg_factor"  # beta_neg = factor * beta_kl (SPEC §6.4)
FINAL_METRICS = tuple(m.removeprefix("eval/") for m in METRIC_NAMES if m.startswith("eval/"))


class SpaceError(ConfigError):
    """A space file is malformed; the message names the file and the dotted key."""


class SpaceUnavailable(SpaceError):
    """The space needs a feature (``requires:``) that the service does not have yet."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e6`` and ``2e-4`` as floats (plain YAML 1.1 wants ``1.0e+6``)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"), list("-+0123456789."))


# --------------------------------------------------------------------------------------------
# Space files -> validated variants
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One trial: a preset, a seed and resolved dotted overrides (``params`` as written in the space)."""

    id: int
    preset: str
    params: dict[str, Any]
    overrides: dict[str, Any]

    def config(self, shrink: Shrink = "full") -> ExperimentConfig:
        base = PRESETS[self.preset]()
        base = smoke(base) if shrink == "smoke" else quick(base) if shrink == "quick" else base
        return apply_overrides(base, self.overrides)

    @property
    def hparams(self) -> dict[str, Any]:
        """The overrides that define the hyperparameter setting (everything but the seed)."""
        return {k: self.overrides[k] for k in sorted(self.overrides) if k != "seed"}


@dataclass(frozen=True)
class SweepSpec:
    source: str
    name: str
    metric: str
    mode: str
    smoke: bool
    variants: tuple[Variant, ...]
    varying: tuple[str, ...]  # keys (``preset``, ``seed``, dotted params) taking more than one value
    requires: str | None = None
    text: str = ""  # the space file as written (hashed to protect resumes, logged to MLflow)

    def configs(self, shrink: Shrink = "full") -> list[ExperimentConfig]:
        """Every variant's validated config; errors name the file, the variant and the dotted key."""
        out = []
        for v in self.variants:
            try:
                out.append(v.config(shrink))
            except ConfigError as e:
                raise SpaceError(f"{self.source}: variant {v.id} {v.preset} {v.params} ({shrink}): {e}") from None
        return out


def _schema(cls: type = ExperimentConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> dataclass type (sections) or field annotation (leaves)."""
    import typing

    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        out[path] = tp
        if dataclasses.is_dataclass(tp):
            out.update(_schema(tp, path + "."))
    return out


def _flatten_space(node: Any, prefix: str, source: str, schema: dict[str, Any], what: str) -> dict[str, list]:
    """``param_space`` (or a preset's overrides) -> ``{dotted: [values]}``; constants are 1-lists."""
    if not isinstance(node, dict):
        raise SpaceError(f"{source}: {what}{'.' + prefix[:-1] if prefix else ''}: expected a mapping, got {node!r}")
    out: dict[str, list] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        tp = schema.get(path)
        if path != FACTOR_KEY and tp is None:
            parent = prefix[:-1]
            known = sorted(p.rsplit(".", 1)[-1] for p in schema if p.rpartition(".")[0] == parent)
            if parent == "objective":
                known.append(FACTOR_KEY.rsplit(".", 1)[-1])
            raise SpaceError(f"{source}: {what}.{path}: unknown key; known keys are {known}")
        if tp is not None and dataclasses.is_dataclass(tp):
            out.update(_flatten_space(value, path + ".", source, schema, what))
        elif isinstance(value, dict):
            if set(value) != {"grid_search"}:
                raise SpaceError(f"{source}: {what}.{path}: unsupported search {sorted(value)}; "
                                 f"only {{grid_search: [...]}} or a plain value is allowed")
            grid = value["grid_search"]
            if not isinstance(grid, list) or not grid:
                raise SpaceError(f"{source}: {what}.{path}: grid_search must be a non-empty list, got {grid!r}")
            out[path] = grid
        else:
            out[path] = [value]
    for k in (FACTOR_KEY,):
        for v in out.get(k, []):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise SpaceError(f"{source}: {what}.{k}: {v!r} is not a positive number (beta_neg = k * beta_kl)")
    return out


def _presets(data: dict[str, Any], source: str, schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``preset:`` / ``presets:`` (list, grid or mapping) -> [(name, fixed dotted overrides)]."""
    if ("preset" in data) == ("presets" in data):
        raise SpaceError(f"{source}: give exactly one of 'preset:' (a name) or 'presets:' (a list or mapping)")
    raw = data.get("presets", data.get("preset"))
    if isinstance(raw, dict) and set(raw) == {"grid_search"}:
        raw = raw["grid_search"]
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):
        raw = {name: {} for name in raw}
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{source}: presets: expected a preset name, a non-empty list or a mapping, got {raw!r}")
    out = []
    for name, fixed in raw.items():
        flat = _flatten_space(fixed or {}, "", source, schema, f"presets.{name}")
        if any(len(v) > 1 for v in flat.values()):
            raise SpaceError(f"{source}: presets.{name}: per-preset overrides are fixed values; "
                             f"put grids in param_space")
        out.append((str(name), {k: v[0] for k, v in flat.items()}))
    return out


def _check_presets(presets: list[tuple[str, dict]], requires: str | None, source: str) -> None:
    for name, _ in presets:
        if name in PRESETS:
            continue
        if requires:
            raise SpaceUnavailable(f"{source}: {name.split('/')[0]} is not available yet (requires: {requires}; "
                                   f"no preset {name!r} in service/presets.py)")
        raise SpaceError(f"{source}: preset: {name!r} is unknown; valid presets are {sorted(PRESETS)}")


def _resolve(params: dict[str, Any], fixed: dict[str, Any], preset: str, source: str) -> dict[str, Any]:
    """Dotted overrides of one variant, with ``beta_neg_factor`` turned into ``beta_neg``."""
    overrides = {**fixed, **{k: v for k, v in params.items() if k != FACTOR_KEY}}
    if FACTOR_KEY in params:
        if "objective.beta_neg" in overrides:
            raise SpaceError(f"{source}: {FACTOR_KEY} and objective.beta_neg both set; give one of them")
        beta_kl = overrides.get("objective.beta_kl", PRESETS[preset]().objective.beta_kl)
        if isinstance(beta_kl, (int, float)) and not isinstance(beta_kl, bool):
            overrides["objective.beta_neg"] = round(params[FACTOR_KEY] * beta_kl, 12)
    return overrides


def spec_from_dict(data: Any, source: str, text: str = "") -> SweepSpec:
    """Validate a parsed space and expand it (presets x grid x seeds); see the module docstring."""
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: expected a mapping with keys {list(TOP_KEYS)}")
    for key in data:
        if key not in TOP_KEYS:
            raise SpaceError(f"{source}: {key}: unknown key; known keys are {list(TOP_KEYS)}")
    schema = _schema()
    requires = data.get("requires")
    grid = _flatten_space(data.get("param_space") or {}, "", source, schema, "param_space")
    presets = _presets(data, source, schema)
    _check_presets(presets, requires, source)
    metric, mode = data.get("metric", "hist_kl"), data.get("mode", "min")
    if metric not in FINAL_METRICS:
        raise SpaceError(f"{source}: metric: {metric!r} is not one of {list(FINAL_METRICS)}")
    if mode not in ("min", "max"):
        raise SpaceError(f"{source}: mode: {mode!r} is not one of ['min', 'max']")
    is_smoke = data.get("smoke", False)
    if not isinstance(is_smoke, bool):
        raise SpaceError(f"{source}: smoke: expected true or false, got {is_smoke!r}")
    seeds = data.get("seeds")
    if seeds is not None:
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                               for s in seeds):
            raise SpaceError(f"{source}: seeds: expected a non-empty list of integers, got {seeds!r}")
        if "seed" in grid:
            raise SpaceError(f"{source}: seeds: and param_space.seed both set; give one of them")
    variants = []
    for (preset, fixed), combo in itertools.product(presets, itertools.product(*grid.values())):
        params = dict(zip(grid, combo))
        for seed in seeds or [None]:
            overrides = _resolve(params, fixed, preset, source)
            if seed is not None:
                overrides["seed"] = seed
            variants.append(Variant(len(variants), preset, params, overrides))
    varying = tuple(k for k, vals in [("preset", [p for p, _ in presets]), ("seed", seeds or [None]), *grid.items()]
                    if len(vals) > 1)
    spec = SweepSpec(source=source, name=Path(source).stem, metric=metric, mode=mode, smoke=is_smoke,
                     variants=tuple(variants), varying=varying, requires=requires, text=text)
    spec.configs("smoke" if is_smoke else "full")  # every variant, before Ray starts
    return spec


def load_space(path: str | Path) -> SweepSpec:
    """Read, validate and expand ``tune_spaces/<name>.yaml``; raises ``SpaceError`` naming file and key."""
    text = Path(path).read_text()
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML: {e}") from None
    return spec_from_dict(data, str(path), text)


def stated_trials(path: str | Path) -> int | None:
    """The ``# trials: N`` count stated in a space file's header."""
    m = re.search(r"^#\s*trials:\s*([\d,]+)", Path(path).read_text(), flags=re.M)
    return int(m.group(1).replace(",", "")) if m else None


# --------------------------------------------------------------------------------------------
# Running a sweep: Tune trials that each drive one Ray Train run
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _TrialContext:
    output_dir: str
    tracking_uri: str
    parent_run_id: str
    sweep_name: str
    shrink: Shrink
    varying: tuple[str, ...]
    cpus_per_worker: float  # Ray resource per Train worker (the trial's share minus its driver's 0.01)
    threads_per_worker: int  # torch threads per Train worker (its whole CPUs)
    gpus_per_worker: float


def _error_text(e: BaseException) -> str:
    """``Type: message`` of the root cause (a worker's ``TrainingDiverged`` rather than the wrapper)."""
    failures = list(getattr(e, "worker_failures", {}).values()) or [getattr(e, "controller_failure", None)]
    root = failures[0] if failures[0] is not None else e
    while getattr(root, "cause", None) is not None and root.cause is not root:
        root = root.cause
    name = getattr(root, "cause_cls", type(root)).__name__ if hasattr(root, "cause_cls") else type(root).__name__
    lines = [ln for ln in str(root).splitlines() if ln.strip()]
    message = next((ln for ln in reversed(lines) if name in ln), lines[-1] if lines else "")
    message = message.split(f"{name}: ", 1)[-1]
    return f"{name}: {message}"[:2000]


def _trial(config: dict[str, Any], ctx: _TrialContext) -> None:
    """Tune trial: build the variant's config, train it with Ray Train, report once (ok or failed)."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from .ray_train import fit, start_mlflow_run

    v = Variant(**config["variant"])
    cfg = v.config(ctx.shrink)
    scaling = {"scaling.threads_per_worker": cfg.scaling.threads_per_worker or ctx.threads_per_worker}
    if ctx.gpus_per_worker:
        scaling["scaling.use_gpu"] = True
    cfg = apply_overrides(cfg, scaling)
    run_name = f"{ctx.sweep_name}-v{v.id:04d}"
    values = {"preset": v.preset, "seed": cfg.seed, **v.params}
    tags = {"sweep": ctx.sweep_name, "sweep.variant": str(v.id), "sweep.hparams": json.dumps(v.hparams, sort_keys=True),
            **{k: str(values.get(k)) for k in ctx.varying}}
    run_id = start_mlflow_run(cfg, ctx.tracking_uri, run_name, tags=tags, parent_run_id=ctx.parent_run_id)
    row: dict[str, Any] = {"mlflow_run_id": run_id, "run_name": run_name}
    start = time.perf_counter()
    try:
        res = fit(cfg, output_dir=Path(ctx.output_dir) / "trials" / run_name, run_name=run_name,
                  storage_path=Path(ctx.output_dir) / "ray_train", tracking_uri=ctx.tracking_uri,
                  cpus_per_worker=ctx.cpus_per_worker, gpus_per_worker=ctx.gpus_per_worker or None,
                  mlflow_run_id=run_id)
        row.update(status="ok", error="", iteration=res["iteration"], output_dir=res["output_dir"], **res["metrics"])
    except Exception as e:  # noqa: BLE001 - a diverged (TrainingDiverged in a worker) or otherwise failed
        # run is recorded with its error, not retried, and the sweep goes on
        row.update(status="failed", error=_error_text(e))
        client = MlflowClient(ctx.tracking_uri)
        client.set_tag(run_id, "error", row["error"][:5000])
        client.set_terminated(run_id, status="FAILED")
    row["time_s"] = time.perf_counter() - start
    tune.report(row)


DRIVER_CPU = 0.01  # each Tune trial's own reservation (0 raises); STACK.md, Ray Tune


@dataclass(frozen=True)
class ResourcePlan:
    """How many trials run at once and what each trial's Train workers ask Ray for."""

    max_concurrent: int
    cpus_per_worker: float
    threads_per_worker: int
    gpus_per_worker: float


def plan_resources(cpus: float, gpus: float, workers: int, max_concurrent: int | None = None,
                   gpus_per_trial: float = 0.0) -> ResourcePlan:
    """Split ``cpus``/``gpus`` among concurrent trials so that drivers plus workers never exceed them.

    Each trial gets ``cpus / max_concurrent``: its 0.01-CPU driver plus ``workers`` Train workers
    sharing the rest (fractional CPUs are fine for Ray; torch gets the whole CPUs as threads).
    Without ``max_concurrent`` as many trials run as there are whole CPUs per ``workers`` (and
    ``gpus / gpus_per_trial`` with GPUs); a larger ``max_concurrent`` is lowered to that.
    """
    if gpus_per_trial < 0 or (gpus_per_trial and gpus + 1e-9 < gpus_per_trial):
        raise ConfigError(f"--gpus-per-trial: {gpus_per_trial} is more than the Ray cluster's {gpus:g} GPUs; "
                          f"allowed [0, {gpus:g}]")
    fit = max(1, int(cpus // workers))
    if gpus_per_trial:
        fit = max(1, min(fit, int(gpus / gpus_per_trial + 1e-9)))
    n = fit if max_concurrent is None else max(1, min(max_concurrent, fit))
    share = cpus / n
    return ResourcePlan(max_concurrent=n,
                        cpus_per_worker=math.floor((share - DRIVER_CPU) / workers * 1e4) / 1e4,
                        threads_per_worker=max(1, int(share // workers)),
                        gpus_per_worker=gpus_per_trial / workers)


def resolve_shrink(spec: SweepSpec, shrink: Shrink | None) -> Shrink:
    """The command line's ``--smoke``/``--quick``, else the space's ``smoke:``, else the full schedule."""
    return shrink or ("smoke" if spec.smoke else "full")


def _sweep_state(out: Path, spec: SweepSpec, shrink: Shrink, tracking_uri: str, experiment: str,
                 name: str | None) -> dict[str, Any]:
    """Create the parent MLflow run, or find it again when resuming into the same output dir."""
    digest = hashlib.sha256(spec.text.encode()).hexdigest()
    state_file = out / "sweep.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if (state["space_sha256"], state["shrink"]) != (digest, shrink):
            raise SpaceError(f"{spec.source}: {out} holds a different sweep ({state['source']}, {state['shrink']}); "
                             "use a new --output-dir")
        if name and name != state["name"]:
            raise SpaceError(f"--name {name!r}: {out} holds the sweep {state['name']!r}; resume it with that name "
                             "or use a new --output-dir")
        return state
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:  # same artifact rule as ray_train.start_mlflow_run: next to the sqlite store
        root = None
        if tracking_uri.startswith("sqlite:///"):
            root = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
        exp_id = client.create_experiment(experiment, artifact_location=root)
    else:
        exp_id = exp.experiment_id
    base = name or spec.name
    # the timestamp keeps trial run names (``<sweep>-v0001``) unique in a shared tracking store
    sweep_name = f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(exp_id, run_name=sweep_name, tags={"sweep": sweep_name, "sweep.space": spec.source,
                                                               "sweep.shrink": shrink})
    for key, value in {"space": spec.source, "metric": spec.metric, "mode": spec.mode, "shrink": shrink,
                       "trials": len(spec.variants), "varying": ",".join(spec.varying)}.items():
        client.log_param(run.info.run_id, f"sweep.{key}", value)
    state = {"name": base, "sweep_name": sweep_name, "parent_run_id": run.info.run_id, "source": spec.source,
             "space_sha256": digest, "shrink": shrink, "tracking_uri": tracking_uri,
             "metric": spec.metric, "mode": spec.mode}
    (out / "space.yaml").write_text(spec.text)
    state_file.write_text(json.dumps(state, indent=2))
    return state


def _trial_name(trial: Any) -> str:
    return f"v{trial.config['variant']['id']:04d}"


def run_sweep(spec: SweepSpec, *, output_dir: str | Path, shrink: Shrink | None = None,
              max_concurrent: int | None = None, gpus_per_trial: float = 0.0, tracking_uri: str | None = None,
              name: str | None = None) -> "pd.DataFrame":
    """Run every variant as a Tune trial; write ``results.parquet`` and ``table.md``; return the frame.

    Re-running with the same ``output_dir`` resumes an interrupted sweep (``Tuner.restore``):
    finished and failed trials are kept, unfinished ones run again and their Ray Train runs
    continue from their latest checkpoints. ``shrink=None`` uses the space's ``smoke:``.
    ``gpus_per_trial`` goes to the trial's Train workers (fractions pack several trials on one
    GPU). Uses the running Ray (``RAY_ADDRESS``) or starts a local one.
    """
    import ray
    from ray import tune

    from .ray_train import default_tracking_uri

    shrink = resolve_shrink(spec, shrink)
    configs = spec.configs(shrink)  # every variant validated before Ray starts
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or default_tracking_uri()
    state = _sweep_state(out, spec, shrink, tracking_uri, configs[0].tracking.experiment, name)
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    plan = plan_resources(resources.get("CPU", 1), resources.get("GPU", 0),
                          max(c.scaling.workers for c in configs), max_concurrent, gpus_per_trial)
    ctx = _TrialContext(output_dir=str(out), tracking_uri=tracking_uri, parent_run_id=state["parent_run_id"],
                        sweep_name=state["sweep_name"], shrink=shrink, varying=spec.varying,
                        cpus_per_worker=plan.cpus_per_worker, threads_per_worker=plan.threads_per_worker,
                        gpus_per_worker=plan.gpus_per_worker)
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"cpu": DRIVER_CPU})
    path = out / "tune" / "sweep"
    if tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"variant": tune.grid_search([dataclasses.asdict(v) for v in spec.variants])},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name="sweep", storage_path=str(out / "tune"), verbose=1),
        )
    grid = tuner.fit()
    reported = {r.config["variant"]["id"]: (r.metrics or {}, r.error) for r in grid}
    df = results_frame(spec, configs, reported)
    tables = aggregate(df, metric=spec.metric, mode=spec.mode)
    write_results(df, tables, out)
    _finish_parent(tracking_uri, state["parent_run_id"], out, df, tables)
    return df


def _finish_parent(tracking_uri: str, run_id: str, out: Path, df: "pd.DataFrame", tables: "Tables") -> None:
    """The parent run holds the aggregate: results.parquet, table.md, the space, and the table's cells."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for name in ("results.parquet", "table.md", "space.yaml"):
        client.log_artifact(run_id, str(out / name))
    client.log_metric(run_id, "sweep/trials_ok", float((df["status"] == "ok").sum()))
    client.log_metric(run_id, "sweep/trials_failed", float((df["status"] != "ok").sum()))
    for r in tables.summary.itertuples():  # e.g. table/8gaussians/mog-ip-lc/hist_kl_mean
        for stat in ("mean", "se"):
            if not math.isnan(getattr(r, stat)):
                client.log_metric(run_id, f"table/{r.dataset}/{r.configuration}/{r.metric}_{stat}", getattr(r, stat))
    client.set_terminated(run_id)


def results_frame(spec: SweepSpec, configs: list[ExperimentConfig],
                  reported: dict[int, tuple[dict[str, Any], BaseException | None]]) -> "pd.DataFrame":
    """One row per variant: identity, status/error, final metrics, and the flattened config."""
    import pandas as pd

    rows = []
    for v, cfg in zip(spec.variants, configs):
        metrics, error = reported.get(v.id, ({}, None))
        status = metrics.get("status") or "failed"
        err = metrics.get("error") or (_error_text(error) if error is not None else "" if status == "ok"
                                       else "trial did not report (interrupted?)")
        dataset, _, configuration = v.preset.partition("/")
        row = {"variant": v.id, "preset": v.preset, "dataset": dataset, "configuration": configuration,
               "seed": cfg.seed, "hparams": json.dumps(v.hparams, sort_keys=True), "status": status, "error": err}
        row.update({m: float(metrics.get(m, math.nan)) for m in FINAL_METRICS})
        row.update({k: metrics.get(k) for k in ("time_s", "iteration", "mlflow_run_id", "run_name", "output_dir")})
        row.update({f"config.{k}": json.dumps(x) if isinstance(x, list) else x
                    for k, x in flatten(to_dict(cfg)).items()})
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Aggregation: best hyperparameters per (dataset, configuration), mean ± s.e. over seeds
# --------------------------------------------------------------------------------------------

TABLE_COLUMNS = {"vae": "VAE", "sintro": "SG", "mog-fixed": "fixed", "mog-ip": "IP", "mog-fixed-lc": "fixed LC",
                 "mog-ip-lc": "IP LC"}  # SPEC §8 column order
TABLE_METRICS = {"gnelbo_x1e7": "gnELBO", "hist_kl": "KL", "hist_jsd": "JSD"}
# Paper Table 1 (mean, s.e. over 5 seeds), columns as TABLE_COLUMNS. Means: SPEC §8; s.e.: the paper's table.
PAPER_TABLE1 = {
    ("8gaussians", "gnelbo_x1e7"): [(7.48, .03), (.51, .07), (3.62, .31), (4.8, .15), (.25, .02), (.26, .04)],
    ("8gaussians", "hist_kl"): [(6.94, .36), (1.23, .05), (4.46, 2.63), (2.36, .3), (1.94, .33), (2.24, .71)],
    ("8gaussians", "hist_jsd"): [(17.41, .12), (1.01, .08), (1.77, .7), (1.79, .09), (1.13, .12), (1.08, .07)],
    ("2spirals", "gnelbo_x1e7"): [(6.23, .01), (6.41, .27), (6.41, .43), (6.04, .36), (5.81, .4), (6.47, .28)],
    ("2spirals", "hist_kl"): [(10.18, .16), (9.5, .55), (8.61, .35), (8.31, .2), (9.45, .56), (8.02, .11)],
    ("2spirals", "hist_jsd"): [(4.94, .11), (4.21, .22), (3.76, .04), (3.53, .04), (3.89, .08), (3.64, .07)],
    ("checkerboard", "gnelbo_x1e7"): [(8.62, .05), (7.21, .05), (8, .03), (7.66, .13), (7.81, .09), (7.67, .06)],
    ("checkerboard", "hist_kl"): [(20.79, .08), (19.62, .25), (18.58, .22), (18.72, .27), (19.04, .65), (17.7, .11)],
    ("checkerboard", "hist_jsd"): [(9.97, .06), (8.87, .07), (8.65, .04), (8.71, .08), (8.9, .22), (8.46, .07)],
    ("rings", "gnelbo_x1e7"): [(6.37, .04), (6.03, .05), (6.73, .18), (6.86, .16), (6.4, .34), (6.65, .18)],
    ("rings", "hist_kl"): [(13.3, .28), (9.99, .27), (10.07, .37), (9.77, .31), (11.31, .56), (10.31, 1.03)],
    ("rings", "hist_jsd"): [(7.4, .08), (4.05, .07), (4.13, .08), (4.12, .07), (5.19, .33), (4.33, .33)],
}


@dataclass
class Tables:
    selected: "pd.DataFrame"  # per (dataset, configuration): hparams, score, seeds, failed
    summary: "pd.DataFrame"  # per (dataset, configuration, metric): mean, se, n, paper_mean, paper_se
    markdown: str


def select_best(df: "pd.DataFrame", metric: str = "hist_kl", mode: str = "min") -> "pd.DataFrame":
    """Per (dataset, configuration), the hparams whose completed seeds have the best mean ``metric``."""
    import pandas as pd

    ok = df[(df["status"] == "ok") & df[metric].notna()]
    cols = ["dataset", "configuration", "hparams"]
    groups = ok.groupby(cols, sort=False).agg(score=(metric, "mean"), seeds=(metric, "size"),
                                              first=("variant", "min")).reset_index()
    failed = df[df["status"] != "ok"].groupby(["dataset", "configuration"]).size().rename("failed")
    groups = groups.sort_values(["score", "first"], ascending=[mode == "min", True], kind="stable")
    best = groups.drop_duplicates(["dataset", "configuration"]).drop(columns="first")
    best = best.merge(failed.reset_index(), on=["dataset", "configuration"], how="left")
    best["failed"] = best["failed"].fillna(0).astype(int)
    return best.sort_values(["dataset", "configuration"]).reset_index(drop=True) if len(best) else pd.DataFrame(
        columns=["dataset", "configuration", "hparams", "score", "seeds", "failed"])


def summarize(df: "pd.DataFrame", selected: "pd.DataFrame") -> "pd.DataFrame":
    """Mean ± standard error (``std(ddof=1) / sqrt(n)``; NaN for n = 1) of the selected trials."""
    import pandas as pd

    rows = []
    for sel in selected.itertuples():
        runs = df[(df["dataset"] == sel.dataset) & (df["configuration"] == sel.configuration)
                  & (df["hparams"] == sel.hparams) & (df["status"] == "ok")]
        for metric in FINAL_METRICS:
            values = runs[metric].dropna()
            n = len(values)
            if n == 0:
                continue
            se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
            paper = PAPER_TABLE1.get((sel.dataset, metric))
            col = list(TABLE_COLUMNS).index(sel.configuration) if sel.configuration in TABLE_COLUMNS else None
            p_mean, p_se = paper[col] if paper and col is not None else (math.nan, math.nan)
            rows.append({"dataset": sel.dataset, "configuration": sel.configuration, "metric": metric,
                         "mean": float(values.mean()), "se": se, "n": n, "paper_mean": p_mean, "paper_se": p_se})
    return pd.DataFrame(rows, columns=["dataset", "configuration", "metric", "mean", "se", "n", "paper_mean",
                                       "paper_se"])


def _cell(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.2f}" if math.isnan(se) else f"{mean:.2f} ± {se:.2f}"


def render_markdown(df: "pd.DataFrame", selected: "pd.DataFrame", summary: "pd.DataFrame", metric: str,
                    mode: str = "min") -> str:
    """Table 1 layout (rows dataset x metric), ours with the paper's in parentheses, then the selection."""
    lines = ["# Sweep results", "",
             f"{len(df)} trials: {(df['status'] == 'ok').sum()} completed, {(df['status'] != 'ok').sum()} failed. "
             f"Selection: per (dataset, configuration) the hyperparameters with the {'lowest' if mode == 'min' else 'highest'} mean "
             f"`{metric}`; cells are mean ± s.e. over seeds (s.e. = std/sqrt(n), blank for n = 1); "
             "paper (Table 1, SPEC §8) in parentheses. Lower is better; gnELBO x 1e7.", "",
             "| dataset | metric | " + " | ".join(TABLE_COLUMNS.values()) + " |",
             "| --- | --- |" + " --- |" * len(TABLE_COLUMNS)]
    by_key = {(r.dataset, r.configuration, r.metric): r for r in summary.itertuples()}
    for dataset in sorted(df["dataset"].unique()):
        for m, label in TABLE_METRICS.items():
            paper = PAPER_TABLE1.get((dataset, m))
            cells = []
            for i, conf in enumerate(TABLE_COLUMNS):
                r = by_key.get((dataset, conf, m))
                ours = _cell(r.mean, r.se) if r is not None else "—"
                cells.append(f"{ours} ({_cell(*paper[i])})" if paper else ours)
            lines.append(f"| {dataset} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Selected hyperparameters", "",
              f"| dataset | configuration | hyperparameters | mean {metric} | seeds | failed trials |",
              "| --- | --- | --- | --- | --- | --- |"]
    for s in selected.itertuples():
        lines.append(f"| {s.dataset} | {s.configuration} | `{s.hparams}` | {s.score:.3f} | {s.seeds} | {s.failed} |")
    failed = df[df["status"] != "ok"]
    if len(failed):
        lines += ["", "## Failed trials", "", "| variant | preset | hyperparameters | seed | error |",
                  "| --- | --- | --- | --- | --- |"]
        for f in failed.head(50).itertuples():
            error = str(f.error).replace("|", "/").replace("\n", " ")[:200]
            lines.append(f"| {f.variant} | {f.preset} | `{f.hparams}` | {f.seed} | {error} |")
    return "\n".join(lines) + "\n"


def aggregate(df: "pd.DataFrame", metric: str = "hist_kl", mode: str = "min") -> Tables:
    """Select (SPEC §6.4) and summarise a results frame; returns the tables and their Markdown."""
    selected = select_best(df, metric, mode)
    summary = summarize(df, selected)
    return Tables(selected, summary, render_markdown(df, selected, summary, metric, mode))


def write_results(df: "pd.DataFrame", tables: Tables, out: str | Path) -> None:
    """``out/results.parquet`` (every trial) and ``out/table.md``."""
    out = Path(out)
    df.to_parquet(out / "results.parquet", engine="pyarrow", index=False)
    (out / "table.md").write_text(tables.markdown)
