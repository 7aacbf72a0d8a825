"""Image metrics of SPEC §7.4: Fréchet distance, precision / recall, probes, feature extractors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.linalg
import torch
import torchvision

from service import feature_extractor
from service.config import ConfigError, ExperimentConfig, apply_overrides
from service.feature_extractor import ExtractorUnavailable, FeatureExtractor, build_extractor, quantize, three_channels
from service.image_eval import evaluate_image_model
from service.images import ImageSource, load_idx_dataset
from service.metrics.fid import fid_from_features, frechet_distance, gaussian_fit, trace_sqrt_product
from service.metrics.precision_recall import knn_radii, precision_recall
from service.metrics.probes import PROBES, probe_accuracies
from service.model import Model, build_model


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.5 * np.eye(d)


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------

def test_frechet_1d_closed_form() -> None:
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(9.0 + 1.5**2, rel=1e-12)


def test_frechet_commuting_covariances(rng: np.random.Generator) -> None:
    # diagonal covariances in a random rotated basis: sum_j (sqrt a_j - sqrt b_j)^2 + |dm|^2
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((m1 - m2) ** 2)
    got = frechet_distance(q @ m1, q @ np.diag(a) @ q.T, q @ m2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_trace_sqrt_2x2_closed_form(rng: np.random.Generator) -> None:
    # for a 2x2 matrix A with positive eigenvalues, tr sqrt(A) = sqrt(tr A + 2 sqrt(det A))
    s1, s2 = _spd(rng, 2), _spd(rng, 2)
    prod = s1 @ s2
    expected = np.sqrt(np.trace(prod) + 2.0 * np.sqrt(np.linalg.det(prod)))
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_matches_scipy_sqrtm(rng: np.random.Generator) -> None:
    s1, s2 = _spd(rng, 20), _spd(rng, 20)
    m1, m2 = rng.normal(size=20), rng.normal(size=20)
    ref = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(ref)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_of_samples(rng: np.random.Generator) -> None:
    x = rng.normal(size=(500, 16))
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    # fewer samples than dimensions: rank-deficient covariances still give a finite value >= 0
    few = rng.normal(size=(10, 64))
    assert fid_from_features(few, few) == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(fid_from_features(few, rng.normal(size=(12, 64))))
    # a mean shift of 3 in every one of 16 dimensions adds 16 * 9 = 144
    y = rng.normal(size=(4000, 16))
    assert fid_from_features(y, y + 3.0) == pytest.approx(144.0, rel=1e-9)
    mu, sigma = gaussian_fit(y)
    assert mu.shape == (16,) and sigma.shape == (16, 16) and sigma.dtype == np.float64


def test_frechet_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------------

REAL_1D = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
FAKE_1D = np.array([[0.5], [3.9], [5.0], [20.0], [21.0]])


def test_knn_radii_by_hand() -> None:
    # 3rd nearest other point: 0 -> {1, 2, 3}: 3; 1 -> {0, 2, 3}: 2; 10 -> {3, 2, 1}: 9
    assert knn_radii(REAL_1D, 3).tolist() == [3.0, 2.0, 2.0, 3.0, 9.0]
    assert knn_radii(REAL_1D, 1).tolist() == [1.0, 1.0, 1.0, 1.0, 7.0]


def test_precision_recall_by_hand() -> None:
    # k = 1: fake 20 and 21 are 10 and 11 away from real 10 (radius 7): precision 3/5;
    # real 10 is 5 from fake 5 (radius 1.1) and 10 from fake 20 (radius 1): recall 4/5
    assert precision_recall(REAL_1D, FAKE_1D, k=1) == pytest.approx((0.6, 0.8))
    # k = 3: the fake balls grow to radii >= 15 and cover every real point
    assert precision_recall(REAL_1D, FAKE_1D, k=3) == pytest.approx((0.6, 1.0))


def test_precision_recall_self_and_disjoint(rng: np.random.Generator) -> None:
    x = rng.normal(size=(300, 8))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, rng.normal(size=(300, 8)) + 100.0) == (0.0, 0.0)
    # half of the generated points collapse onto real data: precision high, recall lower
    fake = np.concatenate([x[:150] + 1e-3, rng.normal(size=(150, 8)) + 100.0])
    p, r = precision_recall(x, fake)
    assert p == 0.5 and r < 0.9


def test_knn_radii_needs_enough_points() -> None:
    with pytest.raises(ValueError, match="at least k \\+ 1 = 4 points"):
        knn_radii(np.zeros((3, 2)), 3)


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------

def _clusters(rng: np.random.Generator, n: int, classes: int = 10, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(123).normal(scale=4.0, size=(classes, d))
    y = rng.integers(classes, size=n)
    return centres[y] + rng.normal(size=(n, d)), y


def test_probes_on_separable_latents(rng: np.random.Generator) -> None:
    z_train, y_train = _clusters(rng, 400)
    z_test, y_test = _clusters(rng, 200)
    acc = probe_accuracies(z_train, y_train, z_test, y_test)
    assert set(acc) == set(PROBES)
    assert all(v > 0.8 for v in acc.values()), acc  # chance is 0.1


def test_probes_at_chance_on_noise(rng: np.random.Generator) -> None:
    acc = probe_accuracies(rng.normal(size=(400, 4)), rng.integers(2, size=400),
                           rng.normal(size=(400, 4)), rng.integers(2, size=400), probes=("knn_5_acc", "knn_100_acc"))
    assert all(0.35 < v < 0.65 for v in acc.values()), acc


def test_probes_reject_bad_input(rng: np.random.Generator) -> None:
    z, y = _clusters(rng, 50)
    with pytest.raises(ValueError, match="at least 100"):
        probe_accuracies(z, y, z, y)
    z, y = _clusters(rng, 200)
    with pytest.raises(ValueError, match="not among"):
        probe_accuracies(z, y, z, y, probes=("svm_1k_acc",))


# --------------------------------------------------------------------------------------------
# Feature extractors (real Fashion-MNIST from the Debian package; the offline CNN protocol)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fmnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 test images of Fashion-MNIST (uint8) and labels; the smaller split loads faster."""
    try:
        return load_idx_dataset("fmnist", "test", None)
    except ConfigError as e:  # pragma: no cover - the project's set-up installs the package
        pytest.skip(f"Fashion-MNIST not installed: {e}")


