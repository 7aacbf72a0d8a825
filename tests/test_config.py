"""Typed config: validation errors name the dotted field and what is allowed; round trips; overrides."""

import dataclasses

import pytest
import yaml

from service.config import (ConfigError, ExperimentConfig, ObjectiveConfig, PriorConfig, ScheduleConfig,
                            apply_overrides, dump_yaml, flatten, from_dict, load_yaml, parse_value, to_dict)
from service.presets import PRESETS, get_preset, quick, smoke


def _base() -> ExperimentConfig:
    return get_preset("8gaussians/mog-ip-lc")


# --------------------------------------------------------------------------------------------
# Bad values, through every entry: constructor, from_dict, --set overrides
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ({"schedule.warmup": 40_000}, r"^schedule\.warmup: 40000 is longer than the run; allowed \[0, "
                                  r"schedule\.iterations=30000\]"),
    ({"objective.beta_kl": -0.5}, r"^objective\.beta_kl: -0\.5 is out of range; allowed \[0, inf\]"),
    ({"objective.beta_neg": -1}, r"^objective\.beta_neg: -1\.0 is out of range; allowed \[0, inf\]"),
    ({"objective.beta_rec": -1e-9}, r"^objective\.beta_rec: .* is out of range; allowed \[0, inf\]"),
    ({"objective.alpha": 0.0}, r"^objective\.alpha: 0\.0 is out of range; allowed \(0, inf\]"),
    ({"prior.num_components": 0}, r"^prior\.num_components: 0 is out of range; allowed \[1, inf\]"),
    ({"prior.num_components": -3}, r"^prior\.num_components: -3 is out of range"),
    ({"prior.kind": "mogg"}, r"^prior\.kind: 'mogg' is not one of \['standard', 'mog'\]"),
    ({"objective.kl_estimator": "exact"}, r"^objective\.kl_estimator: 'exact' is not one of \['closed', 'mc'\]"),
    ({"optim.lr_decay": 1.5}, r"^optim\.lr_decay: 1\.5 is out of range; allowed \(0, 1\]"),
    ({"optim.milestones": [5, 3]}, r"^optim\.milestones: \[5, 3\] must be increasing positive integers"),
    ({"prior.mog_warmup": 3_000}, r"^prior\.mog_warmup: 3000 exceeds schedule\.warmup=2000; allowed \[0, 2000\]"),
    ({"prior.kind": "standard"}, r"^prior\.trainable / prior\.learnable_weights: only allowed with prior\.kind='mog'"),
    ({"data.batch_size": 0}, r"^data\.batch_size: 0 is out of range; allowed \[1, inf\]"),
    ({"scaling.workers": 0}, r"^scaling\.workers: 0 is out of range; allowed \[1, inf\]"),
])
def test_out_of_range_values_name_the_field_and_the_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(_base(), override)
    (key, value), = override.items()
    data = to_dict(_base())
    section, name = key.split(".")
    data[section][name] = value
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


@pytest.mark.parametrize("override,message", [
    (["schedule.iterations=1.5"], r"^schedule\.iterations: expected an integer, got 1\.5"),
    (["prior.trainable=1"], r"^prior\.trainable: expected true or false, got 1"),
    (["prior.trainable=maybe"], r"^prior\.trainable: expected true or false, got 'maybe'"),
    (["objective.beta_kl=abc"], r"^objective\.beta_kl: expected a number, got 'abc'"),
    (["objective.beta_kl=true"], r"^objective\.beta_kl: expected a number, got True"),
    (["optim.milestones=5"], r"^optim\.milestones: expected a list, got 5"),
    (["optim.milestones=[5, 'x']"], r"^optim\.milestones\[1\]: expected an integer, got 'x'"),
    (["data.eval_range=wide"], r"^data\.eval_range: 'wide' does not match any of \['float', 'NoneType'\]"),
    (["tracking.experiment=3"], r"^tracking\.experiment: expected a string, got 3"),
])
def test_mistyped_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(_base(), override)


