"""The training loop in process (no Ray): phases, clip bounds, schedule, determinism, resume, divergence."""

import copy
import dataclasses
import math

import pytest
import torch

import service.loop as loop_module
from service import checkpoint
from service.data import PointSource, make_source
from service.loop import train
from service.presets import get_preset, smoke
from service.step import TrainingDiverged
from service.tracking import GNELBO_METRICS, MemorySink

pytestmark = pytest.mark.usefixtures("one_thread")

PRESET = "8gaussians/mog-ip-lc"  # smoke: 12 iterations, warm-up 6, conversion at 4, milestone 9, M = 8


def _cfg(preset: str = PRESET, **overrides):
    cfg = smoke(get_preset(preset))
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(one_thread):
    """One smoke run with spies on both step functions, a memory sink and kept checkpoints."""
    cfg = _cfg()
    calls, checkpoints, sink = [], [], MemorySink()

    def spy(kind, original):
        def step(model, opt, x, cfg_, **kw):
            prior = model.prior
            calls.append({"it": kw["iteration"], "kind": kind, "prior": type(prior).__name__,
                          "clip_on": bool(getattr(prior, "clip_on", False)),
                          "adam_states": len(opt.encoder.state), "optimizers": [n for n, _ in opt.items()],
                          "logvars": prior.logvars.detach().clone() if hasattr(prior, "logvars") else None,
                          "clip": (prior.clip_lo.clone(), prior.clip_hi.clone()) if hasattr(prior, "clip_lo") else None})
            return original(model, opt, x, cfg_, **kw)
        return step

    def keep(state, iteration, metrics, final):
        checkpoints.append((iteration, final, copy.deepcopy(state)))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_module, "vae_step", spy("vae", loop_module.vae_step))
        mp.setattr(loop_module, "introspective_step", spy("adv", loop_module.introspective_step))
        result = train(cfg, make_source(cfg.data), sink=sink, on_checkpoint=keep)
    return cfg, result, calls, checkpoints, sink


# --------------------------------------------------------------------------------------------
# Phases (SPEC §2, §3.4, §4)
# --------------------------------------------------------------------------------------------

def test_warm_up_conversion_and_adversarial_phase_happen_in_order(reference):
    cfg, result, calls, _, _ = reference
    assert cfg.conversion_iteration == 4 and cfg.schedule.warmup == 6 and cfg.schedule.iterations == 12
    assert [c["it"] for c in calls] == list(range(12))
    assert [(c["kind"], c["prior"]) for c in calls] == (
        [("vae", "VampPrior")] * 4 + [("vae", "MixturePrior")] * 2 + [("adv", "MixturePrior")] * 6)
    # the conversion resets every Adam state (fresh optimisers, the prior's now over the MoG)
    assert calls[3]["adam_states"] > 0 and calls[4]["adam_states"] == 0 and calls[5]["adam_states"] > 0
    assert all(c["optimizers"] == ["encoder", "decoder", "prior"] for c in calls)
    assert result.iteration == 12 and set(result.metrics) >= {"gnelbo_x1e7", "hist_kl", "hist_jsd",
                                                               "prior_entropy_norm", "prior_active_components"}


def test_clip_bounds_are_taken_at_the_first_adversarial_iteration_and_saved(reference):
    _, result, calls, checkpoints, _ = reference
    assert not any(c["clip_on"] for c in calls[:6]) and all(c["clip_on"] for c in calls[6:])
    first = calls[6]
    lo, hi = first["clip"]
    assert torch.equal(lo, first["logvars"].min(0).values) and torch.equal(hi, first["logvars"].max(0).values)
    assert (hi > lo).all()
    prior = result.model.prior
    assert torch.equal(prior.clip_lo, lo) and torch.equal(prior.clip_hi, hi)  # frozen while the raw values move
    assert not torch.equal(prior.logvars.detach(), first["logvars"])
    final_state = checkpoints[-1][2]["model"]
    assert bool(final_state["prior.clip_on"]) and torch.equal(final_state["prior.clip_lo"], lo)


