"""2D presets: SG as the paper ran it (paper Table 3), the official S-Intro VAE betas by name, MoG unchanged."""

import dataclasses
from pathlib import Path

import pytest

from jobs import train as train_job
from service.config import TOY_DATASETS
from service.presets import (CONFIGURATIONS, MOG_BETAS, PRESETS, SINTRO_BETAS, SINTRO_OFFICIAL_BETAS,
                             TOY_CONFIGURATIONS, __doc__ as PRESETS_DOC, get_preset)

# (beta_rec, beta_kl, beta_neg)
PAPER_TABLE3 = {"8gaussians": (0.2, 0.3, 0.9), "2spirals": (0.2, 0.05, 0.2), "checkerboard": (0.05, 0.2, 0.8),
                "rings": (0.2, 0.2, 0.6)}
OFFICIAL = {"8gaussians": (0.2, 0.3, 0.9), "2spirals": (0.2, 0.5, 1.0), "checkerboard": (0.2, 0.1, 0.2),
            "rings": (0.2, 0.2, 1.0)}  # SPEC §6.3 (listed there as beta_kl, beta_rec, beta_neg)
VAE = {"8gaussians": (0.8, 0.05), "2spirals": (1.0, 0.05), "checkerboard": (0.8, 0.1), "rings": (0.8, 0.05)}


def _betas(name):
    o = get_preset(name).objective
    return o.beta_rec, o.beta_kl, o.beta_neg


@pytest.mark.parametrize("dataset", TOY_DATASETS)
def test_sintro_uses_the_papers_grid_picks_and_sintro_official_the_official_code(dataset):
    assert _betas(f"{dataset}/sintro") == PAPER_TABLE3[dataset] == SINTRO_BETAS[dataset]
    assert _betas(f"{dataset}/sintro-official") == OFFICIAL[dataset] == SINTRO_OFFICIAL_BETAS[dataset]
    sg, official = get_preset(f"{dataset}/sintro"), get_preset(f"{dataset}/sintro-official")
    assert official.name == f"{dataset}/sintro-official"
    # the same SG model and schedule: only the name and the three betas differ
    assert dataclasses.replace(official, name=sg.name, objective=sg.objective) == sg
    assert sg.prior.kind == "standard" and not sg.is_vae


@pytest.mark.parametrize("dataset", TOY_DATASETS)
def test_mog_presets_keep_the_official_betas_and_the_vae_its_own(dataset):
    for configuration in ("mog-fixed", "mog-fixed-lc", "mog-ip", "mog-ip-lc"):
        assert _betas(f"{dataset}/{configuration}") == OFFICIAL[dataset] == MOG_BETAS[dataset]
    vae = get_preset(f"{dataset}/vae")
    assert (vae.objective.beta_rec, vae.objective.beta_kl) == VAE[dataset] and vae.is_vae


def test_the_official_variant_is_2d_only_and_no_table1_configuration():
    assert list(CONFIGURATIONS) == ["vae", "sintro", "mog-fixed", "mog-fixed-lc", "mog-ip", "mog-ip-lc"]
    assert set(TOY_CONFIGURATIONS) == set(CONFIGURATIONS) | {"sintro-official"}
    official = sorted(k for k in PRESETS if k.endswith("/sintro-official"))
    assert official == sorted(f"{d}/sintro-official" for d in TOY_DATASETS)
    with pytest.raises(KeyError, match=r"'fmnist/sintro-official' is unknown"):
        get_preset("fmnist/sintro-official")


def test_list_presets_shows_the_paper_and_the_official_sg_presets(tmp_path, capsys):
    assert train_job.main(["--list-presets", "--output-dir", str(tmp_path / "out")]) == 0
    names = capsys.readouterr().out.splitlines()
    assert names == sorted(PRESETS)
    for dataset in TOY_DATASETS:
        assert f"{dataset}/sintro" in names and f"{dataset}/sintro-official" in names


