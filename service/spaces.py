"""Search spaces as plain YAML data (``tune_spaces/*.yaml``; SPEC §6.4, §7.3) -> validated trial variants.

A space file holds:

- ``preset:`` one preset name, or ``presets:`` a list of names (a grid dimension) or a mapping
  ``name -> fixed overrides`` (nested like the config; e.g. the paper's selected betas per preset);
- ``metric:`` / ``mode:`` the selection metric (``hist_kl`` / ``min``, SPEC §6.4; images: an FID name of
  ``service.tables.IMAGE_METRICS``, SPEC §7.3), or ``select:`` ``{metric, mode, where}`` where
  ``where: {mode_purity: {min: 0.9}}`` keeps only settings whose mean ``mode_purity`` is >= 0.9
  (when none does, the unconstrained pick is used and that is recorded);
- ``seeds:`` optional list, a grid dimension (innermost);
- ``smoke:`` default shrink (``presets.smoke``) when the command line does not say;
- ``requires:`` optional feature the space needs (``images``): presets that do not exist yet make
  ``load_space`` raise ``SpaceUnavailable`` ("fmnist is not available yet");
- ``param_space:`` mirroring ``ExperimentConfig``'s nesting, with ``{grid_search: [...]}`` leaves
  (plain values are constants) and, with ``search: {type: random, num_samples: N, seed: S}``,
  sampler leaves ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{choice: [...]}`` (drawn
  here, seeded, 6 significant digits: every variant is known and validated before Ray starts).
  Special key ``objective.beta_neg_factor: k`` sets ``objective.beta_neg = k * objective.beta_kl``
  (the paper's grid ``beta_neg = k * beta_kl``);
- ``settings:`` optional list of explicit points, each a mapping like ``param_space`` with plain values
  and the same keys in every point (e.g. the picks of an earlier selection to re-run); a grid
  dimension (outside ``param_space``'s grid), its keys count as searched;
- ``scheduler:`` ``{type: asha, grace_period, reduction_factor, max_t}`` (early stopping on the
  intermediate evaluations every ``schedule.eval_every`` iterations) or ``{type: fifo}``;
- ``trial_runner:`` ``auto`` (default: a trial of one Train worker trains in the Tune trial's own
  process, others through Ray Train) or ``ray_train`` (every trial a Ray Train run);
- ``stages:`` a staged protocol: stage 1 runs the space; every later stage re-runs the ``top_k``
  settings of the previous one (by ``select``), with its own ``shrink``, constant ``param_space``
  overrides, ``seeds`` and ``scheduler``.

``load_space`` expands the product presets x samples x settings x grid x seeds itself and validates
every variant's config, for every stage, before Ray starts; errors name the file, the dotted key
and the allowed values. No Ray here: ``service.tuning`` turns the variants into Tune trials. The
selection between stages (``service.selection``) is plain pandas.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ConfigError, ExperimentConfig, apply_overrides
from .presets import PRESETS, quick, smoke
from .selection import Selection
from .tables import FINAL_METRICS, IMAGE_METRICS
from .tracking import GNELBO_METRICS

Shrink = Literal["full", "quick", "smoke"]
SHRINKS = ("full", "quick", "smoke")
TOP_KEYS = ("preset", "presets", "metric", "mode", "seeds", "smoke", "requires", "param_space", "settings",
            "search", "scheduler", "select", "stages", "trial_runner")
# How a trial trains: ``auto`` runs a 1-worker trial in the Tune trial's own process (service.sweep_in_trial)
# and any other through Ray Train; ``ray_train`` runs every trial through Ray Train.
TRIAL_RUNNERS = ("auto", "ray_train")
FACTOR_KEY = "objective.beta_neg_factor"  # beta_neg = factor * beta_kl (SPEC §6.4)
SAMPLERS = ("loguniform", "uniform", "choice")
SEARCH_TYPES = ("grid", "random")
SEARCH_KEYS = ("type", "num_samples", "seed")
SCHEDULERS = ("asha", "fifo")
SCHEDULER_KEYS = {"asha": ("type", "grace_period", "reduction_factor", "max_t"), "fifo": ("type",)}
SELECT_KEYS = ("metric", "mode", "where")
STAGE_KEYS = ("name", "shrink", "param_space", "scheduler", "top_k", "seeds")
# Metrics of the 2D evaluation that only labelled data with a mixture prior reports (service.metrics.modes)
OPTIONAL_METRICS = ("mode_purity", "modes_covered", "mode_share_tv", "mode_offset_max")
SAMPLE_DIGITS = 6  # sampled values are rounded to this many significant digits (readable, hashable)


class SpaceError(ConfigError):
    """A space file is malformed; the message names the file and the dotted key."""


class SpaceUnavailable(SpaceError):
    """The space needs a feature (``requires:``) that the service does not have yet."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e6`` and ``2e-4`` as floats (plain YAML 1.1 wants ``1.0e+6``)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"), list("-+0123456789."))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# The parts of a space
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampler:
    """A random-search leaf: ``loguniform`` / ``uniform`` over ``[lo, hi]``, or ``choice`` of values."""

    kind: str
    args: tuple

    def draw(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return self.args[rng.randrange(len(self.args))]
        lo, hi = self.args
        x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if self.kind == "loguniform" else rng.uniform(lo, hi)
        return float(f"{x:.{SAMPLE_DIGITS}g}")


@dataclass(frozen=True)
class Search:
    type: str = "grid"  # grid: the cartesian product; random: num_samples draws x the grid_search leaves
    num_samples: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Scheduler:
    """Tune trial scheduler; its time unit is the training iteration (``schedule.eval_every`` reports)."""

    type: str  # "asha" | "fifo"
    grace_period: int | None = None  # None: the trials' first evaluation after the warm-up (first_rung)
    reduction_factor: float = 3
    max_t: int | None = None  # None: the trials' schedule.iterations

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}