def test_fixed_prior_runs_without_soft_clip():
    cfg = _cfg("8gaussians/mog-fixed")
    result = train(cfg, make_source(cfg.data))
    assert not cfg.prior.use_soft_clip and not bool(result.model.prior.clip_on)


def test_learning_rate_decays_at_the_milestone_iteration(reference):
    cfg, _, _, _, sink = reference
    assert cfg.optim.milestones == (9,) and cfg.schedule.log_every == 1
    lrs = {step: m["train/lr"] for step, m in sink.metrics if "train/lr" in m}
    # MultiStepLR stepped every iteration: iterations 0..8 (logged as steps 1..9) at 2e-4, then 2e-5
    assert lrs == pytest.approx({s: 2e-4 if s <= 9 else 2e-5 for s in range(1, 13)})


def test_checkpoints_at_their_interval_and_at_the_end(reference):
    _, _, _, checkpoints, _ = reference
    assert [(it, final) for it, final, _ in checkpoints] == [(6, False), (12, True)]
    assert checkpoints[0][2]["iteration"] == 6 and checkpoints[0][2]["prior_type"] == "mog"


# --------------------------------------------------------------------------------------------
# Determinism and resume (SPEC §5)
# --------------------------------------------------------------------------------------------

def test_same_seed_gives_identical_parameters_and_another_seed_does_not(reference):
    cfg, result, _, _, _ = reference
    expected = _params(result.model)
    again = train(cfg, make_source(cfg.data))
    assert all(torch.equal(v, expected[k]) for k, v in _params(again.model).items())
    assert again.metrics == result.metrics
    other = train(dataclasses.replace(cfg, seed=1), make_source(cfg.data))
    assert any(not torch.equal(v, expected[k]) for k, v in _params(other.model).items() if k.startswith("encoder."))


def test_evaluation_cadence_logs_eval_metrics_and_leaves_training_unchanged(reference):
    """``schedule.eval_every`` evaluates during training (VampPrior before the conversion, MoG
    after) without touching the training random streams: the final parameters are bit-identical."""
    cfg, result, _, _, _ = reference
    cadenced = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, eval_every=4))
    sink = MemorySink()
    again = train(cadenced, make_source(cfg.data), sink=sink)
    evals = [(step, m) for step, m in sink.metrics if any(k.startswith("eval/") for k in m)]
    assert [step for step, _ in evals] == [4, 8, 12]
    for _, m in evals:
        assert {"eval/gnelbo_x1e7", "eval/hist_kl", "eval/hist_jsd", "eval/prior_entropy_norm"} <= set(m)
        assert all(math.isfinite(v) for v in m.values())
        # the gnELBO from its two parts: mean_data W / (G^2 mean_grid W + N mean_data W)
        data_w, grid_w, ev = m["eval/gnelbo_data_energy"], m["eval/gnelbo_grid_energy"], cfg.eval
        expected = 1e7 * data_w / (ev.grid_size ** 2 * grid_w + ev.data_points * data_w)
        assert m["eval/gnelbo_x1e7"] == pytest.approx(expected, rel=1e-9)
    assert evals[-1][1] == {f"eval/{k}": v for k, v in result.metrics.items()}
    expected = _params(result.model)
    assert all(torch.equal(v, expected[k]) for k, v in _params(again.model).items())


@pytest.mark.parametrize("preset", [PRESET, "8gaussians/sintro"])
def test_intermediate_evaluations_without_the_gnelbo_keep_every_other_number(preset):
    """``eval.intermediate_gnelbo = false`` (a selection stage's saving): the evaluations during training
    leave out ``gnelbo_x1e7`` only, every other metric is the same number as with it (the gnELBO's random
    draws are still taken: MC KL for the mixture, closed form for SG), and the final evaluation keeps it."""
    cfg = _cfg(preset)
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, eval_every=4),
                              eval=dataclasses.replace(cfg.eval, grid_size=64))
    runs = {}
    for flag in (True, False):
        sink = MemorySink()
        c = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, intermediate_gnelbo=flag))
        result = train(c, make_source(c.data), sink=sink)
        runs[flag] = ({step: m for step, m in sink.metrics if any(k.startswith("eval/") for k in m)}, result)
    (with_, full), (without, lean) = runs[True], runs[False]
    assert sorted(with_) == sorted(without) == [4, 8, 12]
    for step in (4, 8):
        gnelbo = {f"eval/{k}" for k in GNELBO_METRICS}
        assert gnelbo <= set(with_[step]) and not gnelbo & set(without[step])
        assert without[step] == {k: v for k, v in with_[step].items() if k not in gnelbo}
        assert {"eval/hist_kl", "eval/hist_jsd"} <= set(without[step])
    assert without[12] == with_[12] and lean.metrics == full.metrics and "gnelbo_x1e7" in lean.metrics