def test_module_docstring_table_matches_the_presets():
    rows = {}
    for line in PRESETS_DOC.splitlines():
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        if cells and cells[0] in TOY_DATASETS:
            rows[cells[0]] = [tuple(float(x) for x in c.split(" / ")) for c in cells[1:]]
    assert set(rows) == set(TOY_DATASETS)
    for dataset, (sg, official, mog) in rows.items():
        assert (sg, official, mog) == (_betas(f"{dataset}/sintro"), _betas(f"{dataset}/sintro-official"),
                                       _betas(f"{dataset}/mog-ip-lc"))


def test_sharp_8gaussians_preset_is_ip_lc_with_small_beta_kl():
    from service.presets import PRESETS

    sharp, base = get_preset("8gaussians/mog-ip-lc-sharp"), get_preset("8gaussians/mog-ip-lc")
    assert (sharp.objective.beta_rec, sharp.objective.beta_kl, sharp.objective.beta_neg) == (0.2, 0.05, 0.15)
    assert sharp.prior == base.prior and sharp.schedule == base.schedule and sharp.name == "8gaussians/mog-ip-lc-sharp"
    assert "2spirals/mog-ip-lc-sharp" not in PRESETS  # measured on 8gaussians only


def test_modes_preset_is_the_sharp_preset_with_beta_rec_doubled():
    sharp, modes = get_preset("8gaussians/mog-ip-lc-sharp"), get_preset("8gaussians/mog-ip-lc-modes")
    assert (modes.objective.beta_rec, modes.objective.beta_kl, modes.objective.beta_neg) == (0.4, 0.05, 0.15)
    assert modes.objective.gamma == 1.0  # the paper's (gamma 0.5 measured: docs/modes.md)
    assert dataclasses.replace(modes.objective, beta_rec=sharp.objective.beta_rec) == sharp.objective
    assert modes.prior == sharp.prior and modes.schedule == sharp.schedule
    assert modes.name == "8gaussians/mog-ip-lc-modes"


def _only_betas_differ(name: str, base_name: str, betas: tuple[float, float, float]):
    """Preset ``name`` is ``base_name`` with beta_rec / beta_kl / beta_neg = ``betas``; nothing else differs but
    its name."""
    base, preset = get_preset(base_name), get_preset(name)
    assert (preset.objective.beta_rec, preset.objective.beta_kl, preset.objective.beta_neg) == betas
    assert dataclasses.replace(preset.objective, beta_rec=base.objective.beta_rec, beta_kl=base.objective.beta_kl,
                               beta_neg=base.objective.beta_neg) == base.objective
    assert dataclasses.replace(preset, name=base.name, objective=base.objective) == base
    return preset


def test_selected_preset_is_ip_lc_at_the_betas_of_the_staged_selection_files():
    """The preset, the stage-2 file's pick and the seeds file are one setting (the seeds file's trials are the
    selection's run with another seed)."""
    from service.spaces import load_space

    sel = _only_betas_differ("8gaussians/mog-ip-lc-selected", "8gaussians/mog-ip-lc", (0.8, 0.2, 1.0))
    spaces = Path(__file__).resolve().parents[1] / "tune_spaces"
    staged = load_space(spaces / "staged_8gaussians_mog_ip_lc_full.yaml")
    seeds = load_space(spaces / "seeds_8gaussians_mog_ip_lc_selected.yaml")
    picked = [v.config("full") for v in staged.variants]
    assert sel.objective in [c.objective for c in picked]
    assert {v.config("full").objective for v in seeds.variants} == {sel.objective}
    assert [v.overrides["seed"] for v in seeds.variants] == [1, 2]  # seed 0 is the selection's own run
    run = (spaces.parent / "Makefile").read_text().split("\nrun:")[1].split("\n\n")[0]
    assert "--preset 8gaussians/mog-ip-lc-selected --quick" in run  # make run trains it