@dataclass(frozen=True)
class Stage:
    """One stage of a protocol (a plain space is one stage named ``sweep``)."""

    index: int  # 1-based
    name: str
    shrink: Shrink | None = None  # None: the command line's, else the space's smoke:, else full
    overrides: dict[str, Any] = field(default_factory=dict)  # constants on top of every variant
    scheduler: Scheduler | None = None
    top_k: int | None = None  # stages after the first: settings taken from the previous stage
    seeds: tuple[int, ...] | None = None  # stages after the first: None keeps the candidates' seeds

    @property
    def key(self) -> str:
        """``stages[i]`` as written in the file (0-based), for error messages."""
        return f"stages[{self.index - 1}]" if self.name != "sweep" else ""


@dataclass(frozen=True)
class Variant:
    """One trial: a preset, a seed and resolved dotted overrides (``params`` as written in the space)."""

    id: int
    preset: str
    params: dict[str, Any]
    overrides: dict[str, Any]

    def config(self, shrink: Shrink = "full", extra: dict[str, Any] | None = None) -> ExperimentConfig:
        """The validated config; ``extra`` (a stage's constants) goes on top of the overrides."""
        base = PRESETS[self.preset]()
        base = smoke(base) if shrink == "smoke" else quick(base) if shrink == "quick" else base
        return apply_overrides(base, {**self.overrides, **(extra or {})})

    @property
    def hparams(self) -> dict[str, Any]:
        """The overrides that define the hyperparameter setting (everything but the seed)."""
        return {k: self.overrides[k] for k in sorted(self.overrides) if k != "seed"}

    def columns(self, seed: int) -> dict[str, Any]:
        """What Tune shows as this trial's parameters: preset, seed, the searched keys as written, and
        ``objective.beta_neg`` where a factor set it."""
        derived = {"objective.beta_neg": self.overrides["objective.beta_neg"]} if FACTOR_KEY in self.params else {}
        return {"preset": self.preset, "seed": seed, **self.params, **derived}


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
    search: Search = Search()
    scheduler: Scheduler | None = None  # a plain space's; a staged space has one per stage
    select: Selection = Selection()
    stages: tuple[Stage, ...] = ()  # empty: a plain space (one stage)
    searched: tuple[str, ...] = ()  # the dotted keys of settings:, and of param_space's grid_search and sampler leaves
    trial_runner: str = "auto"  # TRIAL_RUNNERS

    def configs(self, shrink: Shrink = "full", stage: Stage | None = None) -> list[ExperimentConfig]:
        """Every variant's validated config; errors name the file, the variant and the dotted key."""
        out = []
        extra = stage.overrides if stage is not None else None
        where = f" {stage.key} ({stage.name})" if stage is not None and stage.key else ""
        for v in self.variants:
            try:
                out.append(v.config(shrink, extra))
            except ConfigError as e:
                raise SpaceError(f"{self.source}:{where} variant {v.id} {v.preset} {v.params} ({shrink}): "
                                 f"{e}") from None
        return out

    @property
    def is_staged(self) -> bool:
        return bool(self.stages)

    def default_shrink(self) -> Shrink:
        return "smoke" if self.smoke else "full"

    def plan(self, shrink: Shrink | None = None) -> list[tuple[Stage, Shrink]]:
        """The stages to run with their shrink: the command line's ``shrink`` wins, then the stage's,
        then the space's ``smoke:``. A plain space is one stage named ``sweep``."""
        stages = self.stages or (Stage(1, "sweep", scheduler=self.scheduler),)
        return [(st, shrink or st.shrink or self.default_shrink()) for st in stages]

    def validate(self, shrink: Shrink | None = None) -> None:
        """Every stage's configs (for a later stage: every variant as a possible candidate, with its
        seeds) and every scheduler against the trials it schedules; raises ``SpaceError``."""
        for stage, sh in self.plan(shrink):
            configs = self.configs(sh, stage)
            if stage.seeds and stage.index > 1:  # candidates run with the stage's seeds
                Variant(0, self.variants[0].preset, self.variants[0].params,
                        {**self.variants[0].overrides, "seed": stage.seeds[0]}).config(sh, stage.overrides)
            if stage.scheduler is not None:
                _check_scheduler(stage, sh, configs, self)


