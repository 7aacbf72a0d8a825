"""The calibrated Gaussian decoder: ``sampling.decoder_sigma`` against closed forms, the evaluation's
``hist_kl_calibrated`` on a decoder that maps each mode onto its centre (what trained MoG models do on
8gaussians), and serving's ``decoder_noise`` (same draws as ``sampling.sample``; refused without sigma)."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest
import torch
from torch import Tensor, nn

from service import checkpoint
from service.data import make_source, sample_toy
from service.evaluation import calibrated_metrics
from service.metrics.density import histogram_kl
from service.model import Model
from service.presets import get_preset
from service.priors import MixturePrior
from service.sampling import add_decoder_noise, decoder_sigma, sample
from service.serving import Limits, RequestError, Sampler, SamplesRequest, ServeArgs, make_api, sample_many
from service.serving_model import stored_decoder_sigma

pytestmark = pytest.mark.usefixtures("one_thread")

CENTRES = 2.0 * torch.tensor([(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)] + [
    (a / math.sqrt(2.0), b / math.sqrt(2.0)) for a, b in ((1, 1), (-1, 1), (1, -1), (-1, -1))]) / 1.414
MODE_STD = 0.02 / 1.414  # per coordinate: the generator's N(0, 0.02^2), divided by 1.414 (SPEC §6.1)


class NearestCentreEncoder(nn.Module):
    """x -> the latent (k, 0) of its nearest 8gaussians centre k, with a tiny posterior variance."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k = torch.cdist(x, CENTRES).argmin(1).float()
        mu = torch.stack([k, torch.zeros_like(k)], 1)
        return mu, torch.full_like(mu, -20.0)


class CentreDecoder(nn.Module):
    """Latent (k + noise, .) -> centre k exactly: every latent of a mode decodes to one point."""

    def forward(self, z: Tensor) -> Tensor:
        return CENTRES[z[:, 0].round().long().clamp(0, 7)]


class ConstantDecoder(nn.Module):
    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value

    def forward(self, z: Tensor) -> Tensor:
        return self.value.expand(z.shape[0], -1)


def collapsed_model() -> Model:
    prior = MixturePrior(8, 2)
    with torch.no_grad():
        prior.means.copy_(torch.stack([torch.arange(8.0), torch.zeros(8)], 1))
        prior.logvars.fill_(-8.0)  # sigma 0.018: a component's latents round to its own index
    return Model(NearestCentreEncoder(), CentreDecoder(), prior)


def test_decoder_sigma_of_a_constant_decoder_is_the_rms_deviation_in_float64():
    x, _ = sample_toy("8gaussians", 10_000, torch.Generator().manual_seed(0))
    c = torch.tensor([0.25, -0.5])
    model = Model(NearestCentreEncoder(), ConstantDecoder(c), MixturePrior(8, 2))
    expected = math.sqrt(float((x.double() - c.double()).pow(2).mean()))
    # chunks of 4,096 points: the sum runs over several chunks and is exact in float64
    assert decoder_sigma(model, x, torch.Generator().manual_seed(1)) == pytest.approx(expected, rel=1e-6)


def test_decoder_sigma_of_a_decoder_that_returns_each_modes_centre_is_the_modes_std():
    x, _ = sample_toy("8gaussians", 40_000, torch.Generator().manual_seed(2))
    sigma = decoder_sigma(collapsed_model(), x, torch.Generator().manual_seed(3))
    assert sigma == pytest.approx(MODE_STD, rel=0.02)  # s.e. of an RMS over 80,000 values: 0.25 %


def test_decoder_noise_is_drawn_after_the_latents_from_the_same_generator():
    model = collapsed_model()
    x0, z0, idx0 = sample(model, 500, seed=5)
    g = torch.Generator().manual_seed(5)
    x1, z1, idx1 = sample(model, 500, generator=g, decoder_sigma=0.3)
    assert torch.equal(z0, z1) and torch.equal(idx0, idx1)
    g_ref = torch.Generator().manual_seed(5)
    model.prior.sample(500, g_ref)  # the latents' draws
    assert torch.allclose(x1, x0 + 0.3 * torch.randn(x0.shape, generator=g_ref), atol=1e-6)
    assert torch.equal(add_decoder_noise(x0, 0.0, g), x0)  # sigma 0: the mean, no draw


def test_calibrated_metrics_close_the_gap_that_a_collapsed_decoder_opens_in_the_means_metrics():
    cfg = get_preset("8gaussians/mog-ip-lc")  # the paper's 5,000 points per histogram, 12,800 for sigma
    src = make_source(cfg.data)
    model = collapsed_model()
    data = src.sample(cfg.eval.data_points, torch.Generator().manual_seed(4))[0]
    m = calibrated_metrics(model, src, cfg, data)
    assert m["decoder_sigma"] == pytest.approx(MODE_STD, rel=0.05)
    # the decoder means put each mode in one histogram bin: KL(data || model) is far above the
    # estimator's real-vs-real floor (SPEC §6.5: 0.68 for 8gaussians at 5,000 points)
    g = torch.Generator().manual_seed(6)
    real = src.sample(cfg.eval.hist_samples, g)[0].numpy()
    means = sample(model, cfg.eval.hist_samples, generator=g)[0].numpy()
    assert histogram_kl(real, means, src.eval_range, cfg.eval.bins) > 20
    # with the calibrated noise the samples are the data's distribution: KL near the floor
    assert m["hist_kl_calibrated"] < 1.0 and m["hist_jsd_calibrated"] < 0.5  # floors 0.68, 0.27


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------