@pytest.fixture(scope="module")
def cnn(fmnist_test, tmp_path_factory) -> tuple[FeatureExtractor, Path]:
    """The offline extractor, trained for 4 steps on 512 images (enough to separate blur from data)."""
    x, y = fmnist_test
    cache = tmp_path_factory.mktemp("extractors")
    fx = build_extractor("cnn", dataset="fmnist", train_images=x[:512], train_labels=y[:512], cache_dir=cache,
                         log=lambda s: None)
    return fx, cache


def test_quantize_round_trips_real_pixels() -> None:
    k = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(quantize(k.float() / 255.0), k)
    assert quantize(torch.tensor([-0.3, 1.7, 0.5])).tolist() == [0, 255, 128]
    assert three_channels(torch.zeros(2, 1, 4, 4)).shape == (2, 3, 4, 4)


def test_cnn_extractor_names_and_cache(cnn, fmnist_test) -> None:
    fx, cache = cnn
    x, y = fmnist_test
    assert fx.protocol == "cnn" and fx.metric("fid") == "fid_fmnist_cnn" and fx.metric("fid_rec") == "fid_rec_fmnist_cnn"
    assert fx.info["cached"] is False and len(fx.info["sha256"]) == 64
    again = build_extractor("cnn", dataset="fmnist", train_images=x[:512], train_labels=y[:512], cache_dir=cache,
                            log=lambda s: pytest.fail(f"retrained: {s}"))
    assert again.info["cached"] is True and again.info["sha256"] == fx.info["sha256"]
    feats = fx.features(x[:40])
    assert feats.shape == (40, 128) and feats.dtype == np.float64
    np.testing.assert_array_equal(feats, again.features(x[:40]))
    with pytest.raises(ValueError, match="uint8"):
        fx.features(x[:4].float())


def test_cnn_fid_identical_real_and_blurred(cnn, fmnist_test) -> None:
    fx, _ = cnn
    x, _ = fmnist_test
    a, b = x[2000:2300], x[2300:2600]
    fa = fx.features(a)
    assert fid_from_features(fa, fa) == pytest.approx(0.0, abs=1e-6)
    real_gap = fid_from_features(fa, fx.features(b))  # two real samples: small, not 0
    blurred = torchvision.transforms.functional.gaussian_blur(a, [5, 5], [1.5, 1.5])
    blur_gap = fid_from_features(fa, fx.features(blurred))
    assert blur_gap > 5 * real_gap > 0, (blur_gap, real_gap)
    p, r = precision_recall(fa, fa)
    assert (p, r) == (1.0, 1.0)