def train_command(preset: str, hparams: str | dict[str, Any], searched: tuple[str, ...] | list[str]) -> str:
    """The ``jobs.train`` command line that trains a selected setting: its preset and the searched keys as
    ``--set`` overrides (``objective.beta_neg`` resolved where a factor set it)."""
    hparams = json.loads(hparams) if isinstance(hparams, str) else hparams
    sets = "".join(f" --set {k}={format(v, '.6g') if isinstance(v, float) else v}" for k, v in sorted(hparams.items())
                   if k in searched or (k == "objective.beta_neg" and FACTOR_KEY in searched))
    return f"python -m jobs.train --preset {preset}{sets}"


def first_rung(schedule: Any) -> int:
    """The first evaluation after the warm-up: the default ASHA grace period (iterations)."""
    return (schedule.warmup // schedule.eval_every + 1) * schedule.eval_every


def _check_scheduler(stage: Stage, shrink: Shrink, configs: list[ExperimentConfig], spec: SweepSpec) -> None:
    """A scheduler needs intermediate reports (``schedule.eval_every`` < iterations, counted in iterations)."""
    sched, key = stage.scheduler, f"{stage.key}.scheduler" if stage.key else "scheduler"
    if sched.type == "fifo":
        return
    for v, cfg in zip(spec.variants, configs):
        s = cfg.schedule
        what = f"variant {v.id} {v.preset} ({shrink})"
        if s.unit != "iterations":
            raise SpaceError(f"{spec.source}: {key}: {sched.type} counts training iterations, but {what} counts "
                             f"schedule.unit={s.unit!r}; schedulers are for iteration schedules (the 2D presets)")
        if not 0 < s.eval_every < s.iterations:
            raise SpaceError(
                f"{spec.source}: {key}: {sched.type} stops trials on their intermediate evaluations, but {what} "
                f"makes none: schedule.eval_every is {s.eval_every} with schedule.iterations {s.iterations}; "
                f"allowed eval_every in [1, {s.iterations - 1}] (set {stage.key + '.' if stage.key else ''}"
                f"param_space.schedule.eval_every), or drop the scheduler")
        ranked = {spec.select.metric, *(name for name, _, _ in spec.select.where)}
        if (by := ranked & set(GNELBO_METRICS)) and not cfg.eval.intermediate_gnelbo:
            raise SpaceError(f"{spec.source}: {key}: {sched.type} ranks trials by {sorted(by)[0]} on their "
                             f"intermediate evaluations, but {what} sets eval.intermediate_gnelbo false; allowed: true "
                             f"(or select by another metric)")
        if sched.grace_period is not None and sched.grace_period >= s.iterations:
            raise SpaceError(f"{spec.source}: {key}.grace_period: {sched.grace_period} is not shorter than {what}'s "
                             f"schedule.iterations {s.iterations}; allowed [1, {s.iterations - 1}]")
        if sched.grace_period is not None and sched.grace_period <= s.warmup:
            # the warm-up trains a plain VAE: objective.beta_neg (and the adversarial game) play no part in it,
            # so a rung there stops trials on what the settings being searched do not yet affect
            raise SpaceError(f"{spec.source}: {key}.grace_period: {sched.grace_period} falls within {what}'s warm-up "
                             f"(schedule.warmup {s.warmup}), where objective.beta_neg and the adversarial game play "
                             f"no part; allowed [{s.warmup + 1}, {s.iterations - 1}] (leave it out for the first "
                             f"evaluation after the warm-up, iteration {first_rung(s)})")
        if sched.grace_period is None and first_rung(s) >= s.iterations:
            raise SpaceError(f"{spec.source}: {key}: {what} makes no evaluation between the end of its warm-up "
                             f"(schedule.warmup {s.warmup}) and its end (schedule.iterations {s.iterations}) with "
                             f"schedule.eval_every {s.eval_every}; lower eval_every or drop the scheduler")
        if sched.max_t is not None and sched.max_t < s.iterations:
            raise SpaceError(f"{spec.source}: {key}.max_t: {sched.max_t} would stop every trial before its schedule "
                             f"ends ({what}: schedule.iterations {s.iterations}); allowed integers >= {s.iterations} "
                             "(leave it out for schedule.iterations)")


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------

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


def _sampler(value: dict, where: str) -> Sampler:
    (kind, args), = value.items()
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SpaceError(f"{where}: choice must be a non-empty list, got {args!r}")
        return Sampler(kind, tuple(args))
    if not (isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args) and args[0] < args[1]):
        raise SpaceError(f"{where}: {kind} needs [lo, hi] with numbers lo < hi, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise SpaceError(f"{where}: loguniform needs lo > 0, got {args!r}")
    return Sampler(kind, (float(args[0]), float(args[1])))


def _flatten_space(node: Any, prefix: str, source: str, schema: dict[str, Any], what: str,
                   search: str = "grid") -> dict[str, list | Sampler]:
    """``param_space`` (or a preset's overrides) -> ``{dotted: [values] | Sampler}``; constants are 1-lists."""
    if not isinstance(node, dict):
        raise SpaceError(f"{source}: {what}{'.' + prefix[:-1] if prefix else ''}: expected a mapping, got {node!r}")
    out: dict[str, list | Sampler] = {}
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
            out.update(_flatten_space(value, path + ".", source, schema, what, search))
        elif isinstance(value, dict):
            kinds = ("grid_search", *SAMPLERS)
            if len(value) != 1 or next(iter(value)) not in kinds:
                raise SpaceError(f"{source}: {what}.{path}: unsupported search {sorted(value)}; allowed "
                                 f"{{grid_search: [...]}}, {{loguniform: [lo, hi]}}, {{uniform: [lo, hi]}}, "
                                 f"{{choice: [...]}} or a plain value")
            if "grid_search" in value:
                grid = value["grid_search"]
                if not isinstance(grid, list) or not grid:
                    raise SpaceError(f"{source}: {what}.{path}: grid_search must be a non-empty list, got {grid!r}")
                out[path] = grid
            elif search != "random":
                kind = next(iter(value))
                raise SpaceError(f"{source}: {what}.{path}: {kind} samples values, which needs "
                                 f"search: {{type: random, num_samples: N}}; with search: {search} use "
                                 f"{{grid_search: [...]}}")
            else:
                out[path] = _sampler(value, f"{source}: {what}.{path}")
        else:
            out[path] = [value]
    for k in (FACTOR_KEY,):
        factor = out.get(k, [])
        values = factor.args if isinstance(factor, Sampler) else factor
        if isinstance(factor, Sampler) and factor.kind != "choice":
            values = [factor.args[0]]
        for v in values:
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


def _search(raw: Any, source: str) -> Search:
    if raw is None or raw == "grid":
        return Search()
    if raw == "random":
        raise SpaceError(f"{source}: search: random needs num_samples: write search: {{type: random, num_samples: N}}")
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: search: expected one of {list(SEARCH_TYPES)} or a mapping with keys "
                         f"{list(SEARCH_KEYS)}, got {raw!r}")
    for k in raw:
        if k not in SEARCH_KEYS:
            raise SpaceError(f"{source}: search.{k}: unknown key; known keys are {list(SEARCH_KEYS)}")
    kind = raw.get("type", "grid")
    if kind not in SEARCH_TYPES:
        raise SpaceError(f"{source}: search.type: {kind!r} is not one of {list(SEARCH_TYPES)}")
    if kind == "grid":
        if set(raw) - {"type"}:
            raise SpaceError(f"{source}: search.{sorted(set(raw) - {'type'})[0]}: only with type: random")
        return Search()
    n, seed = raw.get("num_samples"), raw.get("seed", 0)
    if not _is_int(n) or n < 1:
        raise SpaceError(f"{source}: search.num_samples: {n!r} is invalid; allowed integers >= 1")
    if not _is_int(seed):
        raise SpaceError(f"{source}: search.seed: {seed!r} is invalid; allowed integers")
    return Search("random", n, seed)