def test_constructors_validate_too():
    with pytest.raises(ConfigError, match=r"^schedule\.warmup: 11 is longer than the run"):
        ScheduleConfig(iterations=10, warmup=11)
    with pytest.raises(ConfigError, match=r"^objective\.beta_neg: -2\.0 is out of range"):
        ObjectiveConfig(beta_neg=-2.0)
    with pytest.raises(ConfigError, match=r"^objective\.beta_kl: expected a number, got '0\.3'"):
        ObjectiveConfig(beta_kl="0.3")
    with pytest.raises(ConfigError, match=r"^prior\.num_components: 0 is out of range"):
        PriorConfig(num_components=0)
    with pytest.raises(ConfigError, match=r"^prior\.mog_warmup: 7 exceeds schedule\.warmup=5"):
        ExperimentConfig(prior=PriorConfig(kind="mog", mog_warmup=7), schedule=ScheduleConfig(iterations=9, warmup=5))
    assert ScheduleConfig(iterations=10, warmup=10)  # the VAE baseline: the whole run is warm-up
    with pytest.raises(dataclasses.FrozenInstanceError):
        _base().objective.beta_kl = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("data,message", [
    ({"objective": {"beta_kll": 0.5}}, r"^objective\.beta_kll: unknown key; known keys are \['beta_rec', 'beta_kl'"),
    ({"nope": 1}, r"^nope: unknown key; known keys are \['name', 'seed', 'data'"),
    ({"objective": 3}, r"^objective: expected a mapping, got 3"),
])
def test_from_dict_rejects_unknown_keys_and_shapes(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


@pytest.mark.parametrize("override,message", [
    (["objective.beta_kl"], r"^--set 'objective\.beta_kl': expected dotted\.key=value"),
    (["objectiv.beta_kl=1"], r"^objectiv: unknown section; known sections are \['data', 'network', 'prior'"),
    (["objective.beta_kll=0.5"], r"^objective\.beta_kll: unknown key; known keys are \['beta_rec'"),
    (["objective.beta_kl.x=0.5"], r"^objective\.beta_kl: unknown section"),
])
def test_override_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(_base(), override)


# --------------------------------------------------------------------------------------------
# Presets and round trips
# --------------------------------------------------------------------------------------------

def test_every_preset_and_its_shrunk_versions_validate_and_round_trip():
    for name in sorted(PRESETS):
        for cfg in (get_preset(name), smoke(get_preset(name)), quick(get_preset(name))):
            assert cfg.name == name
            assert from_dict(to_dict(cfg)) == cfg, name
        assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg, name  # YAML is slow: once per preset


def test_quick_schedule_shortens_2d_runs_and_halves_their_batch_only():
    for name in ("8gaussians/mog-ip-lc", "rings/sintro", "checkerboard/vae"):
        full, q = get_preset(name), quick(get_preset(name))
        assert (q.schedule.iterations, q.data.batch_size, q.optim.milestones) == (5_000, 256, (3_000, 4_000))
        assert (q.objective, q.prior.num_components, q.network) == (full.objective, full.prior.num_components,
                                                                    full.network)  # the model is the paper's
    image = get_preset("fmnist/mog10-ip-lc")
    assert quick(image).data.batch_size == image.data.batch_size


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(KeyError, match=r"preset: '8gaussians/nope' is unknown; valid presets are \[.*"
                                       r"'8gaussians/mog-ip-lc'"):
        get_preset("8gaussians/nope")


def test_yaml_file_round_trip(tmp_path):
    cfg = apply_overrides(_base(), ["seed=3", "optim.milestones=[5, 7]", "prior.soft_clip=false"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    loaded = load_yaml(str(path))
    assert loaded == cfg and loaded.optim.milestones == (5, 7) and loaded.prior.soft_clip is False
    assert list(yaml.safe_load(path.read_text())) == [f.name for f in dataclasses.fields(ExperimentConfig)]
    partial = tmp_path / "partial.yaml"
    partial.write_text("seed: 4\nobjective:\n  beta_kl: 0.5\n")
    assert load_yaml(str(partial)) == ExperimentConfig(seed=4, objective=ObjectiveConfig(beta_kl=0.5))


def test_to_dict_and_flatten_give_plain_values():
    flat = flatten(to_dict(_base()))
    assert flat["objective.beta_neg"] == 0.9 and flat["prior.num_components"] == 64
    assert flat["optim.milestones"] == [10_000, 15_000]  # lists, not tuples: YAML / MLflow friendly
    assert all(not isinstance(v, (dict, tuple)) for v in flat.values())


# --------------------------------------------------------------------------------------------
# Override parsing
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("0.5", 0.5), ("3", 3), ("1e-3", 1e-3), ("-2", -2), ("true", True), ("False", False), ("none", None),
    ("null", None), ("[1, 2]", [1, 2]), ("mog", "mog"), ("'quoted'", "quoted"), ("8gaussians", "8gaussians"),
])
def test_parse_value(text, value):
    parsed = parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_overrides_apply_coerce_and_revalidate():
    base = _base()
    cfg = apply_overrides(base, ["objective.beta_kl=1", "prior.soft_clip=none", "data.eval_range=3",
                                 "optim.milestones=[100, 200]", "seed=7", "schedule.warmup=0"])
    assert cfg.objective.beta_kl == 1.0 and isinstance(cfg.objective.beta_kl, float)
    assert cfg.prior.soft_clip is None and cfg.data.eval_range == 3.0 and cfg.optim.milestones == (100, 200)
    assert cfg.seed == 7 and cfg.schedule.warmup == 0
    assert apply_overrides(base, {"objective.beta_neg": 2.0}).objective.beta_neg == 2.0
    assert apply_overrides(base, []) == base and base.objective.beta_kl == 0.3  # the input is not mutated
    same = apply_overrides(base, ["prior.kind=mog", "prior.kind=standard", "prior.trainable=false",
                                  "prior.learnable_weights=false"])
    assert same.prior.kind == "standard"  # later overrides win, validated once at the end


def test_conversion_iteration_and_vae_flag():
    cfg = _base()
    assert cfg.conversion_iteration == 2_000 - 100 and not cfg.is_vae
    assert get_preset("8gaussians/sintro").conversion_iteration is None
    assert get_preset("8gaussians/vae").is_vae
    assert apply_overrides(cfg, ["prior.init=random"]).conversion_iteration is None