def test_probes_beat_chance_on_real_labels(fmnist_test) -> None:
    # a fixed random projection of the pixels to 32 dimensions stands in for a latent space
    x, y = fmnist_test
    proj = torch.randn(784, 32, generator=torch.Generator().manual_seed(0)) / 28.0
    z = (x[:900].flatten(1).float() / 255.0) @ proj
    acc = probe_accuracies(z[:600].numpy(), y[:600].numpy(), z[600:].numpy(), y[600:900].numpy())
    assert all(v > 0.4 for v in acc.values()), acc  # chance: 0.1


@pytest.mark.parametrize("protocol", ["clean", "paper"])
def test_inception_protocols_fail_clearly_offline(protocol: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(feature_extractor, "CLEAN_WEIGHTS", tmp_path / "missing.pt")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ExtractorUnavailable, match=f"protocol '{protocol}'.*--protocol cnn"):
        build_extractor(protocol, allow_download=False)


def test_clean_protocol_download_failure_is_reported(monkeypatch) -> None:
    if feature_extractor.CLEAN_WEIGHTS.is_file():
        pytest.skip("the clean-fid Inception weights are installed here")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ExtractorUnavailable, match="URLError.*Name or service not known"):
        build_extractor("clean")
    assert not feature_extractor.CLEAN_WEIGHTS.exists()  # nothing half-written


def test_unknown_protocol() -> None:
    with pytest.raises(ValueError, match=r"protocol: 'kid' is not one of \['clean', 'paper', 'cnn'\]"):
        build_extractor("kid")
    with pytest.raises(ValueError, match="dataset, train_images and train_labels are required"):
        build_extractor("cnn")


# --------------------------------------------------------------------------------------------
# The whole image evaluation on a small residual model
# --------------------------------------------------------------------------------------------

def _image_model(prior: str = "mog") -> tuple[ExperimentConfig, Model]:
    cfg = apply_overrides(ExperimentConfig(), {
        "data.dataset": "fmnist", "data.batch_size": 64, "network.kind": "resnet", "network.latent_dim": 8,
        "network.channels": [8, 16], "prior.kind": prior, "prior.num_components": 10, "prior.init": "random",
        "eval.mc_samples": 10})
    return cfg, build_model(cfg, (1, 28, 28))


