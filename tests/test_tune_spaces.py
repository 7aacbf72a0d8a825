"""Search spaces (tune_spaces/*.yaml), their validation, resource planning and the aggregation.

No Ray here: the space files are expanded and validated in-process; the sweep itself is
exercised end to end in test_e2e_sweep.py.
"""

import itertools
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from jobs import sweep as sweep_job
from service.config import ConfigError
from service.presets import PRESETS
from service.spaces import SpaceError, SpaceUnavailable, load_space, spec_from_dict, stated_trials, train_command
from service.tables import FINAL_METRICS, PAPER_TABLE1, aggregate
from service.sweep_resources import plan_resources

SPACES = Path(__file__).resolve().parents[1] / "tune_spaces"
FILES = sorted(SPACES.glob("*.yaml"))


def test_there_is_a_space_per_protocol_and_a_smoke_variant_of_each():
    names = {f.stem for f in FILES}
    for dataset in ("8gaussians", "2spirals", "checkerboard", "rings"):
        assert {f"grid_{dataset}", f"grid_vae_{dataset}", f"seeds_{dataset}"} <= names
    assert {"ablation_r_entropy_2d", "ablation_r_entropy_fmnist", "reproduce_table1"} <= names
    assert {"smoke_grid", "smoke_grid_vae", "smoke_seeds", "smoke_ablation_r_entropy_2d",
            "smoke_ablation_r_entropy_fmnist", "smoke_staged"} <= names
    assert {"staged_8gaussians_mog_ip_lc", "staged_8gaussians_mog_fixed_lc", "agreement_grid",
            "agreement_staged"} <= names


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_space_loads_validates_and_expands_to_its_stated_trial_count(path):
    text = path.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"python -m jobs.sweep tune_spaces/{path.name} --output-dir" in header  # the exact command
    assert re.search(r"^# runtime: \S", header, flags=re.M)
    assert not re.search(r"\{[A-Z0-9_]+\}", header)  # no unfilled {PLACEHOLDER}
    stated = stated_trials(path)
    assert stated and stated > 0
    spec = load_space(path)
    assert len(spec.variants) == stated
    assert len({(v.preset, tuple(sorted(v.overrides.items()))) for v in spec.variants}) == stated  # all distinct
    assert ("smoke" in path.stem) == spec.smoke
    if stated <= 200:  # load_space validated the default shrink; the others too where that is cheap
        for shrink in ("full", "quick", "smoke"):
            assert len(spec.configs(shrink)) == stated


def test_sintro_grid_is_the_spec_grid_with_beta_neg_a_multiple_of_beta_kl():
    spec = load_space(SPACES / "grid_8gaussians.yaml")
    rec = (0.05, 0.2, 0.3, 0.4, 0.8, 1.0)
    kl = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0)
    expected = {(r, k, round(f * k, 12)) for r, k, f in itertools.product(rec, kl, range(1, 6))}
    for preset in ("8gaussians/sintro", "8gaussians/mog-fixed", "8gaussians/mog-fixed-lc", "8gaussians/mog-ip",
                   "8gaussians/mog-ip-lc"):  # load_space has validated every variant's config
        got = [tuple(v.overrides[f"objective.{k}"] for k in ("beta_rec", "beta_kl", "beta_neg"))
               for v in spec.variants if v.preset == preset]
        assert set(got) == expected and len(got) == 210
    assert spec.variants[7].config().objective.beta_neg == spec.variants[7].overrides["objective.beta_neg"]
    vae = load_space(SPACES / "grid_vae_8gaussians.yaml").configs()
    assert len(vae) == 81 and all(c.is_vae for c in vae)


def test_reproduce_table1_is_the_union_of_the_seeds_files_and_uses_paper_table3_for_sg():
    union = set()
    for dataset in ("8gaussians", "2spirals", "checkerboard", "rings"):
        spec = load_space(SPACES / f"seeds_{dataset}.yaml")
        union |= {(v.preset, tuple(sorted(v.overrides.items()))) for v in spec.variants}
    table1 = load_space(SPACES / "reproduce_table1.yaml")
    assert {(v.preset, tuple(sorted(v.overrides.items()))) for v in table1.variants} == union
    # paper Table 3 (the paper's own SG grid selection): (beta_rec, beta_kl, beta_neg)
    table3 = {"8gaussians": (0.2, 0.3, 0.9), "2spirals": (0.2, 0.05, 0.2), "checkerboard": (0.05, 0.2, 0.8),
              "rings": (0.2, 0.2, 0.6)}
    for v in table1.variants:
        c = v.config()
        if v.preset.endswith("/sintro"):
            assert (c.objective.beta_rec, c.objective.beta_kl, c.objective.beta_neg) == table3[c.data.dataset]
        else:
            assert c.objective == PRESETS[v.preset]().objective  # the presets' SPEC §6.3 values


# ---- bad space files fail fast, naming the file, the key and the allowed values ------------

