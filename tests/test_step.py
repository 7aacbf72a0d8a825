"""Training steps (SPEC §2): which player moves in which step, learning-rate schedule, divergence."""

import dataclasses

import pytest
import torch

import service.step as step_module
from service.model import build_model
from service.presets import get_preset, smoke
from service.priors import MixturePrior
from service.step import TrainingDiverged, introspective_step, make_optimizers, vae_step

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(preset: str, prior_type: str | None = "mog", **objective):
    cfg = smoke(get_preset(preset))
    if objective:
        cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, **objective))
    init = torch.randn(cfg.prior.num_components, 2, generator=torch.Generator().manual_seed(1))
    model = build_model(cfg, (2,), init_points=init, prior_type=prior_type if cfg.prior.kind == "mog" else None)
    if isinstance(model.prior, MixturePrior):
        with torch.no_grad():  # distinct log-variances, so that the soft-clip range is not empty
            model.prior.logvars.copy_(0.3 * torch.randn(model.prior.logvars.shape))
        if cfg.prior.use_soft_clip:
            model.prior.init_clip_bounds()
    return cfg, model, make_optimizers(model, cfg)


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(32, 2, generator=torch.Generator().manual_seed(seed))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, after: dict, player: str) -> set[str]:
    """Names (without the player prefix) of the tensors of ``player`` that differ."""
    return {k.split(".", 1)[1] for k in before if k.startswith(player + ".") and not torch.equal(before[k], after[k])}


def _parameter_names(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


CONFIGURATIONS = ["8gaussians/sintro", "8gaussians/mog-fixed", "8gaussians/mog-fixed-lc", "8gaussians/mog-ip",
                  "8gaussians/mog-ip-lc"]


# --------------------------------------------------------------------------------------------
# Adversarial iteration (SPEC §2.2), by parameter snapshots around each of its two steps
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("r_entropy", [0.0, 1.0], ids=["r0", "r1"])
@pytest.mark.parametrize("preset", CONFIGURATIONS)
def test_encoder_step_moves_only_the_encoder_and_decoder_step_never_the_encoder(preset, r_entropy, monkeypatch):
    cfg, model, opt = _setup(preset, r_entropy=r_entropy)
    seen = {}
    original = step_module.decoder_prior_objective

    def after_encoder_step(model_, *args, **kwargs):  # runs between the two steps
        seen["state"] = _snapshot(model_)
        seen["grads"] = {n: p.grad for n, p in model_.named_parameters()}
        seen["prior_trains"] = kwargs["prior_trains"]
        return original(model_, *args, **kwargs)

    monkeypatch.setattr(step_module, "decoder_prior_objective", after_encoder_step)
    before = _snapshot(model)
    introspective_step(model, opt, _batch(), cfg, generator=torch.Generator().manual_seed(2), iteration=7)
    middle, after = seen["state"], _snapshot(model)

    # encoder step: every encoder parameter moves, nothing else; decoder and prior got no gradient
    assert _changed(before, middle, "encoder") == _parameter_names(model.encoder)
    assert _changed(before, middle, "decoder") == set() and _changed(before, middle, "prior") == set()
    assert all(g is None for n, g in seen["grads"].items() if not n.startswith("encoder."))

    # decoder + prior step: the encoder is frozen; the prior moves only in IP configurations
    trains = cfg.prior.trainable
    assert seen["prior_trains"] == trains
    assert _changed(middle, after, "encoder") == set()
    assert _changed(middle, after, "decoder") == _parameter_names(model.decoder)
    expected_prior = {"means", "logvars"} | ({"logits"} if cfg.prior.learnable_weights else set())
    assert _changed(middle, after, "prior") == (expected_prior if trains else set())


@pytest.mark.parametrize("preset", ["8gaussians/sintro", "8gaussians/mog-fixed", "8gaussians/mog-fixed-lc"])
def test_fixed_priors_never_change_in_the_adversarial_phase(preset):
    cfg, model, opt = _setup(preset)
    before = _snapshot(model)
    for it in range(4):
        introspective_step(model, opt, _batch(it), cfg, generator=torch.Generator().manual_seed(it), iteration=it)
    after = _snapshot(model)
    assert _changed(before, after, "prior") == set()
    assert _changed(before, after, "encoder") and _changed(before, after, "decoder")


def test_grad_sync_sees_each_steps_parameters():
    cfg, model, opt = _setup("8gaussians/mog-ip-lc")
    synced = []
    introspective_step(model, opt, _batch(), cfg, generator=torch.Generator().manual_seed(0),
                       grad_sync=lambda params: synced.append({id(p) for p in params}))
    prior = {id(p) for p in model.prior.trainable_parameters()}
    assert synced == [{id(p) for p in model.encoder.parameters()},
                      {id(p) for p in model.decoder.parameters()} | prior]


def test_adversarial_step_logs_both_objectives_and_prior_usage():
    cfg, model, opt = _setup("8gaussians/mog-ip-lc")
    out = introspective_step(model, opt, _batch(), cfg, generator=torch.Generator().manual_seed(0))
    for key in ("train/loss_encoder", "train/loss_decoder", "train/enc/kl_fake", "train/enc/exp_elbo_rec",
                "train/dec/kl_prior", "train/dec/rec_fake_rec", "prior/entropy_norm", "prior/active_components"):
        assert key in out, key
    assert 0.0 <= out["prior/entropy_norm"] <= 1.0 and 1 <= out["prior/active_components"] <= 8


# --------------------------------------------------------------------------------------------
# Warm-up iteration (SPEC §2.1)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,prior_type,moved", [
    ("8gaussians/sintro", None, set()),
    ("8gaussians/mog-ip", "vamp", {"pseudo_inputs"}),
    ("8gaussians/mog-ip-lc", "vamp", {"pseudo_inputs", "logits"}),
    ("8gaussians/mog-fixed", "mog", {"means", "logvars"}),  # warm-up trains even a prior fixed later
    ("8gaussians/mog-fixed-lc", "mog", {"means", "logvars", "logits"}),
])
def test_vae_step_trains_encoder_decoder_and_prior_jointly(preset, prior_type, moved):
    cfg, model, opt = _setup(preset, prior_type=prior_type)
    before = _snapshot(model)
    out = vae_step(model, opt, _batch(), cfg, generator=torch.Generator().manual_seed(0))
    after = _snapshot(model)
    assert _changed(before, after, "encoder") == _parameter_names(model.encoder)
    assert _changed(before, after, "decoder") == _parameter_names(model.decoder)
    assert _changed(before, after, "prior") == moved
    assert {"train/loss_vae", "train/rec_real", "train/kl_real"} <= set(out)
    assert ("prior/entropy_norm" in out) == model.prior.is_mixture