def test_evaluate_image_model_writes_everything(cnn, fmnist_test, tmp_path: Path) -> None:
    fx, cache = cnn
    x, y = fmnist_test
    train, test = ImageSource("fmnist", x[:300], y[:300]), ImageSource("fmnist:test", x[600:750], y[600:750])
    cfg, model = _image_model()
    from service.image_eval import classifier_for  # the cnn protocol's network as the purity classifier

    clf = classifier_for(cfg, ImageSource("fmnist", x[:512], y[:512]), cache_dir=cache)
    metrics = evaluate_image_model(model, cfg, train, test, extractor=fx, n_samples=100, out_dir=tmp_path,
                                   generator=torch.Generator().manual_seed(0), tsne_points=120, log=lambda s: None,
                                   classifier=clf, purity_samples=20)
    expected = {"fid_fmnist_cnn", "fid_rec_fmnist_cnn", "precision_fmnist_cnn", "recall_fmnist_cnn", "fid_samples",
                "svm_2k_acc", "svm_10k_acc", "knn_5_acc", "knn_100_acc", "prior_entropy_norm",
                "prior_active_components", "mode_purity", "modes_covered", "mode_share_tv"}
    assert set(metrics) == expected and all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["fid_samples"] == 100 and 0 <= metrics["prior_entropy_norm"] <= 1
    assert 1 <= metrics["prior_active_components"] <= 10
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    for name in ("samples.png", "reconstructions.png", "latent.png", "tsne.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    table = pq.read_table(tmp_path / "latents.parquet").to_pydict()
    assert table["split"].count("train") == 300 and table["split"].count("test") == 150
    assert table["label"][300:] == y[600:750].tolist()
    assert len(table["mu"][0]) == 8 and len(table["responsibilities"][0]) == 10
    assert sum(table["responsibilities"][0]) == pytest.approx(1.0, abs=1e-5)
    assert table["component"][0] == int(np.argmax(table["responsibilities"][0]))
    assert model.training  # left as it was found


def test_paper_mode_runs_a_copy_in_train_mode(fmnist_test) -> None:
    # a stand-in extractor with the paper protocol's switch: the VAE copy runs in train mode
    # (BatchNorm batch statistics) and the caller's model keeps its running statistics
    x, y = fmnist_test
    cfg, model = _image_model("standard")
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fx = FeatureExtractor("paper", "paper", lambda b: b.float().flatten(1)[:, ::49], batch_size=64,
                          model_train_mode=True)
    metrics = evaluate_image_model(model, cfg, ImageSource("fmnist", x[:128], y[:128]),
                                   ImageSource("fmnist:test", x[300:350], y[300:350]), extractor=fx, n_samples=128,
                                   out_dir=None, generator=torch.Generator().manual_seed(1), log=lambda s: None)
    assert {"fid_paper", "fid_rec_paper", "precision_paper", "recall_paper"} <= set(metrics)
    assert "prior_entropy_norm" not in metrics  # a standard Gaussian has no responsibilities
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and not model.training


# --------------------------------------------------------------------------------------------
# Mode purity of a mixture prior on images (a classifier labels each component's samples)
# --------------------------------------------------------------------------------------------

class _ComponentPrior(torch.nn.Module):
    """A stand-in mixture: a sample of component k is the latent z = k (one dimension)."""

    is_mixture = True

    def __init__(self, weights: list[float]):
        super().__init__()
        self.register_buffer("w", torch.tensor(weights))

    @property
    def num_components(self) -> int:
        return len(self.w)

    def components(self, detach: bool = False):
        from types import SimpleNamespace
        return SimpleNamespace(weights=self.w)

    def sample(self, n, generator=None, *, component=None, deterministic=False, temperature=1.0):
        idx = torch.full((n,), int(component)) if not isinstance(component, torch.Tensor) else component
        return idx.float().unsqueeze(1), idx


class _PixelDecoder(torch.nn.Module):
    """z = k -> a 4x4 grey image of pixel value k / 255 (quantises back to k)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z / 255.0).reshape(-1, 1, 1, 1).expand(-1, 1, 4, 4)


class _FakeMixtureModel(torch.nn.Module):
    def __init__(self, weights: list[float]):
        super().__init__()
        self.prior, self.decoder = _ComponentPrior(weights), _PixelDecoder()


# what the scripted classifier answers for the samples of each component, in the order it sees them
SCRIPT = {0: [2, 2, 2, 5], 1: [1, 1, 1, 1], 2: [2, 2, 7, 9]}


def _scripted_classifier():
    from service.image_eval import ImageClassifier

    seen = {k: 0 for k in SCRIPT}

    def fn(x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 4, 4)
        out = []
        for img in x:
            k = int(img[0, 0, 0])  # the component that decoded this image
            assert (img == k).all()
            out.append(SCRIPT[k][seen[k]])
            seen[k] += 1
        return torch.tensor(out)

    return ImageClassifier(fn, num_classes=10, batch_size=3), seen


def test_image_purity_by_hand() -> None:
    from service.image_eval import image_purity

    model = _FakeMixtureModel([0.5, 0.3, 0.2])
    classifier, seen = _scripted_classifier()
    purity = image_purity(model, classifier, 4, torch.Generator().manual_seed(0), batch=3)
    assert seen == {0: 4, 1: 4, 2: 4}  # 4 samples of every component, each classified once
    # component 0: three 2s of 4 -> 0.75 (majority 2); 1: all 1s -> 1.0; 2: two 2s of 4 -> 0.5 (majority 2)
    assert purity.purity == pytest.approx([0.75, 1.0, 0.5]) and purity.majority == [2, 1, 2]
    assert purity.mode_purity == pytest.approx(0.5 * 0.75 + 0.3 * 1.0 + 0.2 * 0.5)  # 0.775
    assert purity.modes_covered == 2 and purity.num_modes == 10
    assert purity.metrics() == pytest.approx({"mode_purity": 0.775, "modes_covered": 2.0})
    # with the data's classes (here 1 and 2 equally often): the prior draws class 2 0.5*0.75 + 0.2*0.5 = 0.475
    # of the time, class 1 0.3, the other classes of components 0 and 2 the rest
    classifier, _ = _scripted_classifier()
    shared = image_purity(model, classifier, 4, torch.Generator().manual_seed(0), batch=3,
                          data_labels=torch.tensor([1, 2] * 50))
    assert shared.mode_shares[2] == pytest.approx(0.475) and shared.mode_shares[1] == pytest.approx(0.3)
    assert shared.mode_share_tv == pytest.approx(0.5 * (abs(0.3 - 0.5) + abs(0.475 - 0.5) + (1 - 0.775)))
    # component 1 unused on the test set: it covers no class
    classifier, _ = _scripted_classifier()
    inactive = image_purity(model, classifier, 4, torch.Generator(), usage=torch.tensor([0.7, 0.005, 0.295]))
    assert inactive.modes_covered == 1 and inactive.mode_purity == pytest.approx(0.775)


def test_image_purity_absent_without_mixture_or_classifier() -> None:
    from service.image_eval import image_purity

    model = _FakeMixtureModel([0.5, 0.5])
    assert image_purity(model, None, 4, torch.Generator()) is None
    model.prior.is_mixture = False
    assert image_purity(model, _scripted_classifier()[0], 4, torch.Generator()) is None


def test_classifier_for_reuses_the_cnn_protocols_file(cnn, fmnist_test) -> None:
    from service.image_eval import classifier_for

    fx, cache = cnn
    x, y = fmnist_test
    cfg, _ = _image_model()
    clf = classifier_for(cfg, ImageSource("fmnist", x[:512], y[:512]), cache_dir=cache,
                         log=lambda s: pytest.fail(f"retrained: {s}"))
    assert clf.info["sha256"] == fx.info["sha256"] and clf.num_classes == 10
    assert clf.name(1) == "trouser" and clf.name(12) == "12"
    pred = clf.labels(x[5000:5600])
    assert pred.shape == (600,) and pred.dtype == torch.int64
    assert float((pred == y[5000:5600]).float().mean()) > 0.3  # 4 Adam steps on 512 images; chance 0.1
    unlabelled = ImageSource("fmnist", x[:64], torch.zeros(64, dtype=torch.int64))
    assert classifier_for(cfg, unlabelled, cache_dir=cache) is None


def test_evaluate_image_model_reports_mode_purity(fmnist_test, monkeypatch, tmp_path: Path) -> None:
    from service import image_eval
    from service.image_eval import ImageClassifier

    x, y = fmnist_test
    train, test = ImageSource("fmnist", x[:200], y[:200]), ImageSource("fmnist:test", x[600:700], y[600:700])
    # a stand-in classifier: the mean brightness in 10 bins
    clf = ImageClassifier(lambda b: (b.float().mean((1, 2, 3)) / 25.6).long().clamp(max=9), 10,
                          class_names=image_eval.CLASS_NAMES["fmnist"])
    fx = FeatureExtractor("cnn", "toy", lambda b: b.float().flatten(1)[:, ::49], batch_size=64)
    cfg, model = _image_model()

    def run(**kw) -> dict[str, float]:
        return evaluate_image_model(model, cfg, train, test, extractor=fx, n_samples=100, out_dir=None,
                                    generator=torch.Generator().manual_seed(3), probe_train=150,
                                    log=lambda s: None, **kw)

    plain = run()
    assert "mode_purity" not in plain and "modes_covered" not in plain
    extra: dict = {}
    metrics = run(classifier=clf, purity_samples=30, extra=extra)
    assert set(metrics) == set(plain) | {"mode_purity", "modes_covered", "mode_share_tv"}
    assert {k: metrics[k] for k in plain} == plain  # purity has its own stream: no other number moved
    assert 0.1 <= metrics["mode_purity"] <= 1.0 and 1 <= metrics["modes_covered"] <= 10
    assert len(extra["mode_purity"]) == len(extra["majority_mode"]) == 10
    assert all(p * 30 == pytest.approx(round(p * 30)) for p in extra["mode_purity"])  # shares of 30 samples
    weights = model.prior.components(detach=True).weights
    assert metrics["mode_purity"] == pytest.approx(float((weights.double() * torch.tensor(extra["mode_purity"],
                                                          dtype=torch.float64)).sum() / weights.sum()))
    assert "mode_purity" not in run(classifier=clf, purity_samples=0)

    # the per-component sample grid carries each row's majority class and purity
    rows: dict = {}
    monkeypatch.setattr(image_eval, "_image_rows",
                        lambda r, labels, path, title: rows.setdefault(path.name, (labels, title)))
    monkeypatch.setattr(image_eval, "tsne_plot", lambda *a, **k: None)
    purity = image_eval.image_purity(model, clf, 30, torch.Generator().manual_seed(0))
    _, mu, _ = image_eval.stochastic_latents(model, test.images, torch.Generator().manual_seed(0))
    image_eval.image_plots(model, test, mu, None, tmp_path, torch.Generator().manual_seed(0),
                           purity=purity, classifier=clf)
    labels, title = rows["samples.png"]
    assert len(labels) == 10 and f"mode purity {purity.mode_purity:.2f}" in title
    k = purity.majority[0]
    assert labels[0].endswith(f"{clf.name(k)} {purity.purity[0]:.0%}")

    # a standard Gaussian prior has no components: no purity, even with a classifier
    cfg, model = _image_model("standard")
    assert "mode_purity" not in run(classifier=clf)