def _sampler(metrics: dict) -> Sampler:
    state = {"config": {"name": "8gaussians/hand-built", "data": {"dataset": "8gaussians"}}, "iteration": 1,
             "data_shape": [2], "schema_version": checkpoint.SCHEMA_VERSION, "extra": {"metrics": metrics}}
    return Sampler(collapsed_model(), state, ServeArgs(checkpoint="in-memory", max_samples=5000),
                   path="in-memory", sha256="0" * 64)


@pytest.mark.parametrize("metrics, expected", [
    ({"decoder_sigma": 0.0141}, 0.0141), ({}, None), ({"decoder_sigma": float("nan")}, None),
    ({"decoder_sigma": -1.0}, None), ({"decoder_sigma": True}, None), ({"decoder_sigma": "0.1"}, None),
])
def test_stored_decoder_sigma_is_a_finite_non_negative_number_or_absent(metrics, expected):
    assert stored_decoder_sigma({"extra": {"metrics": metrics}}, (2,)) == expected
    assert stored_decoder_sigma({"extra": {"metrics": metrics}}, (1, 28, 28)) is None  # images: never


def test_served_decoder_noise_equals_sampling_sample_and_has_the_stored_spread():
    sampler = _sampler({"decoder_sigma": 0.05})
    noisy, mean = sample_many(sampler.model, [SamplesRequest(n=4000, mode=2, seed=9, decoder_noise=True),
                                              SamplesRequest(n=4000, mode=2, seed=9)], decoder_sigma=0.05)
    x, _, _ = sample(sampler.model, 4000, component=2, seed=9, decoder_sigma=0.05)
    assert torch.allclose(noisy.x, x) and torch.equal(noisy.z, mean.z)
    assert torch.equal(mean.x, CENTRES[2].expand(4000, 2))  # no noise unless asked
    assert (noisy.x - mean.x).std().item() == pytest.approx(0.05, rel=0.03)
    assert sampler.info()["decoder_sigma"] == 0.05


def test_decoder_noise_is_refused_naming_the_field_when_the_model_has_no_sigma():
    with pytest.raises(RequestError, match=r"^decoder_noise: this model has no calibrated decoder sigma .*allowed false$"):
        SamplesRequest(n=4, decoder_noise=True).check(Limits(10, 10, 10, 8, (2,)))
    SamplesRequest(n=4, decoder_noise=True).check(Limits(10, 10, 10, 8, (2,), decoder_sigma=0.1))

    async def calls(sampler):
        transport = httpx.ASGITransport(app=make_api(sampler))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post("/v1/samples", json=body) for body in (
                {"n": 8, "seed": 1, "decoder_noise": True}, {"n": 8, "decoder_noise": "yes"})]

    without, wrong_type = asyncio.run(calls(_sampler({})))
    assert without.status_code == 422 and without.json()["detail"][0]["field"] == "decoder_noise"
    assert wrong_type.status_code == 422 and wrong_type.json()["detail"][0]["field"] == "decoder_noise"
    assert "allowed false (this model has no calibrated decoder sigma)" in wrong_type.json()["detail"][0]["message"]
    ok, _ = asyncio.run(calls(_sampler({"decoder_sigma": 0.02})))
    assert ok.status_code == 200 and len(ok.json()["samples"]) == 8


def test_mlflow_pyfunc_takes_decoder_noise():
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from service.mlflow_model import INPUT_SCHEMA, IntroPriorModel

    assert "decoder_noise" in INPUT_SCHEMA.input_names()
    model = IntroPriorModel()
    model.sampler = _sampler({"decoder_sigma": 0.05})
    out = model.predict(None, pd.DataFrame({"n": [2000, 2000], "mode": [3, 3], "seed": [4, 4],
                                            "decoder_noise": [True, False]}))
    noisy = torch.tensor(out[out.request == 0]["sample"].tolist(), dtype=torch.float64)
    mean = torch.tensor(out[out.request == 1]["sample"].tolist(), dtype=torch.float64)
    assert torch.allclose(mean, CENTRES[3].double().expand(2000, 2), atol=1e-7)
    assert (noisy - mean).std().item() == pytest.approx(0.05, rel=0.05)
    model.sampler = _sampler({})
    with pytest.raises(MlflowException, match=r"row 0: decoder_noise: this model has no calibrated decoder sigma"):
        model.predict(None, pd.DataFrame({"n": [1], "decoder_noise": [True]}))