def test_resuming_from_a_checkpoint_continues_bit_for_bit(reference):
    cfg, result, _, checkpoints, _ = reference
    _, _, mid = checkpoints[0]
    resumed = train(cfg, make_source(cfg.data), resume=mid)
    expected = _params(result.model)
    assert all(torch.equal(v, expected[k]) for k, v in _params(resumed.model).items())


def test_checkpoints_carry_every_ranks_generator_states(reference):
    _, _, _, checkpoints, _ = reference
    for _, _, state in checkpoints:  # one process: rank 0's streams, the same as state["generators"]
        (ranks,) = state["extra"]["rank_generators"]
        assert ranks.keys() == state["generators"].keys()
        assert all(torch.equal(ranks[k], state["generators"][k]) for k in ranks)


def test_other_ranks_continue_their_saved_streams_when_the_world_size_is_unchanged():
    cfg = _cfg()
    saved = [{k: g.get_state() for k, g in loop_module._generators(cfg, r, torch.device("cpu")).items()}
             for r in range(2)]
    mid = loop_module._generators(cfg, 1, torch.device("cpu"))
    for g in mid.values():
        torch.rand(5, generator=g)
    saved[1] = {k: g.get_state() for k, g in mid.items()}
    expected = {k: torch.rand(3, generator=g) for k, g in mid.items()}

    same = loop_module._generators(cfg, 1, torch.device("cpu"))
    loop_module._restore_generators(same, saved[0], cfg, 1, 6, rank_states=saved, world_size=2)
    assert all(torch.equal(torch.rand(3, generator=g), expected[k]) for k, g in same.items())

    for states, world in ((saved, 3), (None, 2)):  # other world size, or an older checkpoint: reseeded
        other = loop_module._generators(cfg, 1, torch.device("cpu"))
        loop_module._restore_generators(other, saved[0], cfg, 1, 6, rank_states=states, world_size=world)
        reseeded = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1 + 7_919 * 6)
        assert torch.equal(torch.rand(3, generator=other["data"]), torch.rand(3, generator=reseeded))


# --------------------------------------------------------------------------------------------
# Divergence (SPEC §2)
# --------------------------------------------------------------------------------------------

def test_a_learning_rate_that_diverges_raises_training_diverged():
    cfg = _cfg("8gaussians/sintro")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr_encoder=1e6, lr_decoder=1e6))
    with pytest.raises(TrainingDiverged, match=r"loss_vae is nan at iteration 1; .*raise objective\.beta_neg"):
        train(cfg, make_source(cfg.data))


def test_nan_in_a_batch_stops_the_run_and_the_last_checkpoint_stays_good(tmp_path):
    cfg = _cfg()
    toy = make_source(cfg.data)
    batches = []

    def sampler(n, generator):
        x, labels = toy.sample(n, generator)
        if n == cfg.data.batch_size:
            batches.append(n)
            if len(batches) == 9:  # the batch of iteration 8, in the adversarial phase
                x = x.clone()
                x[0, 0] = float("nan")
        return x, labels

    path = tmp_path / "checkpoint.pt"
    with pytest.raises(TrainingDiverged, match=r"loss_encoder is nan at iteration 8"):
        train(cfg, PointSource(toy.name, toy.eval_range, sampler),
              on_checkpoint=lambda state, it, metrics, final: checkpoint.save(path, state))
    state = checkpoint.load(path)
    assert state["iteration"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