BAD = [
    ("unknown_top.yaml", "preset: 8gaussians/sintro\nparam_spaces: {}\n",
     r"unknown_top.yaml: param_spaces: unknown key; known keys are \['preset', 'presets', 'metric'"),
    ("unknown_nested.yaml", "preset: 8gaussians/sintro\nparam_space:\n  objective:\n    beta_kll: 0.2\n",
     r"unknown_nested.yaml: param_space.objective.beta_kll: unknown key; known keys are \[.*'beta_kl'.*"
     r"'beta_neg_factor'\]"),
    ("unknown_section.yaml", "preset: 8gaussians/sintro\nparam_space:\n  objectiv: {beta_kl: 0.2}\n",
     r"unknown_section.yaml: param_space.objectiv: unknown key; known keys are \[.*'objective'"),
    ("wrong_type.yaml", "preset: 8gaussians/sintro\nparam_space:\n  objective:\n    beta_rec: {grid_search: [0.2, high]}\n",
     r"wrong_type.yaml: variant 1 .*objective.beta_rec: expected a number, got 'high'"),
    ("wrong_choice.yaml", "preset: 8gaussians/mog-ip\nparam_space:\n  prior:\n    init: {grid_search: [vamp, kmeans]}\n",
     r"wrong_choice.yaml: .*prior.init: 'kmeans' is not one of \['vamp', 'random'\]"),
    ("out_of_range.yaml", "preset: 8gaussians/sintro\nparam_space:\n  objective: {beta_kl: -1}\n",
     r"out_of_range.yaml: .*objective.beta_kl: -1.0 is out of range; allowed \[0"),
    ("empty_grid.yaml", "preset: 8gaussians/sintro\nparam_space:\n  objective:\n    beta_rec: {grid_search: []}\n",
     r"empty_grid.yaml: param_space.objective.beta_rec: grid_search must be a non-empty list, got \[\]"),
    ("bad_search.yaml", "preset: 8gaussians/sintro\nparam_space:\n  objective:\n    beta_rec: {normal: [0, 1]}\n",
     r"bad_search.yaml: param_space.objective.beta_rec: unsupported search \['normal'\]; allowed \{grid_search: "
     r"\[...\]\}, \{loguniform: \[lo, hi\]\}, \{uniform: \[lo, hi\]\}, \{choice: \[...\]\} or a plain value"),
    ("sampler_in_grid.yaml", "preset: 8gaussians/sintro\nparam_space:\n  objective:\n    beta_rec: {uniform: [0, 1]}\n",
     r"sampler_in_grid.yaml: param_space.objective.beta_rec: uniform samples values, which needs "
     r"search: \{type: random, num_samples: N\}; with search: grid use \{grid_search: \[...\]\}"),
    ("bad_sampler_range.yaml", "preset: 8gaussians/sintro\nsearch: {type: random, num_samples: 2}\nparam_space:\n"
     "  objective:\n    beta_kl: {loguniform: [0, 1]}\n",
     r"bad_sampler_range.yaml: param_space.objective.beta_kl: loguniform needs lo > 0, got \[0, 1\]"),
    ("bad_search_type.yaml", "preset: 8gaussians/sintro\nsearch: {type: bayes}\n",
     r"bad_search_type.yaml: search.type: 'bayes' is not one of \['grid', 'random'\]"),
    ("random_without_n.yaml", "preset: 8gaussians/sintro\nsearch: {type: random}\nparam_space:\n  objective:\n"
     "    beta_kl: {uniform: [0.1, 1]}\n",
     r"random_without_n.yaml: search.num_samples: None is invalid; allowed integers >= 1"),
    ("bad_scheduler.yaml", "preset: 8gaussians/sintro\nscheduler: {type: hyperband}\n",
     r"bad_scheduler.yaml: scheduler.type: 'hyperband' is not one of \['asha', 'fifo'\]"),
    ("bad_scheduler_key.yaml", "preset: 8gaussians/sintro\nscheduler: {type: asha, grace: 100}\n",
     r"bad_scheduler_key.yaml: scheduler.grace: unknown key for asha; known keys are \['type', 'grace_period', "
     r"'reduction_factor', 'max_t'\]"),
    ("bad_reduction.yaml", "preset: 8gaussians/sintro\nscheduler: {type: asha, reduction_factor: 1}\n",
     r"bad_reduction.yaml: scheduler.reduction_factor: 1 is invalid; allowed numbers > 1"),
    ("no_reports.yaml", "preset: 8gaussians/sintro\nscheduler: {type: asha, grace_period: 1000}\n",
     r"no_reports.yaml: scheduler: asha stops trials on their intermediate evaluations, but variant 0 "
     r"8gaussians/sintro \(full\) makes none: schedule.eval_every is 0 with schedule.iterations 30000; allowed "
     r"eval_every in \[1, 29999\] \(set param_space.schedule.eval_every\), or drop the scheduler"),
    ("short_max_t.yaml", "preset: 8gaussians/sintro\nscheduler: {type: asha, grace_period: 3000, max_t: 5000}\n"
     "param_space: {schedule: {eval_every: 1000}}\n",
     r"short_max_t.yaml: scheduler.max_t: 5000 would stop every trial before its schedule ends \(variant 0 "
     r"8gaussians/sintro \(full\): schedule.iterations 30000\); allowed integers >= 30000"),
    ("warmup_rung.yaml", "preset: 8gaussians/mog-ip-lc\nscheduler: {type: asha, grace_period: 1000}\n"
     "param_space: {schedule: {iterations: 5000, warmup: 1000, eval_every: 1000}}\n",
     r"warmup_rung.yaml: scheduler.grace_period: 1000 falls within variant 0 8gaussians/mog-ip-lc \(full\)'s warm-up "
     r"\(schedule.warmup 1000\), where objective.beta_neg and the adversarial game play no part; "
     r"allowed \[1001, 4999\] \(leave it out for the first evaluation after the warm-up, iteration 2000\)"),
    ("no_rung_after_warmup.yaml", "preset: 8gaussians/mog-ip-lc\nscheduler: {type: asha}\n"
     "param_space: {schedule: {iterations: 5000, warmup: 4000, eval_every: 3000}}\n",
     r"no_rung_after_warmup.yaml: scheduler: variant 0 8gaussians/mog-ip-lc \(full\) makes no evaluation between the "
     r"end of its warm-up \(schedule.warmup 4000\) and its end \(schedule.iterations 5000\) with schedule.eval_every "
     r"3000; lower eval_every or drop the scheduler"),
    ("gnelbo_rung_without_gnelbo.yaml", "preset: 8gaussians/mog-ip-lc\nselect: {metric: gnelbo_x1e7}\n"
     "scheduler: {type: asha}\nparam_space: {schedule: {eval_every: 1000}, eval: {intermediate_gnelbo: false}}\n",
     r"gnelbo_rung_without_gnelbo.yaml: scheduler: asha ranks trials by gnelbo_x1e7 on their intermediate "
     r"evaluations, but variant 0 8gaussians/mog-ip-lc \(full\) sets eval.intermediate_gnelbo false; allowed: true"),
    ("grid_energy_rung_without_gnelbo.yaml", "preset: 8gaussians/mog-ip-lc\nselect: {metric: hist_kl, where: "
     "{gnelbo_grid_energy: {min: 20}}}\nscheduler: {type: asha}\n"
     "param_space: {schedule: {eval_every: 1000}, eval: {intermediate_gnelbo: false}}\n",
     r"asha ranks trials by gnelbo_grid_energy on their intermediate evaluations, but variant 0 "
     r"8gaussians/mog-ip-lc \(full\) sets eval.intermediate_gnelbo false"),
    ("intermediate_gnelbo_string.yaml", "preset: 8gaussians/mog-ip-lc\n"
     "param_space: {eval: {intermediate_gnelbo: 'no'}}\n", r"eval.intermediate_gnelbo"),
    ("epoch_scheduler.yaml", "preset: fmnist/mog10-ip-lc\nmetric: fid_fmnist_cnn\nscheduler: {type: asha}\n"
     "param_space: {schedule: {eval_every: 10}}\n",
     r"epoch_scheduler.yaml: scheduler: asha counts training iterations, but variant 0 fmnist/mog10-ip-lc \(full\) "
     r"counts schedule.unit='epochs'"),
    ("bad_select_metric.yaml", "preset: 8gaussians/sintro\nselect: {metric: purity}\n",
     r"bad_select_metric.yaml: select.metric: 'purity' is not one of \['gnelbo_x1e7', 'hist_kl', .*'mode_purity', "
     r"'modes_covered', 'mode_share_tv', 'mode_offset_max'\]"),
    ("bad_where.yaml", "preset: 8gaussians/sintro\nselect: {where: {purity: {min: 0.9}}}\n",
     r"bad_where.yaml: select.where.purity: unknown metric; allowed \[.*'mode_purity'"),
    ("bad_where_bound.yaml", "preset: 8gaussians/sintro\nselect: {where: {mode_purity: {at_least: 0.9}}}\n",
     r"bad_where_bound.yaml: select.where.mode_purity: expected \{min: x\}, \{max: y\} or both"),
    ("select_contradicts.yaml", "preset: 8gaussians/sintro\nmetric: hist_kl\nselect: {metric: hist_jsd}\n",
     r"select_contradicts.yaml: select.metric: 'hist_jsd' contradicts metric: 'hist_kl'; give one of them"),
    ("stage_key.yaml", "preset: 8gaussians/sintro\nstages:\n  - {name: a}\n  - {name: b, topk: 3}\n",
     r"stage_key.yaml: stages\[1\].topk: unknown key; known keys are \['name', 'shrink', 'param_space', "
     r"'scheduler', 'top_k', 'seeds'\]"),
    ("stage_grid.yaml", "preset: 8gaussians/sintro\nstages:\n  - {name: a}\n  - name: b\n    param_space:\n"
     "      objective: {beta_rec: {grid_search: [0.1, 0.2]}}\n",
     r"stage_grid.yaml: stages\[1\].param_space.objective.beta_rec: a stage sets constants"),
    ("stage_searched.yaml", "preset: 8gaussians/sintro\nparam_space:\n  objective: {beta_kl: {grid_search: [0.1, 0.2]}}"
     "\nstages:\n  - {name: a}\n  - {name: b, param_space: {objective: {beta_kl: 0.3}}}\n",
     r"stage_searched.yaml: stages\[1\].param_space.objective.beta_kl: is searched"),
    ("stage_top_k.yaml", "preset: 8gaussians/sintro\nstages:\n  - {name: a, top_k: 3}\n",
     r"stage_top_k.yaml: stages\[0\].top_k: the first stage runs the whole space"),
    ("stage_shrink.yaml", "preset: 8gaussians/sintro\nstages:\n  - {name: a, shrink: tiny}\n",
     r"stage_shrink.yaml: stages\[0\].shrink: 'tiny' is not one of \['full', 'quick', 'smoke'\]"),
    ("stage_no_reports.yaml", "preset: 8gaussians/sintro\nstages:\n  - name: coarse\n    shrink: smoke\n"
     "    param_space: {schedule: {eval_every: 1000}}\n    scheduler: {type: asha}\n",
     r"stage_no_reports.yaml: stages\[0\].scheduler: asha stops trials on their intermediate evaluations, but "
     r"variant 0 8gaussians/sintro \(smoke\) makes none: schedule.eval_every is 1000 with schedule.iterations 12; "
     r"allowed eval_every in \[1, 11\] \(set stages\[0\].param_space.schedule.eval_every\)"),
    ("scheduler_and_stages.yaml", "preset: 8gaussians/sintro\nscheduler: fifo\nstages:\n  - {name: a}\n",
     r"scheduler_and_stages.yaml: scheduler: a staged space gives each stage its own \(stages\[i\].scheduler\)"),
    ("bad_preset.yaml", "preset: 8gaussians/sintra\n",
     r"bad_preset.yaml: preset: '8gaussians/sintra' is unknown; valid presets are \['2spirals/mog-fixed'"),
    ("bad_seeds.yaml", "preset: 8gaussians/sintro\nseeds: [0, one]\n",
     r"bad_seeds.yaml: seeds: expected a non-empty list of integers, got \[0, 'one'\]"),
    ("bad_metric.yaml", "preset: 8gaussians/sintro\nmetric: fid\n",
     r"bad_metric.yaml: metric: 'fid' is not one of \['gnelbo_x1e7', 'hist_kl'"),
    ("bad_factor.yaml", "preset: 8gaussians/sintro\nparam_space:\n  objective: {beta_neg_factor: {grid_search: [1, 0]}}\n",
     r"bad_factor.yaml: param_space.objective.beta_neg_factor: 0 is not a positive number"),
    ("not_yaml.yaml", "preset: [8gaussians/sintro\n", r"not_yaml.yaml: not valid YAML"),
    ("settings_grid.yaml", "preset: 8gaussians/sintro\nsettings:\n  - {objective: {beta_kl: {grid_search: [0.1, 0.2]}}}\n",
     r"settings_grid.yaml: settings\[0\].objective.beta_kl: a setting holds plain values; searches belong in param_space"),
    ("settings_keys.yaml", "preset: 8gaussians/sintro\nsettings:\n  - {objective: {beta_kl: 0.1}}\n"
     "  - {objective: {beta_rec: 0.2}}\n",
     r"settings_keys.yaml: settings\[1\]: keys \['objective.beta_rec'\] differ from settings\[0\]'s "
     r"\['objective.beta_kl'\]; every setting names the same keys"),
    ("settings_twice.yaml", "preset: 8gaussians/sintro\nparam_space: {objective: {beta_kl: 0.3}}\nsettings:\n"
     "  - {objective: {beta_kl: 0.1}}\n",
     r"settings_twice.yaml: settings\[0\].objective.beta_kl: also set in param_space; give each key in one place"),
    ("settings_unknown.yaml", "preset: 8gaussians/sintro\nsettings:\n  - {objective: {beta_kll: 0.1}}\n",
     r"settings_unknown.yaml: settings\[0\].objective.beta_kll: unknown key; known keys are \[.*'beta_kl'"),
    ("settings_seed.yaml", "preset: 8gaussians/sintro\nsettings:\n  - {seed: 3}\n",
     r"settings_seed.yaml: settings\[0\].seed: give seeds in the top-level seeds: list"),
    ("settings_empty.yaml", "preset: 8gaussians/sintro\nsettings: []\n",
     r"settings_empty.yaml: settings: expected a non-empty list of mappings"),
    ("settings_value.yaml", "preset: 8gaussians/sintro\nsettings:\n  - {objective: {beta_kl: -0.1}}\n",
     r"settings_value.yaml: variant 0 .*objective.beta_kl: -0.1 is out of range"),
    ("runner.yaml", "preset: 8gaussians/sintro\ntrial_runner: in_process\n",
     r"runner.yaml: trial_runner: 'in_process' is not one of \['auto', 'ray_train'\]"),
]


