"""Search spaces as plain YAML data (``tune_spaces/*.yaml``; SPEC §6.4, §7.3) -> validated trial variants.

A space file holds:

- ``preset:`` one preset name, or ``presets:`` a list of names (a grid dimension) or a mapping
  ``name -> fixed overrides`` (nested like the config; e.g. the paper's selected betas per preset);
- ``metric:`` / ``mode:`` the selection metric (``hist_kl`` / ``min``, SPEC §6.4; images: an FID name of
  ``service.tables.IMAGE_METRICS``, SPEC §7.3);
- ``seeds:`` optional list, a grid dimension (innermost);
- ``smoke:`` default shrink (``presets.smoke``) when the command line does not say;
- ``requires:`` optional feature the space needs (``images``): presets that do not exist yet make
  ``load_space`` raise ``SpaceUnavailable`` ("fmnist is not available yet");
- ``param_space:`` mirroring ``ExperimentConfig``'s nesting, with ``{grid_search: [...]}`` leaves
  (plain values are constants). Special key ``objective.beta_neg_factor: k`` sets
  ``objective.beta_neg = k * objective.beta_kl`` (the paper's grid ``beta_neg = k * beta_kl``).

``load_space`` expands the cartesian product presets x grid x seeds itself and validates every
variant's config before Ray starts; errors name the file, the dotted key and the allowed values.
No Ray here: ``service.tuning`` turns the variants into Tune trials.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import ConfigError, ExperimentConfig, apply_overrides
from .presets import PRESETS, quick, smoke
from .tables import FINAL_METRICS, IMAGE_METRICS

Shrink = Literal["full", "quick", "smoke"]
TOP_KEYS = ("preset", "presets", "metric", "mode", "seeds", "smoke", "requires", "param_space")
FACTOR_KEY = "objective.beta_neg_factor"  # beta_neg = factor * beta_kl (SPEC §6.4)


class SpaceError(ConfigError):
    """A space file is malformed; the message names the file and the dotted key."""


class SpaceUnavailable(SpaceError):
    """The space needs a feature (``requires:``) that the service does not have yet."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e6`` and ``2e-4`` as floats (plain YAML 1.1 wants ``1.0e+6``)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"), list("-+0123456789."))


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
    images = {PRESETS[name]().data.is_image for name, _ in presets}
    allowed = (FINAL_METRICS if False in images else ()) + (IMAGE_METRICS if True in images else ())
    if metric not in allowed:
        raise SpaceError(f"{source}: metric: {metric!r} is not one of {list(allowed)}")
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