def _scheduler(raw: Any, source: str, key: str) -> Scheduler | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: {key}: expected a mapping like {{type: asha, grace_period: 1000, "
                         f"reduction_factor: 3}}, got {raw!r}")
    kind = raw.get("type")
    if kind not in SCHEDULERS:
        raise SpaceError(f"{source}: {key}.type: {kind!r} is not one of {list(SCHEDULERS)}")
    for k in raw:
        if k not in SCHEDULER_KEYS[kind]:
            raise SpaceError(f"{source}: {key}.{k}: unknown key for {kind}; known keys are "
                             f"{list(SCHEDULER_KEYS[kind])}")
    grace, rf, max_t = raw.get("grace_period"), raw.get("reduction_factor", 3), raw.get("max_t")
    if grace is not None and (not _is_int(grace) or grace < 1):
        raise SpaceError(f"{source}: {key}.grace_period: {grace!r} is invalid; allowed integers >= 1 (iterations)")
    if not _is_number(rf) or rf <= 1:
        raise SpaceError(f"{source}: {key}.reduction_factor: {rf!r} is invalid; allowed numbers > 1")
    if max_t is not None and (not _is_int(max_t) or max_t < (grace or 1)):
        raise SpaceError(f"{source}: {key}.max_t: {max_t!r} is invalid; allowed integers >= grace_period "
                         f"({grace or 1}) (iterations)")
    return Scheduler(kind, grace, rf, max_t)


def allowed_metrics(images: set[bool]) -> tuple[str, ...]:
    """Selection metrics for 2D (``False``) and/or image (``True``) presets."""
    toy = tuple(dict.fromkeys(FINAL_METRICS + OPTIONAL_METRICS))
    return (toy if False in images else ()) + (IMAGE_METRICS if True in images else ())


def _selection(data: dict[str, Any], source: str, allowed: tuple[str, ...]) -> Selection:
    raw = data.get("select")
    if raw is not None and not isinstance(raw, dict):
        raise SpaceError(f"{source}: select: expected a mapping with keys {list(SELECT_KEYS)}, got {raw!r}")
    raw = raw or {}
    for k in raw:
        if k not in SELECT_KEYS:
            raise SpaceError(f"{source}: select.{k}: unknown key; known keys are {list(SELECT_KEYS)}")
    for k in ("metric", "mode"):
        if k in raw and k in data and raw[k] != data[k]:
            raise SpaceError(f"{source}: select.{k}: {raw[k]!r} contradicts {k}: {data[k]!r}; give one of them")
    metric = raw.get("metric", data.get("metric", "hist_kl"))
    mode = raw.get("mode", data.get("mode", "min"))
    key = "select." if "select" in data else ""
    if metric not in allowed:
        raise SpaceError(f"{source}: {key}metric: {metric!r} is not one of {list(allowed)}")
    if mode not in ("min", "max"):
        raise SpaceError(f"{source}: {key}mode: {mode!r} is not one of ['min', 'max']")
    where = raw.get("where") or {}
    if not isinstance(where, dict):
        raise SpaceError(f"{source}: select.where: expected a mapping like {{mode_purity: {{min: 0.9}}}}, "
                         f"got {where!r}")
    bounds = []
    for name, b in where.items():
        if name not in allowed:
            raise SpaceError(f"{source}: select.where.{name}: unknown metric; allowed {list(allowed)}")
        if not isinstance(b, dict) or not b or set(b) - {"min", "max"}:
            raise SpaceError(f"{source}: select.where.{name}: expected {{min: x}}, {{max: y}} or both, got {b!r}")
        for k, v in b.items():
            if not _is_number(v):
                raise SpaceError(f"{source}: select.where.{name}.{k}: {v!r} is not a number")
        bounds.append((name, b.get("min"), b.get("max")))
    return Selection(metric, mode, tuple(bounds))


def _seeds(raw: Any, source: str, key: str) -> tuple[int, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(_is_int(s) for s in raw):
        raise SpaceError(f"{source}: {key}: expected a non-empty list of integers, got {raw!r}")
    return tuple(raw)


def _stages(raw: Any, source: str, schema: dict[str, Any], searched: set[str]) -> tuple[Stage, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise SpaceError(f"{source}: stages: expected a non-empty list of stages, each a mapping with keys "
                         f"{list(STAGE_KEYS)}")
    out: list[Stage] = []
    for i, st in enumerate(raw):
        key = f"stages[{i}]"
        if not isinstance(st, dict):
            raise SpaceError(f"{source}: {key}: expected a mapping with keys {list(STAGE_KEYS)}, got {st!r}")
        for k in st:
            if k not in STAGE_KEYS:
                raise SpaceError(f"{source}: {key}.{k}: unknown key; known keys are {list(STAGE_KEYS)}")
        name = st.get("name", f"stage{i + 1}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", name) or name == "sweep":
            raise SpaceError(f"{source}: {key}.name: {name!r} is invalid; allowed 1-40 letters, digits, '_' or '-' "
                             "(not 'sweep')")
        if name in {s.name for s in out}:
            raise SpaceError(f"{source}: {key}.name: {name!r} is used twice; stage names must differ")
        shrink = st.get("shrink")
        if shrink is not None and shrink not in SHRINKS:
            raise SpaceError(f"{source}: {key}.shrink: {shrink!r} is not one of {list(SHRINKS)}")
        flat = _flatten_space(st.get("param_space") or {}, "", source, schema, f"{key}.param_space")
        for k, v in flat.items():
            if len(v) != 1:
                raise SpaceError(f"{source}: {key}.param_space.{k}: a stage sets constants; searches belong in the "
                                 "top-level param_space (stage 1) and later stages re-run the best settings")
            if k in searched or k == FACTOR_KEY or k == "seed":
                raise SpaceError(f"{source}: {key}.param_space.{k}: is searched (or the seed); a stage may only "
                                 f"set other keys (use {key}.seeds for seeds)")
        top_k = st.get("top_k")
        if i == 0 and top_k is not None:
            raise SpaceError(f"{source}: {key}.top_k: the first stage runs the whole space; top_k is for later stages")
        if i > 0:
            top_k = 1 if top_k is None else top_k
            if not _is_int(top_k) or top_k < 1:
                raise SpaceError(f"{source}: {key}.top_k: {top_k!r} is invalid; allowed integers >= 1")
        seeds = _seeds(st.get("seeds"), source, f"{key}.seeds")
        if i == 0 and seeds is not None:
            raise SpaceError(f"{source}: {key}.seeds: the first stage's seeds are the top-level seeds:")
        out.append(Stage(i + 1, name, shrink, {k: v[0] for k, v in flat.items()},
                         _scheduler(st.get("scheduler"), source, f"{key}.scheduler"), top_k, seeds))
    return tuple(out)


def _settings(raw: Any, source: str, schema: dict[str, Any], flat: dict[str, list | Sampler]) -> list[dict[str, Any]]:
    """``settings:`` -> explicit points ``[{dotted: value}]`` (``[{}]`` when absent); plain values, the
    same keys in every point, none of them in ``param_space`` or the seed."""
    if raw is None:
        return [{}]
    if not isinstance(raw, list) or not raw:
        raise SpaceError(f"{source}: settings: expected a non-empty list of mappings (each like param_space, "
                         f"with plain values), got {raw!r}")
    points: list[dict[str, Any]] = []
    for i, node in enumerate(raw):
        key = f"settings[{i}]"
        if not isinstance(node, dict) or not node:
            raise SpaceError(f"{source}: {key}: expected a non-empty mapping like param_space, got {node!r}")
        point = _flatten_space(node, "", source, schema, key)  # search "grid": no sampler leaves
        for k, v in point.items():
            if len(v) != 1:
                raise SpaceError(f"{source}: {key}.{k}: a setting holds plain values; searches belong in param_space")
            if k == "seed":
                raise SpaceError(f"{source}: {key}.seed: give seeds in the top-level seeds: list")
            if k in flat:
                raise SpaceError(f"{source}: {key}.{k}: also set in param_space; give each key in one place")
        if points and set(point) != set(points[0]):
            raise SpaceError(f"{source}: {key}: keys {sorted(point)} differ from settings[0]'s "
                             f"{sorted(points[0])}; every setting names the same keys")
        points.append({k: v[0] for k, v in point.items()})
    return points


def _expand(presets: list[tuple[str, dict]], flat: dict[str, list | Sampler], seeds: tuple[int, ...] | None,
            search: Search, source: str, points: list[dict[str, Any]]) -> list[Variant]:
    """presets x samples x settings x grid x seeds, in that order (seeds innermost); samples are shared
    by presets."""
    grid = {k: v for k, v in flat.items() if isinstance(v, list)}
    samplers = {k: v for k, v in flat.items() if isinstance(v, Sampler)}
    rng = random.Random(search.seed)
    draws = [{k: s.draw(rng) for k, s in samplers.items()} for _ in range(search.num_samples)] if samplers else [{}]
    variants = []
    for (preset, fixed), draw, point in itertools.product(presets, draws, points):
        for combo in itertools.product(*grid.values()):
            chosen = {**dict(zip(grid, combo)), **draw}
            params = {**point, **{k: chosen[k] for k in flat}}  # in the file's order
            for seed in seeds or [None]:
                overrides = _resolve(params, fixed, preset, source)
                if seed is not None:
                    overrides["seed"] = seed
                variants.append(Variant(len(variants), preset, params, overrides))
    return variants


def spec_from_dict(data: Any, source: str, text: str = "") -> SweepSpec:
    """Validate a parsed space and expand it (presets x samples x grid x seeds); see the module docstring."""
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: expected a mapping with keys {list(TOP_KEYS)}")
    for key in data:
        if key not in TOP_KEYS:
            raise SpaceError(f"{source}: {key}: unknown key; known keys are {list(TOP_KEYS)}")
    schema = _schema()
    requires = data.get("requires")
    search = _search(data.get("search"), source)
    flat = _flatten_space(data.get("param_space") or {}, "", source, schema, "param_space", search.type)
    if search.type == "random" and not any(isinstance(v, Sampler) for v in flat.values()):
        raise SpaceError(f"{source}: search: random needs at least one sampler leaf in param_space "
                         f"({', '.join(SAMPLERS)}); without one use search: grid")
    presets = _presets(data, source, schema)
    _check_presets(presets, requires, source)
    images = {PRESETS[name]().data.is_image for name, _ in presets}
    select = _selection(data, source, allowed_metrics(images))
    is_smoke = data.get("smoke", False)
    if not isinstance(is_smoke, bool):
        raise SpaceError(f"{source}: smoke: expected true or false, got {is_smoke!r}")
    runner = data.get("trial_runner", "auto")
    if runner not in TRIAL_RUNNERS:
        raise SpaceError(f"{source}: trial_runner: {runner!r} is not one of {list(TRIAL_RUNNERS)}")
    seeds = _seeds(data.get("seeds"), source, "seeds")
    if seeds is not None and "seed" in flat:
        raise SpaceError(f"{source}: seeds: and param_space.seed both set; give one of them")
    points = _settings(data.get("settings"), source, schema, flat)
    searched = (*points[0], *(k for k, v in flat.items() if isinstance(v, Sampler) or len(v) > 1))
    stages = _stages(data.get("stages"), source, schema, set(searched))
    scheduler = _scheduler(data.get("scheduler"), source, "scheduler")
    if stages and scheduler is not None:
        raise SpaceError(f"{source}: scheduler: a staged space gives each stage its own (stages[i].scheduler)")
    variants = _expand(presets, flat, seeds, search, source, points)
    varying = tuple(k for k, vals in [("preset", [p for p, _ in presets]), ("seed", seeds or [None]),
                                      *((k, list(dict.fromkeys(str(p[k]) for p in points))) for k in points[0]),
                                      *((k, v if isinstance(v, list) else [0, 1]) for k, v in flat.items())]
                    if len(vals) > 1)
    spec = SweepSpec(source=source, name=Path(source).stem, metric=select.metric, mode=select.mode, smoke=is_smoke,
                     variants=tuple(variants), varying=varying, requires=requires, text=text, search=search,
                     scheduler=scheduler, select=select, stages=stages, searched=searched, trial_runner=runner)
    spec.validate()  # every variant of every stage, and the schedulers, before Ray starts
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
    """The ``# trials: N`` count stated in a space file's header (stage 1's for a staged space)."""
    m = re.search(r"^#\s*trials:\s*([\d,]+)", Path(path).read_text(), flags=re.M)
    return int(m.group(1).replace(",", "")) if m else None


def stage_variants(picks: list[dict[str, Any]], seeds: tuple[int, ...] | None) -> list[Variant]:
    """A later stage's trials: every pick with ``seeds`` (default: the seeds it ran with)."""
    out = []
    for p in picks:
        hparams, params = json.loads(p["hparams"]), json.loads(p["params"])
        for seed in seeds or p["seeds"]:
            out.append(Variant(len(out), p["preset"], params, {**hparams, "seed": int(seed)}))
    return out