def test_fixed_lc_selected_preset_is_the_fixed_prior_at_a_stage_2_setting_of_its_staged_file():
    """``mog-fixed-lc-selected`` is the fixed MoG with learnable weights (not trained with the decoder) at one of
    the settings that stage 1 of its staged file can hand to stage 2 (the grid holds it), and only the betas
    differ from ``mog-fixed-lc``; they are IP + LC's pure pick too."""
    from service.spaces import load_space

    base = get_preset("8gaussians/mog-fixed-lc")
    sel = _only_betas_differ("8gaussians/mog-fixed-lc-selected", "8gaussians/mog-fixed-lc", (0.8, 0.2, 1.0))
    assert (sel.prior.kind, sel.prior.learnable_weights, sel.prior.trainable) == ("mog", True, False)
    assert sel.objective == get_preset("8gaussians/mog-ip-lc-selected").objective
    staged = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / "staged_8gaussians_mog_fixed_lc.yaml")
    assert {v.preset for v in staged.variants} == {"8gaussians/mog-fixed-lc"}
    full = [v.config("full") for v in staged.variants]
    assert sel.objective in [c.objective for c in full] and all(c.prior == base.prior for c in full)
    seeds = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / "seeds_8gaussians_mog_fixed_lc_selected.yaml")
    assert {v.preset for v in seeds.variants} == {"8gaussians/mog-fixed-lc"}
    assert {v.config("full").objective for v in seeds.variants} == {sel.objective}
    assert [v.overrides["seed"] for v in seeds.variants] == [1, 2]  # seed 0 is stage 2's run


def test_protocol_preset_is_the_stage_2_setting_the_papers_criterion_picked():
    """``mog-ip-lc-protocol`` is IP + LC at the one stage-2 setting of the staged file that the paper's criterion
    (lowest KL, no purity bound) kept, and differs from ``mog-ip-lc`` in beta_neg only."""
    from service.spaces import load_space

    proto = _only_betas_differ("8gaussians/mog-ip-lc-protocol", "8gaussians/mog-ip-lc", (0.2, 0.3, 1.5))
    base = get_preset("8gaussians/mog-ip-lc").objective
    assert (base.beta_rec, base.beta_kl, base.beta_neg) == (0.2, 0.3, 0.9)  # beta_neg is the one beta that differs
    staged = load_space(Path(__file__).resolve().parents[1] / "tune_spaces" / "staged_8gaussians_mog_ip_lc_full.yaml")
    assert (staged.select.metric, staged.select.mode, staged.select.where) == ("hist_kl", "min", ())  # KL alone
    assert proto.objective in [v.config("full").objective for v in staged.variants]

def test_ex_post_preset_is_the_papers_ip_lc_with_the_refit_switched_on():
    base, ex_post = get_preset("8gaussians/mog-ip-lc"), get_preset("8gaussians/mog-ip-lc-ex-post")
    assert (ex_post.prior.ex_post, ex_post.prior.ex_post_noise) == ("em", 0.5)
    assert dataclasses.replace(ex_post.prior, ex_post="none") == base.prior  # training is the paper's
    assert (ex_post.objective, ex_post.schedule, ex_post.optim) == (base.objective, base.schedule, base.optim)
    assert ex_post.name == "8gaussians/mog-ip-lc-ex-post" and base.prior.ex_post == "none"


def test_gnelbo_preset_is_ip_lc_at_the_beta_kl_01_sweeps_last_setting():
    """The preset is the 1.0 / 0.1 / 0.2 setting of the sweep file its docstring names as the one that found it."""
    from service.spaces import load_space

    _only_betas_differ("8gaussians/mog-ip-lc-gnelbo", "8gaussians/mog-ip-lc", (1.0, 0.1, 0.2))
    spaces = Path(__file__).resolve().parents[1] / "tune_spaces"
    spec = load_space(spaces / "seeds_8gaussians_mog_ip_lc_beta_kl_01.yaml")
    settings = {(v.overrides["objective.beta_rec"], v.overrides["objective.beta_kl"], v.overrides["objective.beta_neg"])
                for v in spec.variants}
    assert (1.0, 0.1, 0.2) in settings and {v.overrides["seed"] for v in spec.variants} == {0, 1, 2}
    assert spec.select.metric == "gnelbo_x1e7" and ("modes_covered", 8, None) in spec.select.where