@pytest.mark.parametrize("name,text,message", BAD, ids=[b[0] for b in BAD])
def test_bad_space_fails_with_a_clear_message(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpaceError, match=message):
        load_space(path)


@pytest.mark.parametrize("name,text,message", [BAD[1], BAD[3], BAD[6]], ids=["unknown", "type", "empty"])
def test_sweep_command_rejects_a_bad_space_before_ray_starts_and_writes_nothing(tmp_path, capsys, name, text,
                                                                                message):
    import ray

    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "out"
    assert sweep_job.main([str(path), "--output-dir", str(out)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists() and not ray.is_initialized()


def test_sweep_command_refuses_to_resume_a_different_sweep_before_ray_starts(tmp_path, capsys):
    import json

    import ray

    out = tmp_path / "out"
    out.mkdir()
    state = {"name": "smoke_grid", "space_sha256": "0" * 64, "shrink": "smoke", "source": "tune_spaces/smoke_grid.yaml",
             "tracking_uri": "sqlite:////nowhere/mlflow.db"}
    (out / "sweep.json").write_text(json.dumps(state))
    assert sweep_job.main([str(SPACES / "smoke_seeds.yaml"), "--output-dir", str(out)]) == 2
    assert re.search(r"smoke_seeds.yaml: .*/out holds a different sweep \(tune_spaces/smoke_grid.yaml, smoke\); "
                     r"use a new --output-dir", capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json"] and not ray.is_initialized()


def test_sweep_command_rejects_a_scheduler_the_shrink_leaves_without_reports(tmp_path, capsys):
    import ray

    out = tmp_path / "out"
    # stage 1 evaluates every 1,000 iterations: on the 12-iteration smoke shrink ASHA would see no report
    assert sweep_job.main([str(SPACES / "staged_8gaussians_mog_ip_lc.yaml"), "--output-dir", str(out), "--smoke"]) == 2
    assert re.search(r"staged_8gaussians_mog_ip_lc.yaml: stages\[0\].scheduler: asha stops trials on their "
                     r"intermediate evaluations, but variant 0 8gaussians/mog-ip-lc \(smoke\) makes none: "
                     r"schedule.eval_every is 1000 with schedule.iterations 12", capsys.readouterr().err)
    assert not out.exists() and not ray.is_initialized()


# ---- random search, schedulers, stages ------------------------------------------------------------

RANDOM = {"presets": ["8gaussians/mog-ip-lc", "8gaussians/mog-fixed-lc"], "seeds": [0, 1],
          "search": {"type": "random", "num_samples": 5, "seed": 3},
          "param_space": {"objective": {"beta_kl": {"loguniform": [0.01, 1.0]}, "beta_rec": {"uniform": [0.1, 0.9]},
                                        "beta_neg_factor": {"choice": [1, 3, 5]},
                                        "r_entropy": {"grid_search": [0, 10]}}}}


def test_random_search_draws_seeded_samples_within_bounds_times_the_grid_and_seeds():
    spec = spec_from_dict(RANDOM, "random.yaml")
    assert len(spec.variants) == 2 * 5 * 2 * 2  # presets x samples x grid x seeds
    assert set(spec.searched) == {"objective.beta_kl", "objective.beta_rec", "objective.beta_neg_factor",
                                  "objective.r_entropy"}
    draws = {(v.params["objective.beta_kl"], v.params["objective.beta_rec"], v.params["objective.beta_neg_factor"])
             for v in spec.variants}
    assert len(draws) == 5  # the same 5 draws for both presets, every grid value and seed
    for kl, rec, k in draws:
        assert 0.01 <= kl <= 1.0 and 0.1 <= rec <= 0.9 and k in (1, 3, 5)
        assert kl == float(f"{kl:.6g}")  # readable: 6 significant digits
    v = spec.variants[0]
    k, kl = v.params["objective.beta_neg_factor"], v.params["objective.beta_kl"]
    assert v.overrides["objective.beta_neg"] == round(k * kl, 12)
    assert [v.overrides for v in spec_from_dict(RANDOM, "random.yaml").variants] == [v.overrides for v in spec.variants]
    other = spec_from_dict({**RANDOM, "search": {**RANDOM["search"], "seed": 4}}, "random.yaml")
    assert [v.overrides for v in other.variants] != [v.overrides for v in spec.variants]
    assert v.columns(0) == {"preset": "8gaussians/mog-ip-lc", "seed": 0, **v.params,
                            "objective.beta_neg": v.overrides["objective.beta_neg"]}


def test_staged_spaces_run_a_short_coarse_grid_with_asha_then_top3_full_then_three_seeds():
    for name in ("staged_8gaussians_mog_ip_lc", "staged_8gaussians_mog_fixed_lc"):
        spec = load_space(SPACES / f"{name}.yaml")
        grid = {(v.overrides["objective.beta_rec"], v.overrides["objective.beta_kl"],
                 v.params["objective.beta_neg_factor"]) for v in spec.variants}
        assert grid == set(itertools.product((0.2, 0.4, 0.8), (0.05, 0.1, 0.2, 0.3, 0.5), (1, 3, 5)))
        (coarse, s1), (full, s2), (seeds, s3) = spec.plan()
        assert (s1, s2, s3) == ("quick", "full", "full")
        assert (spec.metric, spec.mode, spec.select.where) == ("hist_kl", "min", ())
        sched = coarse.scheduler
        assert (sched.type, sched.grace_period, sched.reduction_factor) == ("asha", 4000, 2)
        assert sched.grace_period > spec.configs(s1, coarse)[0].schedule.warmup  # the rung follows the warm-up
        c = spec.configs(s1, coarse)[0]
        assert (c.schedule.iterations, c.schedule.eval_every) == (5_000, 1_000)
        assert full.top_k == 3 and spec.configs(s2, full)[0].schedule.iterations == 30_000
        assert seeds.top_k == 1 and seeds.seeds == (0, 1, 2)
        assert {v.seed for v in spec.configs(s1, coarse)} == {0}  # stage 3's seed 0 is stage 2's run: reused
    grid, staged = load_space(SPACES / "agreement_grid.yaml"), load_space(SPACES / "agreement_staged.yaml")
    assert [v.overrides for v in grid.variants] == [v.overrides for v in staged.variants]
    assert [c.schedule for c in grid.configs("quick", grid.stages[0])] == \
        [c.schedule for c in staged.configs("quick", staged.stages[0])]  # trials that finish are identical
    assert grid.stages[0].scheduler is None and staged.stages[0].scheduler.type == "asha"


def test_settings_are_explicit_points_times_the_grid_and_seeds_and_count_as_searched():
    """settings: re-runs named points (here stage 1's picks of the staged IP + LC selection): each point is
    one setting (not a product of its values), crossed with param_space's grid and the seeds."""
    spec = spec_from_dict({"preset": "8gaussians/mog-ip-lc", "seeds": [0, 1],
                           "settings": [{"objective": {"beta_rec": 0.8, "beta_kl": 0.05, "beta_neg_factor": 1}},
                                        {"objective": {"beta_rec": 0.2, "beta_kl": 0.3, "beta_neg_factor": 5}}],
                           "param_space": {"prior": {"lr": {"grid_search": [1e-3, 2e-3]}}}}, "pts.yaml")
    got = [(v.overrides["objective.beta_rec"], v.overrides["objective.beta_kl"], v.overrides["objective.beta_neg"],
            v.overrides["prior.lr"], v.overrides["seed"]) for v in spec.variants]
    assert got == [(0.8, 0.05, 0.05, 1e-3, 0), (0.8, 0.05, 0.05, 1e-3, 1), (0.8, 0.05, 0.05, 2e-3, 0),
                   (0.8, 0.05, 0.05, 2e-3, 1), (0.2, 0.3, 1.5, 1e-3, 0), (0.2, 0.3, 1.5, 1e-3, 1),
                   (0.2, 0.3, 1.5, 2e-3, 0), (0.2, 0.3, 1.5, 2e-3, 1)]
    assert set(spec.searched) == {"objective.beta_rec", "objective.beta_kl", "objective.beta_neg_factor",
                                  "prior.lr"}
    assert {"objective.beta_rec", "objective.beta_kl", "objective.beta_neg_factor", "seed"} <= set(spec.varying)
    cmd = train_command(spec.variants[0].preset, spec.variants[0].hparams, spec.searched)
    assert cmd == ("python -m jobs.train --preset 8gaussians/mog-ip-lc --set objective.beta_kl=0.05 "
                   "--set objective.beta_neg=0.05 --set objective.beta_rec=0.8 --set prior.lr=0.001")
    # the file that continues the IP + LC staged selection from its stage 1's three picks
    full = load_space(SPACES / "staged_8gaussians_mog_ip_lc_full.yaml")
    def betas(v):
        return v.overrides["objective.beta_rec"], v.overrides["objective.beta_kl"], v.overrides["objective.beta_neg"]

    picks = [betas(v) for v in full.variants]
    assert picks == [(0.8, 0.05, 0.05), (0.8, 0.2, 1.0), (0.2, 0.3, 1.5)]
    (first, s1), (seeds, s2) = full.plan()
    assert (s1, s2, seeds.top_k, seeds.seeds) == ("full", "full", 1, (0, 1, 2))
    assert {c.schedule.iterations for c in full.configs(s1, first)} == {30_000}
    staged = load_space(SPACES / "staged_8gaussians_mog_ip_lc.yaml")  # the same trials as the original's stage 2
    (_, _), (stage2, _), _ = staged.plan()
    same = sorted((v for v in staged.variants if betas(v) in picks), key=lambda v: picks.index(betas(v)))
    assert full.configs("full", first) == [v.config("full", stage2.overrides) for v in same]


def test_quick_and_smoke_flags_shrink_every_variant(tmp_path):
    spec = load_space(SPACES / "seeds_8gaussians.yaml")
    full, quick, smoke = (spec.configs(s) for s in ("full", "quick", "smoke"))
    assert {c.schedule.iterations for c in full} == {30_000}
    assert {c.schedule.iterations for c in quick} == {5_000}
    assert {c.schedule.iterations for c in smoke} == {12}
    assert [c.seed for c in full] == [c.seed for c in smoke]  # the shrink changes the schedule, not the trial


# ---- resources: trials fit the CPUs/GPUs ------------------------------------------------

@pytest.mark.parametrize("cpus,gpus,workers,asked,gpt,expected,threads", [
    (2, 0, 1, None, 0, 2, 1),  # this machine: two 1-worker trials of 1 thread
    (2, 0, 2, None, 0, 1, 1),  # a 2-worker trial takes both CPUs
    (2, 0, 1, 1, 0, 1, 2),  # one trial at a time gets both CPUs as threads
    (16, 0, 1, 3, 0, 3, 5),
    (16, 1, 1, None, 0.25, 4, 4),  # four 2D trials share one GPU
    (16, 2, 1, 3, 0.25, 3, 5),
])
def test_plan_resources_never_oversubscribes(cpus, gpus, workers, asked, gpt, expected, threads):
    plan = plan_resources(cpus, gpus, workers, asked, gpt)
    assert (plan.max_concurrent, plan.threads_per_worker) == (expected, threads)
    # drivers (0.01 CPU each) plus Train workers fit the CPUs, and the GPUs
    assert plan.max_concurrent * (0.01 + workers * plan.cpus_per_worker) <= cpus + 1e-9
    assert plan.max_concurrent * workers * plan.gpus_per_worker <= gpus + 1e-9
    # every worker leaves room for a driver on its node (multi-node clusters of small nodes)
    assert plan.cpus_per_worker == pytest.approx(threads - 0.01, abs=1e-4)


def test_plan_resources_for_an_autoscaling_cluster_keeps_the_asked_concurrency():
    plan = plan_resources(0, 0, 1, 64, 0.25)  # head without CPUs, no worker node up yet
    assert (plan.max_concurrent, plan.cpus_per_worker, plan.threads_per_worker) == (64, 0.99, 1)
    assert plan.gpus_per_worker == 0.25
    plan = plan_resources(2, 0, 1, 8)  # more than fit: the extra trials queue
    assert (plan.max_concurrent, plan.cpus_per_worker) == (8, 0.99)


def test_plan_resources_rejects_more_gpus_than_the_cluster_has():
    with pytest.raises(ConfigError, match=r"--gpus-per-trial: 1.0 is more than the Ray cluster's 0 GPUs"):
        plan_resources(2, 0, 1, None, 1.0)


@pytest.mark.parametrize("gpus_per_trial,workers,per_worker", [
    (0.25, 1, 0.25),  # four trials share a GPU
    (1.0, 2, 0.5),  # two workers of one trial share a GPU
    (1.0, 3, 1 / 3),
    (2.0, 1, 2.0),  # a worker with two whole GPUs
    (4.0, 2, 2.0),
    (0.0, 1, 0.0),  # CPU trials
])
def test_gpus_per_worker_is_a_fraction_up_to_one_or_whole(gpus_per_trial, workers, per_worker):
    assert plan_resources(16, 8, workers, 4, gpus_per_trial).gpus_per_worker == pytest.approx(per_worker)


@pytest.mark.parametrize("gpus_per_trial,workers,shown", [(1.5, 1, "1.5"), (3.0, 2, "1.5"), (0.00005, 1, "5e-05"),
                                                           (0.0003, 4, "7.5e-05")])
def test_gpus_per_worker_that_ray_cannot_place_is_refused_naming_the_flag(gpus_per_trial, workers, shown):
    with pytest.raises(ConfigError, match=rf"--gpus-per-trial: {gpus_per_trial:g} gives each of a trial's {workers} "
                                          rf"Train worker\(s\) {shown} GPU; allowed per worker a fraction in "
                                          r"\[0.0001, 1\] or a whole number"):
        plan_resources(16, 8, workers, 4, gpus_per_trial)


# ---- aggregation: selection by the SPEC criterion, mean ± s.e. over seeds -----------------

def _frame(rows):
    base = {m: math.nan for m in FINAL_METRICS}
    out = []
    for i, (preset, hparams, seed, status, kl, gnelbo, jsd) in enumerate(rows):
        dataset, _, configuration = preset.partition("/")
        out.append({**base, "variant": i, "preset": preset, "dataset": dataset, "configuration": configuration,
                    "seed": seed, "hparams": hparams, "status": status, "error": "" if status == "ok" else "boom",
                    "hist_kl": kl, "gnelbo_x1e7": gnelbo, "hist_jsd": jsd})
    return pd.DataFrame(out)


def test_aggregate_selects_lowest_mean_kl_and_reports_mean_and_standard_error():
    a, b = '{"objective.beta_rec": 0.2}', '{"objective.beta_rec": 0.8}'
    df = _frame([
        ("8gaussians/sintro", a, 0, "ok", 2.0, 1.0, 3.0),
        ("8gaussians/sintro", a, 1, "ok", 4.0, 3.0, 5.0),
        ("8gaussians/sintro", b, 0, "ok", 1.0, 9.0, 9.0),  # best single seed ...
        ("8gaussians/sintro", b, 1, "ok", 6.0, 9.0, 9.0),  # ... but worse mean (3.5 > 3.0)
        ("8gaussians/sintro", b, 2, "failed", math.nan, math.nan, math.nan),
        ("8gaussians/mog-ip-lc", a, 0, "ok", 5.0, 2.0, 1.0),
        ("2spirals/mog-ip", a, 0, "failed", math.nan, math.nan, math.nan),
    ])
    tables = aggregate(df)
    sel = tables.selected.set_index(["dataset", "configuration"])
    assert sel.loc[("8gaussians", "sintro"), "hparams"] == a
    assert sel.loc[("8gaussians", "sintro"), "score"] == 3.0
    assert sel.loc[("8gaussians", "sintro"), "failed"] == 1
    assert ("2spirals", "mog-ip") not in sel.index  # nothing completed: no cell
    s = tables.summary.set_index(["dataset", "configuration", "metric"])
    row = s.loc[("8gaussians", "sintro", "hist_kl")]
    assert row["mean"] == 3.0 and row["n"] == 2
    assert row["se"] == pytest.approx(math.sqrt(2.0) / math.sqrt(2))  # std(2, 4) = sqrt(2), / sqrt(2)
    assert (row["paper_mean"], row["paper_se"]) == PAPER_TABLE1[("8gaussians", "hist_kl")][1]
    assert math.isnan(s.loc[("8gaussians", "mog-ip-lc", "hist_kl"), "se"])  # n = 1: no s.e.
    md = tables.markdown
    assert "| 8gaussians | KL | — (6.94 ± 0.36) | 3.00 ± 1.00 (1.23 ± 0.05) |" in md
    assert "| 8gaussians | gnELBO | — (7.48 ± 0.03) | 2.00 ± 1.00 (0.51 ± 0.07) |" in md
    assert "5.00 (2.24 ± 0.71) |" in md  # IP LC, one seed
    assert "7 trials: 5 completed, 2 failed" in md
    assert "| 2spirals | KL |" in md and "## Failed or incomplete trials" in md


def test_paper_table1_matches_spec_section_8():
    # SPEC §8, means: VAE | SG | fixed | IP | fixed LC | IP LC
    spec8 = {("8gaussians", "gnelbo_x1e7"): [7.48, 0.51, 3.62, 4.8, 0.25, 0.26],
             ("2spirals", "hist_kl"): [10.18, 9.5, 8.61, 8.31, 9.45, 8.02],
             ("checkerboard", "hist_jsd"): [9.97, 8.87, 8.65, 8.71, 8.9, 8.46],
             ("rings", "hist_kl"): [13.3, 9.99, 10.07, 9.77, 11.31, 10.31]}
    for key, means in spec8.items():
        assert [m for m, _ in PAPER_TABLE1[key]] == means
    assert len(PAPER_TABLE1) == 12


def test_spec_from_dict_expands_presets_grid_and_seeds_in_order():
    spec = spec_from_dict({"presets": ["8gaussians/sintro", "8gaussians/vae"], "seeds": [3, 4],
                           "param_space": {"objective": {"beta_rec": {"grid_search": [0.2, 0.4]}}}}, "inline")
    got = [(v.preset, v.overrides["objective.beta_rec"], v.overrides["seed"]) for v in spec.variants]
    assert got == [(p, r, s) for p in ("8gaussians/sintro", "8gaussians/vae") for r in (0.2, 0.4) for s in (3, 4)]
    assert spec.varying == ("preset", "seed", "objective.beta_rec")


def test_image_sweeps_select_on_fid_and_use_the_table2_layout():
    base = {m: math.nan for m in FINAL_METRICS}
    rows = []
    for i, (conf, r_entropy, seed, fid, knn) in enumerate([
            ("mog10-ip-lc", 0, 0, 30.0, 0.5), ("mog10-ip-lc", 0, 1, 34.0, 0.6),
            ("mog10-ip-lc", 10, 0, 20.0, 0.7), ("mog10-ip-lc", 10, 1, 22.0, 0.8)]):
        rows.append({**base, "variant": i, "preset": f"fmnist/{conf}", "dataset": "fmnist", "configuration": conf,
                     "seed": seed, "hparams": f'{{"objective.r_entropy": {r_entropy}}}', "status": "ok", "error": "",
                     "fid_fmnist_cnn": fid, "knn_5_acc": knn})
    tables = aggregate(pd.DataFrame(rows), metric="fid_fmnist_cnn", mode="min")
    assert tables.selected["hparams"].tolist() == ['{"objective.r_entropy": 10}']
    md = tables.markdown
    assert "### fmnist" in md and "| metric | mog10-ip-lc |" in md
    assert "| fid_fmnist_cnn | 21.000 ± 1.000 |" in md and "| knn_5_acc | 0.750 ± 0.050 |" in md
    assert "| 8gaussians |" not in md  # no Table 1 block without 2D datasets


def test_image_space_metric_must_be_an_image_metric_and_missing_presets_are_unavailable(tmp_path):
    path = tmp_path / "img.yaml"
    path.write_text("requires: images\npreset: fmnist/mog10-ip-lc\nmetric: hist_kl\n")
    with pytest.raises(SpaceError, match=r"img.yaml: metric: 'hist_kl' is not one of \['fid', 'fid_paper'"):
        load_space(path)
    path.write_text("requires: images\npreset: svhn/mog10-ip-lc\nmetric: fid\n")
    with pytest.raises(SpaceUnavailable, match=r"img.yaml: svhn is not available yet \(requires: images"):
        load_space(path)


# ---- cluster configs: the fields docs/sweeps.md relies on ---------------------------------

DEPLOY = SPACES.parent / "deploy"


def test_ray_up_cluster_config_has_cpu_and_gpu_workers_and_installs_the_project():
    import yaml

    cfg = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes and nodes[cfg["head_node_type"]]["resources"]["CPU"] == 0
    assert nodes["cpu_worker"]["resources"]["CPU"] >= 2 and "GPU" not in nodes["cpu_worker"]["resources"]
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 1
    assert all(n["max_workers"] >= n["min_workers"] >= 0 for k, n in nodes.items() if k != cfg["head_node_type"])
    mounts = cfg["file_mounts"]
    (mount, src), = [(m, s) for m, s in mounts.items() if s == "."]  # the project, synced by `ray up`
    assert any(f"pip install -q -e {mount}" in c for c in cfg["setup_commands"])
    token = [m for m in mounts if m.endswith("/.ray/auth_token")]  # Ray's token reaches every node, not the YAML
    assert token and mounts[token[0]].startswith("/") and "auth_token" in mounts[token[0]]
    assert {".venv", "runs", "mlflow.db"} <= set(cfg["rsync_exclude"])
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "RAY_AUTH_MODE=token" in head and "MLFLOW_TRACKING_URI=" in head
    assert "mlflow server" in head and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in head
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in workers and "RAY_AUTH_MODE=token" in workers
    assert any("/mnt/shared" in c for c in cfg["setup_commands"])  # the shared --output-dir of the docs


def test_kuberay_rayjob_runs_a_valid_sweep_on_cpu_and_gpu_worker_groups():
    import ray
    import yaml

    job = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    argv = spec["entrypoint"].split()
    assert argv[:3] == ["python", "-m", "jobs.sweep"]
    args = sweep_job.build_parser().parse_args(argv[3:])  # the entrypoint's flags are the CLI's
    assert args.space.startswith("/app/tune_spaces/")
    assert len(load_space(SPACES / Path(args.space).name).variants) > 0
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert groups["gpu-workers"]["rayStartParams"]["num-gpus"] == "1"
    cpu = groups["cpu-workers"]  # one 1-CPU trial per CPU of the fully scaled-up CPU group
    assert args.max_concurrent == cpu["maxReplicas"] * int(cpu["rayStartParams"]["num-cpus"])
    gpu = groups["gpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    images = set()
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        images.add(container["image"])
        env = {e["name"]: e["value"] for e in container["env"]}
        assert "RAY_AUTH_MODE" not in env and env["MLFLOW_TRACKING_URI"] == args.tracking_uri
        (mount,) = container["volumeMounts"]
        assert args.output_dir.startswith(mount["mountPath"] + "/")  # every pod sees the output dir
        (volume,) = pod["template"]["spec"]["volumes"]
        assert volume["name"] == mount["name"] and "persistentVolumeClaim" in volume
    assert len(images) == 1  # one image with the project installed


def test_selection_names_the_train_command_that_reproduces_the_selected_setting():
    """selection.md's "train it" line: the preset and the searched keys (beta_neg resolved from its factor)
    as jobs.train --set overrides; applied to the preset they give the selected variant's objective."""
    import shlex

    from service.config import apply_overrides
    from service.presets import get_preset

    spec = load_space(SPACES / "staged_8gaussians_mog_ip_lc.yaml")
    (v,) = [v for v in spec.variants if (v.overrides["objective.beta_rec"], v.overrides["objective.beta_kl"],
                                         v.params["objective.beta_neg_factor"]) == (0.2, 0.05, 3)]
    cmd = train_command(v.preset, json.dumps(v.hparams), spec.searched)
    assert cmd == ("python -m jobs.train --preset 8gaussians/mog-ip-lc --set objective.beta_kl=0.05 "
                   "--set objective.beta_neg=0.15 --set objective.beta_rec=0.2")  # eval.plots is not a choice
    argv = shlex.split(cmd)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    trained = apply_overrides(get_preset(argv[argv.index("--preset") + 1]), sets)
    assert trained.objective == v.config("full").objective


def test_the_calibrated_decoders_metrics_can_select_and_constrain():
    spec = spec_from_dict({"preset": "8gaussians/mog-ip-lc",
                           "select": {"metric": "hist_kl_calibrated", "mode": "min",
                                      "where": {"mode_purity": {"min": 0.9}, "decoder_sigma": {"max": 0.05}}}},
                          "calibrated.yaml")
    assert spec.metric == "hist_kl_calibrated"
    assert {"hist_kl_calibrated", "hist_jsd_calibrated", "decoder_sigma"} <= set(FINAL_METRICS)
