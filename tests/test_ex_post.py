"""The ex-post refit of a mixture prior (service/ex_post.py, jobs/refit.py): EM against known mixtures and a
float64 reference, determinism, the training loop's final refit, the command line and its bad input."""

import json
import math

import pytest
import torch
from torch import nn

from jobs import refit as refit_job
from service import checkpoint
from service.config import ConfigError, apply_overrides, load_yaml
from service.data import make_source
from service.ex_post import VAR_FLOOR, _log_joint, fit_mixture, kmeans_pp, latent_points, refit_prior
from service.loop import train
from service.model import Model
from service.presets import get_preset, smoke
from service.priors import MixturePrior, StandardNormalPrior
from service.tracking import MetricSink

TRUE_MEANS = torch.tensor([[-4.0, 0.0], [3.0, 3.0], [3.0, -3.0]], dtype=torch.float64)
TRUE_STD = torch.tensor([[0.5, 0.3], [0.2, 0.6], [0.4, 0.4]], dtype=torch.float64)
TRUE_W = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def _mixture_sample(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(TRUE_W, n, replacement=True, generator=g)
    return TRUE_MEANS[k] + TRUE_STD[k] * torch.randn(n, 2, generator=g, dtype=torch.float64), k


def _true_loglik(z: torch.Tensor) -> float:
    comp = torch.distributions.Normal(TRUE_MEANS, TRUE_STD)
    lp = comp.log_prob(z[:, None, :]).sum(-1) + TRUE_W.log()
    return float(torch.logsumexp(lp, 1).mean())


def _sorted(means, logvars, log_w):
    order = torch.argsort(means[:, 0] * 10 + means[:, 1])
    return means[order], logvars[order], log_w[order]


def test_em_recovers_a_known_mixture_and_its_likelihood():
    z, _ = _mixture_sample(20_000)
    means, logvars, log_w, loglik = fit_mixture(z, 3, iterations=60, generator=torch.Generator().manual_seed(1))
    means, logvars, log_w = _sorted(means, logvars, log_w)
    t_means, t_std, t_w = _sorted(TRUE_MEANS, TRUE_STD.log() * 2, TRUE_W.log())
    assert torch.allclose(means, t_means, atol=0.03)
    assert torch.allclose(torch.exp(0.5 * logvars), torch.exp(0.5 * t_std), rtol=0.05)
    assert torch.allclose(log_w.exp(), t_w.exp(), atol=0.015)
    assert abs(loglik - _true_loglik(z)) < 0.01  # the maximum-likelihood fit is at least as likely as the truth
    assert loglik >= _true_loglik(z) - 1e-3


def test_uniform_weights_stay_uniform():
    z, _ = _mixture_sample(5_000)
    _, _, log_w, _ = fit_mixture(z, 3, iterations=20, generator=torch.Generator().manual_seed(1), fit_weights=False)
    assert torch.equal(log_w, torch.full((3,), -math.log(3), dtype=torch.float64))


@pytest.mark.parametrize("logvar, scale", [(0.0, 1.0), (-4.0, 3.0), (-9.0, 5.0)])
def test_log_joint_matches_a_centred_float64_reference_for_sharp_components(logvar, scale):
    g = torch.Generator().manual_seed(3)
    means = scale * torch.randn(16, 4, generator=g, dtype=torch.float64)
    logvars = logvar + 0.5 * torch.randn(16, 4, generator=g, dtype=torch.float64)
    log_w = torch.log_softmax(torch.randn(16, generator=g, dtype=torch.float64), 0)
    z = means[torch.randint(16, (3_000,), generator=g)] + torch.exp(0.5 * logvars[0]) * torch.randn(3_000, 4, generator=g, dtype=torch.float64)
    ref = (log_w - 0.5 * (((z[:, None] - means) ** 2) / logvars.exp() + logvars + math.log(2 * math.pi)).sum(-1))
    got = _log_joint(z, means, logvars, log_w)
    near = ref > ref.max(1, keepdim=True).values - 50  # the entries that carry responsibility
    assert torch.allclose(got[near], ref[near], rtol=1e-9, atol=1e-6)


def test_kmeans_pp_picks_distinct_rows_and_is_seeded():
    z, _ = _mixture_sample(2_000)
    a = kmeans_pp(z, 8, torch.Generator().manual_seed(5))
    b = kmeans_pp(z, 8, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and len({tuple(r.tolist()) for r in a}) == 8


def test_an_emptied_component_keeps_finite_parameters():
    z = torch.cat([torch.zeros(500, 2), torch.ones(500, 2)]).double()  # two points, repeated: variance 0
    means, logvars, log_w, _ = fit_mixture(z, 4, iterations=30, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(means).all() and torch.isfinite(logvars).all() and torch.isfinite(log_w).all()
    assert float(logvars.min()) >= math.log(VAR_FLOOR) - 1e-12
    assert abs(float(log_w.exp().sum()) - 1) < 1e-9


class _Encoder(nn.Module):
    """mu = 2 x, log-variance log(0.25): a latent space whose aggregate posterior is known."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.scale * x, torch.full_like(x, math.log(0.25))


class _Source:
    def sample(self, n, generator):
        k = torch.multinomial(TRUE_W.float(), n, replacement=True, generator=generator)
        return TRUE_MEANS.float()[k] / 2 + 0.01 * torch.randn(n, 2, generator=generator), k


def _model(m=3, learnable=True):
    return Model(_Encoder(), nn.Identity(), MixturePrior(m, 2, learnable_weights=learnable))


@pytest.mark.parametrize("noise, std", [(0.0, 0.02), (1.0, math.sqrt(0.25 + 0.02 ** 2))])
def test_refit_fits_posterior_means_or_samples_as_told(noise, std):
    cfg = apply_overrides(get_preset("8gaussians/mog-ip-lc"), ["prior.ex_post=em", f"prior.ex_post_noise={noise}",
                                                                "prior.ex_post_points=8000", "prior.ex_post_iterations=50"])
    model = _model()
    model.prior.init_clip_bounds()
    fig = refit_prior(model, _Source(), cfg)
    p = model.prior
    assert not bool(p.clip_on) and fig["ex_post/points"] == 8000
    means, logvars, log_w = _sorted(p.means.detach().double(), p.logvars.detach().double(), p.logits.detach().double())
    t_means, _, t_w = _sorted(TRUE_MEANS, TRUE_STD, TRUE_W.log())
    assert torch.allclose(means, t_means, atol=0.05)
    assert torch.allclose(torch.exp(0.5 * logvars), torch.full_like(logvars, std), rtol=0.08)
    assert torch.allclose(log_w.exp(), t_w.exp(), atol=0.03)
    again = _model()
    refit_prior(again, _Source(), cfg)
    assert torch.equal(again.prior.means, model.prior.means)  # deterministic: its own seeded stream


def test_refit_refuses_a_standard_prior():
    cfg = apply_overrides(get_preset("8gaussians/mog-ip-lc"), ["prior.ex_post=em"])
    with pytest.raises(ValueError, match="prior.ex_post: needs a mixture prior"):
        refit_prior(Model(_Encoder(), nn.Identity(), StandardNormalPrior(2)), _Source(), cfg)


def test_latent_points_with_noise_zero_are_the_posterior_means():
    x = torch.randn(100, 2)
    z = latent_points(_Encoder(), x, 0.0, torch.Generator().manual_seed(0))
    assert z.dtype == torch.float64 and torch.allclose(z, 2 * x.double())


@pytest.mark.parametrize("overrides, message", [
    (["prior.ex_post=kmeans"], "prior.ex_post: 'kmeans' is not one of ['none', 'em']"),
    (["prior.ex_post_noise=1.5"], "prior.ex_post_noise: 1.5 is out of range; allowed [0, 1]"),
    (["prior.ex_post=em", "prior.ex_post_points=10"], "prior.ex_post_points: 10 is out of range; allowed [prior.num_components = 64"),
    (["prior.ex_post_iterations=0"], "prior.ex_post_iterations: 0 is out of range"),
])
def test_bad_ex_post_settings_name_the_field_and_the_allowed_values(overrides, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("8gaussians/mog-ip-lc"), overrides)
    assert message in str(e.value)


def test_a_standard_prior_cannot_ask_for_an_ex_post_refit():
    with pytest.raises(ConfigError, match="prior.ex_post: only allowed with prior.kind='mog'"):
        apply_overrides(get_preset("8gaussians/sintro"), ["prior.ex_post=em"])


class _Sink(MetricSink):
    def __init__(self):
        self.logged = []

    def log_metrics(self, step, metrics):
        self.logged.append((step, dict(metrics)))


def test_training_with_ex_post_refits_once_at_the_end_and_the_checkpoint_serves_it(one_thread, tmp_path):
    cfg = apply_overrides(smoke(get_preset("8gaussians/mog-ip-lc")),
                          ["prior.ex_post=em", "prior.ex_post_noise=0.3", "prior.ex_post_points=2000"])
    sink = _Sink()
    res = train(cfg, make_source(cfg.data), sink=sink)
    fits = [(s, m) for s, m in sink.logged if "ex_post/loglik" in m]
    assert len(fits) == 1 and fits[0][0] == cfg.schedule.iterations and math.isfinite(fits[0][1]["ex_post/loglik"])
    path = checkpoint.save(tmp_path / "checkpoint.pt", res.state)
    restored_cfg, model = checkpoint.restore_model(checkpoint.load(path))
    assert restored_cfg.prior.ex_post == "em" and not bool(model.prior.clip_on)
    # the refit is what was evaluated and saved: refitting the restored model again changes nothing
    before = model.prior.means.clone()
    refit_prior(model, make_source(cfg.data), restored_cfg)
    assert torch.allclose(model.prior.means, before, atol=1e-6)


def test_refit_command_writes_a_servable_checkpoint(one_thread, smoke_checkpoint, tmp_path, capsys):
    out = tmp_path / "refit"
    assert refit_job.main(["--checkpoint", str(smoke_checkpoint), "--noise", "0.25", "--points", "2000",
                           "--iterations", "20", "--output-dir", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"checkpoint", "before", "after"} and "mode_purity" in printed["after"]
    state = checkpoint.load(out / "checkpoint.pt")
    cfg, model = checkpoint.restore_model(state)
    assert (cfg.prior.ex_post, cfg.prior.ex_post_noise, cfg.prior.ex_post_points) == ("em", 0.25, 2000)
    assert state["extra"]["ex_post_from"] == str(smoke_checkpoint.resolve())
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(state["extra"]["metrics"])
    assert (out / "latent.png").is_file()
    assert load_yaml(str(out / "config.yaml")) == cfg  # the refit's config beside its checkpoint
    original = checkpoint.restore_model(checkpoint.load(smoke_checkpoint))[1]
    assert not torch.equal(original.prior.means, model.prior.means)
    for k, v in original.decoder.state_dict().items():  # only the prior changed
        assert torch.equal(model.decoder.state_dict()[k], v)
    from service.serving_model import Sampler
    from service.serving_schema import SamplesRequest, ServeArgs

    sampler = Sampler.from_checkpoint(out / "checkpoint.pt", ServeArgs(checkpoint=str(out / "checkpoint.pt")))
    rows = sampler.modes()  # the refit prior, with the purity measured on it
    assert [r["mean"] for r in rows] == model.prior.means.tolist()
    assert [r["purity"] for r in rows] == pytest.approx(state["extra"]["mode_purity"], nan_ok=True)
    (result,) = sampler.sample_batch([SamplesRequest(n=5, mode=0, seed=1)])
    assert result.x.shape == (5, 2) and torch.isfinite(result.x).all() and set(result.component.tolist()) == {0}


def test_refit_command_replaces_its_own_results_but_not_another_runs(one_thread, smoke_checkpoint, tmp_path, capsys):
    out, flags = tmp_path / "refit", ["--points", "500", "--iterations", "5", "--no-before"]
    assert refit_job.main(["--checkpoint", str(smoke_checkpoint), "--output-dir", str(out), *flags]) == 0
    assert refit_job.main(["--checkpoint", str(smoke_checkpoint), "--output-dir", str(out), *flags]) == 0  # the same
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert refit_job.main(["--checkpoint", str(smoke_checkpoint), "--output-dir", str(out), "--noise", "0.75", *flags]) == 2
    err = capsys.readouterr().err
    assert "holds the results of another experiment" in err and "prior.ex_post_noise: 0.5 -> 0.75" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_refit_command_bad_input_exits_2_naming_the_problem(one_thread, smoke_checkpoint, tmp_path, capsys):
    assert refit_job.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert refit_job.main(["--checkpoint", str(smoke_checkpoint), "--noise", "3", "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--noise" in err and "allowed [0, 1]" in err and not (tmp_path / "x").exists()
    for flags in (["--model-name", "other"], ["--no-register"], ["--run-name", "r"]):  # MLflow flags need a store
        assert refit_job.main(["--checkpoint", str(smoke_checkpoint), "--output-dir", str(tmp_path / "y"), *flags]) == 2
        assert "give --tracking-uri too" in capsys.readouterr().err and not (tmp_path / "y").exists()
    cfg = smoke(get_preset("8gaussians/sintro"))
    sg = checkpoint.save(tmp_path / "sg.pt", train(cfg, make_source(cfg.data)).state)
    assert refit_job.main(["--checkpoint", str(sg)]) == 2
    assert "needs a mixture" in capsys.readouterr().err


def test_refit_command_logs_an_mlflow_run_with_a_servable_model(one_thread, smoke_checkpoint, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert refit_job.main(["--checkpoint", str(smoke_checkpoint), "--points", "1000", "--iterations", "10", "--no-before",
                           "--output-dir", str(tmp_path / "out"), "--tracking-uri", uri, "--run-name", "refit-a"]) == 0
    printed = json.loads(capsys.readouterr().out)
    run = MlflowClient(uri).get_run(printed["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "refit-a"
    assert run.data.params["prior.ex_post"] == "em" and run.data.params["prior.ex_post_noise"] == "0.5"
    assert run.data.metrics["eval/mode_purity"] == pytest.approx(printed["after"]["mode_purity"])
    assert run.data.metrics["ex_post/points"] == 1000 and run.data.tags["ex_post.source"] == str(smoke_checkpoint.resolve())
    files = {f.path for f in MlflowClient(uri).list_artifacts(run.info.run_id)}
    assert {"checkpoint", "metrics.json", "latent.png"} <= files
    import mlflow
    import pandas as pd

    from service.mlflow_model import MODEL_NAME, default_model_name, using_store

    with using_store(uri):  # the logged pyfunc samples the refit prior's components
        out = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/{MODEL_NAME}").predict(
            pd.DataFrame({"n": [3], "mode": [1], "seed": [5]}))
    assert len(out) == 3 and set(out["component"]) == {1}
    # registered as a new version of the model the training run's config names
    name = checkpoint.load(smoke_checkpoint)["config"]["tracking"]["model_name"] or default_model_name(
        checkpoint.load(smoke_checkpoint)["config"]["name"])
    assert printed["registered_model"] == f"models:/{name}/1"
    assert MlflowClient(uri, registry_uri=uri).get_model_version(name, "1").run_id == run.info.run_id