# --------------------------------------------------------------------------------------------
# Optimisers and learning rates (SPEC §5)
# --------------------------------------------------------------------------------------------

def test_optimizers_per_player_and_milestones_by_iteration():
    cfg, model, opt = _setup("8gaussians/mog-ip-lc")
    cfg = dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, lr=1e-3))
    opt = make_optimizers(model, cfg)
    assert [name for name, _ in opt.items()] == ["encoder", "decoder", "prior"]
    for it, factor in [(0, 1.0), (9, 1.0), (10, 0.1), (14, 0.1), (15, 0.01), (10_000, 0.01)]:
        opt.set_lr(it, milestones=(10, 15), decay=0.1)
        lrs = {name: o.param_groups[0]["lr"] for name, o in opt.items()}
        assert lrs == pytest.approx({"encoder": 2e-4 * factor, "decoder": 2e-4 * factor, "prior": 1e-3 * factor})
    _, sg_model, sg_opt = _setup("8gaussians/sintro")
    assert sg_opt.prior is None  # the standard Gaussian has nothing to train


# --------------------------------------------------------------------------------------------
# Divergence (SPEC §2): NaN/Inf stops the run before any parameter moves
# --------------------------------------------------------------------------------------------

def test_nan_batch_in_warm_up_raises_before_stepping():
    cfg, model, opt = _setup("8gaussians/mog-ip-lc", prior_type="vamp")
    before = _snapshot(model)
    x = _batch()
    x[3, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"loss_vae is nan at iteration 7.*raise objective\.beta_neg.*lr"):
        vae_step(model, opt, x, cfg, generator=torch.Generator().manual_seed(0), iteration=7)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_inf_batch_in_adversarial_phase_names_the_encoder_loss():
    cfg, model, opt = _setup("8gaussians/sintro")
    before = _snapshot(model)
    x = _batch()
    x[0, 1] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"loss_encoder is nan at iteration 12"):
        introspective_step(model, opt, x, cfg, generator=torch.Generator().manual_seed(0), iteration=12)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_diverged_decoder_loss_is_named_and_leaves_the_decoder_untouched(monkeypatch):
    cfg, model, opt = _setup("8gaussians/mog-ip")
    original = step_module.decoder_prior_objective

    def diverging(*args, **kwargs):
        loss, terms = original(*args, **kwargs)
        return loss * float("inf"), terms

    monkeypatch.setattr(step_module, "decoder_prior_objective", diverging)
    before = _snapshot(model)
    with pytest.raises(TrainingDiverged, match=r"loss_decoder is (inf|-inf|nan) at iteration 3"):
        introspective_step(model, opt, _batch(), cfg, generator=torch.Generator().manual_seed(0), iteration=3)
    after = _snapshot(model)
    assert _changed(before, after, "decoder") == set() and _changed(before, after, "prior") == set()
