"""Evaluation of an image model (SPEC §7.4): FID(GEN), FID(REC), precision / recall, latent probes,
prior usage on the test set, plots and a Parquet export of the latents.

``evaluate_image_model`` returns flat ``{name: float}`` metrics. The names of feature-based
metrics carry the extractor's tag (``FeatureExtractor.metric``): ``fid`` / ``fid_rec`` /
``precision`` / ``recall`` for the standard clean-fid protocol, ``fid_paper`` ... for the paper's
protocol, ``fid_fmnist_cnn`` ... for the offline classifier (never reported as plain FID).

| metric | what |
| --- | --- |
| ``fid[_tag]`` | FID(GEN): n training images vs n prior samples ``D(z)``, both uint8 |
| ``fid_rec[_tag]`` | FID(REC): the same training images vs their stochastic reconstructions |
| ``precision[_tag]``, ``recall[_tag]`` | k-NN manifolds (k = 3) of real vs generated features |
| ``svm_2k_acc`` ... ``knn_100_acc`` | probes on one stochastic latent per train / test image |
| ``prior_entropy_norm``, ``prior_active_components`` | test set, MC ``eval.mc_samples`` (mixtures) |
| ``mode_purity``, ``modes_covered`` | mixtures with a classifier: classified samples of each component |
| ``fid_samples`` | n, the number of images per FID set |

Every random draw comes from ``generator`` (CPU). With the ``paper`` protocol the VAE runs in
train mode (BatchNorm batch statistics, batches of ``data.batch_size``) on a copy of the model,
as in the paper's code; otherwise in eval mode.

Mode purity (``service.metrics.modes``) needs labelled images and a mixture prior: the offline
CNN of the ``cnn`` protocol (``classifier_for``; the same cached file, trained from the train
split's labels for the other protocols too) labels every decoded sample of every component; the
draws come from their own stream (the evaluation seed + ``PURITY_SEED_OFFSET``), so adding purity
changed no other number. No classifier (unlabelled images) or no mixture: the keys are absent.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import Tensor

from .config import ExperimentConfig
from .feature_extractor import FeatureExtractor, quantize
from .gaussian import randn, reparameterize
from .metrics.fid import fid_from_features
from .metrics.modes import Purity, mixture_purity, purity_extra
from .metrics.precision_recall import precision_recall
from .metrics.probes import MIN_TRAIN, probe_accuracies
from .model import Model
from .priors import active_components, active_mask, normalized_entropy
from .sampling import encode, prior_usage, reconstruct, sample

CHUNK = 500  # images per forward pass where the protocol does not fix the batch
FID_SEED_OFFSET = 104_729  # evaluation draws never reuse the training streams (same offset as jobs.evaluate)
PURITY_SEED_OFFSET = 15_485_863  # mode purity draws from its own stream (added to the evaluation seed)

# names of the classes in plots (datasets with fixed classes; others show the label number)
CLASS_NAMES = {
    "fmnist": ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"),
    "mnist": tuple(str(i) for i in range(10)),
    "cifar10": ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


class ImageSplit(Protocol):
    """What evaluation needs of a split (``service.images.ImageSource`` has it)."""

    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)


@dataclass
class ImageClassifier:
    """Class labels of uint8 images: ``fn`` maps a batch ``(B, C, H, W)`` to int labels ``(B,)``.

    ``num_classes`` (the data's number of modes), ``info`` (provenance: file, sha256, ...) and
    optional ``class_names`` for plots.
    """

    fn: Callable[[Tensor], Tensor]
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None
    batch_size: int = 512

    @torch.no_grad()
    def labels(self, images: Tensor) -> Tensor:
        """int64 labels ``(N,)`` on the CPU of uint8 images ``(N, C, H, W)``, batch by batch."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images: expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        out = [self.fn(images[i:i + self.batch_size]).long().cpu().reshape(-1)
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)

    def name(self, label: int) -> str:
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else str(label)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

def _device(model: Model) -> torch.device:
    return next(model.parameters()).device


def _float(images: Tensor, device: torch.device) -> Tensor:
    return images.to(device).float().div_(255.0)


@torch.no_grad()
def generate_uint8(model: Model, n: int, generator: torch.Generator, batch: int = CHUNK,
                   component: int | None = None) -> Tensor:
    """``n`` prior samples ``D(z)`` quantised to uint8 ``(n, C, H, W)`` (on the CPU)."""
    out = [quantize(sample(model, min(batch, n - i), generator=generator, component=component)[0]).cpu()
           for i in range(0, n, batch)]
    return torch.cat(out)


@torch.no_grad()
def reconstruct_uint8(model: Model, images: Tensor, generator: torch.Generator, batch: int = CHUNK) -> Tensor:
    """Stochastic reconstructions ``D(z), z ~ q(z|x)`` of uint8 images, quantised to uint8."""
    device = _device(model)
    out = [quantize(reconstruct(model, _float(images[i:i + batch], device), generator=generator)).cpu()
           for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def stochastic_latents(model: Model, images: Tensor, generator: torch.Generator,
                       batch: int = CHUNK) -> tuple[Tensor, Tensor, Tensor]:
    """One draw ``z ~ q(z|x)`` per image, plus the posterior means and their responsibilities.

    Returns ``(z (N, D), mu (N, D), responsibilities of mu (N, M))`` on the CPU.
    """
    device = _device(model)
    zs, mus, resps = [], [], []
    for i in range(0, len(images), batch):
        mu, logvar, resp = encode(model, _float(images[i:i + batch], device))
        zs.append(reparameterize(mu, logvar, randn(tuple(mu.shape), generator, mu)).cpu())
        mus.append(mu.cpu())
        resps.append(resp.cpu())
    return torch.cat(zs), torch.cat(mus), torch.cat(resps)


def _subset(split: ImageSplit, n: int | None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` images of ``split`` drawn without replacement (all of them, in order, when n is None or >= N)."""
    if n is None or n >= len(split.images):
        return split.images, split.labels
    idx = torch.randperm(len(split.images), generator=generator)[:n]
    return split.images[idx], split.labels[idx]


@torch.no_grad()
def image_purity(model: Model, classifier: ImageClassifier | None, samples_per_component: int,
                 generator: torch.Generator, *, usage: Tensor | None = None, batch: int = CHUNK,
                 data_labels: Tensor | None = None) -> Purity | None:
    """Mode purity of a mixture prior on images; None without a mixture or a classifier.

    ``samples_per_component`` decoded images ``D(z), z ~ N(mu_k, var_k)`` per component ``k``,
    quantised to uint8 (as for FID), each labelled by ``classifier``; weights: the mixture
    weights; active components: ``usage >= 1e-2`` (test-set usage; by weight when not given);
    ``data_labels``: true classes of data images, for ``mode_share_tv``.
    """
    if not model.prior.is_mixture or classifier is None or samples_per_component < 1:
        return None
    m = model.prior.num_components
    labels = torch.stack([classifier.labels(generate_uint8(model, samples_per_component, generator, batch,
                                                            component=k)) for k in range(m)])  # (M, S)
    return mixture_purity(labels, model.prior.components(detach=True).weights, usage, num_modes=classifier.num_classes,
                          data_labels=data_labels)


def fid_metrics(model: Model, real: Tensor, extractor: FeatureExtractor, generator: torch.Generator, *,
                batch: int = CHUNK, log: Callable[[str], None] = lambda s: None) -> dict[str, float]:
    """FID(GEN), FID(REC), precision and recall of ``model`` against uint8 ``real`` images; ``log``
    hears each of the long steps as it starts."""
    n = len(real)
    log(f"generating {n:,} samples")
    fake = generate_uint8(model, n, generator, batch)
    log(f"reconstructing {n:,} images")
    rec = reconstruct_uint8(model, real, generator, batch)
    features = {}
    for name, x in (("real", real), ("generated", fake), ("reconstructed", rec)):
        log(f"features of the {n:,} {name} images")
        features[name] = extractor.features(x)
    f_real, f_fake, f_rec = features.values()
    log("precision / recall")
    precision, recall = precision_recall(f_real, f_fake, device=_device(model))
    return {extractor.metric("fid"): fid_from_features(f_real, f_fake),
            extractor.metric("fid_rec"): fid_from_features(f_real, f_rec),
            extractor.metric("precision"): precision, extractor.metric("recall"): recall,
            "fid_samples": float(n)}


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------

class _Phases:
    """Progress of a long evaluation: ``evaluate [k/n] <phase>`` as each phase starts, its steps
    as ``evaluate [k/n] <phase>: <step> (+<seconds into the phase> s)``, and how long each took."""

    def __init__(self, log: Callable[[str], None], total: int) -> None:
        self.log, self.total, self.k, self.name, self.start = log, total, 0, "", time.perf_counter()

    def __call__(self, name: str, detail: str = "") -> None:
        now = time.perf_counter()
        took = f" ({self.name} took {now - self.start:.1f} s)" if self.name else ""
        self.k, self.name, self.start = self.k + 1, name, now
        self.log(f"evaluate [{self.k}/{self.total}] {name}{': ' + detail if detail else ''}{took}")

    def step(self, what: str) -> None:
        self.log(f"evaluate [{self.k}/{self.total}] {self.name}: {what} (+{time.perf_counter() - self.start:.1f} s)")

    def done(self) -> None:
        self.log(f"evaluate: {self.name} took {time.perf_counter() - self.start:.1f} s; done")


def evaluate_image_model(model: Model, cfg: ExperimentConfig, train_source: ImageSplit, test_source: ImageSplit, *,
                         extractor: FeatureExtractor, n_samples: int, out_dir: str | Path | None,
                         generator: torch.Generator, probe_train: int | None = None,
                         tsne_points: int = 2000, write_metrics: bool = True,
                         classifier: ImageClassifier | None = None, purity_samples: int | None = None,
                         extra: dict[str, Any] | None = None, log=print) -> dict[str, float]:
    """All metrics of SPEC §7.4; plots, ``metrics.json`` and ``latents.parquet`` into ``out_dir``.

    ``n_samples`` images per FID set (capped at the training set size); ``probe_train`` limits
    the training latents of the probes (None = the whole train split); the probes are skipped
    when the train labels hold a single class (e.g. unlabelled Parquet images).

    With a ``classifier`` and a mixture prior: ``mode_purity`` and ``modes_covered`` of
    ``purity_samples`` (default ``eval.purity_samples``; 0 skips) decoded images per component
    (``image_purity``, eval mode, its own stream). ``extra``, when given, receives the
    per-component lists ``mode_purity`` and ``majority_mode`` (as the 2D evaluation's checkpoint extra).
    """
    was_training = model.training
    model.eval()
    fid_model, batch = model, CHUNK
    if extractor.model_train_mode:  # paper protocol: BN batch statistics of the VAE too, on a copy
        fid_model, batch = copy.deepcopy(model).train(), cfg.data.batch_size
    real, _ = _subset(train_source, n_samples, generator)
    n_purity = cfg.eval.purity_samples if purity_samples is None else purity_samples
    with_purity = classifier is not None and model.prior.is_mixture and n_purity > 0
    with_plots = out_dir is not None and cfg.eval.plots
    phase = _Phases(log, 2 + model.prior.is_mixture + with_purity + with_plots)
    phase("FID", f"{len(real):,} images per set, protocol {extractor.protocol!r}")
    metrics = fid_metrics(fid_model, real, extractor, generator, batch=batch, log=phase.step)

    phase("latents and probes")
    train_x, train_y = _subset(train_source, probe_train, generator)
    phase.step(f"latents of {len(train_x):,} training images")
    z_train, mu_train, r_train = stochastic_latents(model, train_x, generator)
    phase.step(f"latents of {len(test_source.images):,} test images")
    z_test, mu_test, r_test = stochastic_latents(model, test_source.images, generator)
    if len(torch.unique(train_y)) > 1 and len(z_train) >= MIN_TRAIN:
        phase.step("linear SVM and k-NN probes")
        metrics.update(probe_accuracies(z_train.numpy(), train_y.numpy(), z_test.numpy(), test_source.labels.numpy()))
    else:
        log("evaluate: probes skipped (the train labels hold one class, or fewer than 100 images)")

    usage = None
    if model.prior.is_mixture:
        phase("prior usage", f"{len(test_source.images):,} test images")
        usage = prior_usage(model, _float(test_source.images, _device(model)), cfg.eval.mc_samples, generator).cpu()
        metrics["prior_entropy_norm"] = float(normalized_entropy(usage))
        metrics["prior_active_components"] = float(active_components(usage))

    purity = None
    if with_purity:
        phase("mode purity", f"{n_purity} samples per component")
        purity_gen = torch.Generator().manual_seed(generator.initial_seed() + PURITY_SEED_OFFSET)
        purity = image_purity(model, classifier, n_purity, purity_gen, usage=usage,
                              data_labels=train_y if len(torch.unique(train_y)) > 1 else None)
        metrics.update(purity.metrics())
        if extra is not None:
            extra.update(purity_extra(purity))

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if write_metrics:
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        write_latents(out / "latents.parquet",
                      {"train": (mu_train, r_train, train_y), "test": (mu_test, r_test, test_source.labels)})
        if with_plots:
            phase("plots")
            image_plots(model, test_source, mu_test, usage, out, generator, tsne_points=tsne_points,
                        purity=purity, classifier=classifier)
    phase.done()
    model.train(was_training)
    return metrics


def extractor_for(protocol: str, cfg: ExperimentConfig, train_source: ImageSplit | None, *,
                  device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                  train_images: int | None = None, log=print) -> FeatureExtractor:
    """The extractor of ``protocol`` for a run of ``cfg``: ``paper`` batches of ``data.batch_size``;
    ``cnn`` trained (or found in the cache) on the first ``train_images`` (default all) images of
    ``train_source``, named after the dataset (``parquet:<file>`` for Parquet images)."""
    from .feature_extractor import build_extractor

    if protocol != "cnn":
        return build_extractor(protocol, batch_size=cfg.data.batch_size, device=device, log=log)
    assert train_source is not None, "protocol 'cnn' trains on the train split"
    dataset, images, labels = _cnn_data(cfg, train_source, train_images)
    return build_extractor("cnn", dataset=dataset, train_images=images, train_labels=labels,
                           device=device, cache_dir=cache_dir, log=log)


def _cnn_data(cfg: ExperimentConfig, train_source: ImageSplit, train_images: int | None) -> tuple[str, Tensor, Tensor]:
    """The offline CNN's dataset name and training images / labels (the cache key's inputs)."""
    images = train_source.images[:train_images] if train_images else train_source.images
    dataset = cfg.data.dataset if cfg.data.dataset != "parquet_images" else getattr(train_source, "name", "parquet")
    return dataset, images, train_source.labels[:len(images)]


def classifier_for(cfg: ExperimentConfig, train_source: ImageSplit, *, device: str | torch.device = "cpu",
                   cache_dir: str | Path | None = None, train_images: int | None = None,
                   log=print) -> ImageClassifier | None:
    """The offline CNN (``service.feature_extractor``) as a classifier for mode purity: the same
    cached file as the ``cnn`` protocol's extractor for the same arguments, trained on a miss.

    None when the training labels hold fewer than two classes (unlabelled images).
    """
    from .feature_extractor import load_or_train_cnn

    dataset, images, labels = _cnn_data(cfg, train_source, train_images)
    if len(torch.unique(labels)) < 2:
        return None
    net, info = load_or_train_cnn(dataset, images, labels, cache_dir=cache_dir, log=log)
    net = net.to(device)
    names = CLASS_NAMES.get(cfg.data.dataset)
    return ImageClassifier(lambda x: net(x.to(device)).argmax(1), net.head.out_features, info,
                           class_names=names if names is not None and len(names) == net.head.out_features else None)


def evaluate_after_training(model: Model, cfg: ExperimentConfig, train_source: ImageSplit, test_source: ImageSplit,
                            *, device: str | torch.device = "cpu", plot_dir: str | Path | None = None
                            ) -> tuple[dict[str, float], dict[str, Any]]:
    """The end-of-training hook of ``service.evaluation.evaluate_images``: the full evaluation when
    ``eval.fid_protocol`` is set (``"none"``, the default, costs nothing).

    FID statistics and the ``cnn`` extractor use the whole training split, whatever ``data.subset``
    trained on, so numbers of different runs are comparable. ``eval.fid_samples`` images per FID
    set and training latents for the probes. Mixtures on labelled images: mode purity with the
    offline CNN (any protocol; trained once and cached when missing). Plots and ``latents.parquet``
    go to ``plot_dir`` (``metrics.json`` is left to the caller, which merges these metrics into its
    own). Returns ``(metrics, extra)``: ``extra`` holds the per-component ``mode_purity`` and
    ``majority_mode`` lists (for the checkpoint) when purity was measured.
    """
    import dataclasses

    from .images import make_image_source

    protocol = cfg.eval.fid_protocol
    if protocol == "none":
        return {}, {}
    full = make_image_source(dataclasses.replace(cfg.data, subset=None), "train") if cfg.data.subset else train_source
    extractor = extractor_for(protocol, cfg, full, device=device)
    classifier = classifier_for(cfg, full, device=device) if model.prior.is_mixture else None
    gen = torch.Generator().manual_seed(cfg.seed + FID_SEED_OFFSET)
    extra: dict[str, Any] = {}
    metrics = evaluate_image_model(model, cfg, full, test_source, extractor=extractor, n_samples=cfg.eval.fid_samples,
                                   out_dir=plot_dir, generator=gen, probe_train=cfg.eval.fid_samples,
                                   write_metrics=False, classifier=classifier, extra=extra)
    return metrics, extra


def write_latents(path: str | Path, splits: dict[str, tuple[Tensor, Tensor, Tensor]]) -> Path:
    """Parquet with one row per image: ``split``, ``index``, ``label``, ``mu`` (D floats),
    ``responsibilities`` (M floats, of the posterior mean) and ``component`` (their argmax)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def fixed(a: Tensor) -> pa.FixedSizeListArray:
        a = a.detach().cpu().float().contiguous()
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1).numpy()), a.shape[1])

    tables = []
    for name, (mu, resp, labels) in splits.items():
        tables.append(pa.table({
            "split": pa.array([name] * len(mu)), "index": pa.array(np.arange(len(mu), dtype=np.int64)),
            "label": pa.array(labels.cpu().numpy().astype(np.int64)), "mu": fixed(mu),
            "responsibilities": fixed(resp), "component": pa.array(resp.argmax(1).cpu().numpy().astype(np.int64)),
        }))
    path = Path(path)
    pq.write_table(pa.concat_tables(tables), str(path))
    return path


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------

def _image_rows(rows: list[Tensor], row_labels: list[str], path: Path, title: str) -> None:
    """Rows of float images (each (k, C, H, W) in [0, 1]) as one figure, a label left of each row."""
    from torchvision.utils import make_grid

    from .plots import plt  # matplotlib with the Agg backend

    ncol = max(len(r) for r in rows)
    grid = make_grid(torch.cat(rows).clamp(0, 1), nrow=ncol, padding=2, pad_value=1.0)  # (3, H', W')
    h = rows[0].shape[2] + 2
    fig, ax = plt.subplots(figsize=(0.5 + 0.45 * ncol, 0.4 + 0.45 * len(rows)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_yticks([2 + h * (i + 0.5) for i in range(len(rows))], row_labels, fontsize=6)
    ax.set_xticks([])
    ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def image_plots(model: Model, test_source: ImageSplit, mu_test: Tensor, usage: Tensor | None, out: Path,
                generator: torch.Generator, *, per_row: int = 8, tsne_points: int = 2000,
                purity: Purity | None = None, classifier: ImageClassifier | None = None) -> None:
    """``samples.png`` (a row per prior component, mode-conditioned; with ``purity``, each row's
    majority class and purity in its label), ``reconstructions.png``, ``latent.png`` (first two
    latent dims, component means sized by weight) and ``tsne.png``."""
    from . import plots

    device = _device(model)
    kw: dict[str, Any] = {}
    if model.prior.is_mixture:
        comps = model.prior.components(detach=True)
        weights = comps.weights.cpu().numpy()
        m_all = model.prior.num_components
        idx = torch.arange(m_all).repeat_interleave(per_row)  # one decoder pass for every row
        rows = list(sample(model, m_all * per_row, component=idx, generator=generator)[0].cpu().split(per_row))
        labels = [f"{m}: w={weights[m]:.2f}" for m in range(len(rows))]
        title = "samples per prior component (row = component)"
        if purity is not None:
            name = classifier.name if classifier is not None else str
            labels = [f"{lab}, {name(purity.majority[m])} {purity.purity[m]:.0%}" for m, lab in enumerate(labels)]
            title += (f"\nclassified: mode purity {purity.mode_purity:.2f}, "
                      f"{purity.modes_covered} / {purity.num_modes} classes covered")
        _image_rows(rows, labels, out / "samples.png", title)
        active = active_mask(usage).numpy() if usage is not None else None
        kw = {"means": comps.means.cpu().numpy(), "weights": weights, "active": active}
    else:
        x = sample(model, per_row * per_row, generator=generator)[0].cpu()
        _image_rows(list(x.split(per_row)), [""] * per_row, out / "samples.png", "prior samples")
    x = _float(test_source.images[:2 * per_row], device)
    mean_rec = reconstruct(model, x, stochastic=False).cpu()
    _image_rows([x.cpu(), mean_rec], ["test", "D(mu)"], out / "reconstructions.png", "test images and reconstructions")
    labels_np = test_source.labels.numpy()
    plots.plot_latent(mu_test.numpy(), labels_np, out / "latent.png", title="test posterior means, dims 1-2", **kw)
    tsne_plot(mu_test, labels_np, out / "tsne.png", generator, points=tsne_points,
              means=kw.get("means"), weights=kw.get("weights"), active=kw.get("active"))


def tsne_plot(mu: Tensor, labels: np.ndarray, path: Path, generator: torch.Generator, *, points: int = 2000,
              means: np.ndarray | None = None, weights: np.ndarray | None = None,
              active: np.ndarray | None = None) -> None:
    """t-SNE (scikit-learn) of a subset of posterior means, coloured by class; the component
    means are embedded with them (t-SNE has no out-of-sample map) and drawn sized by weight."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    from . import plots

    idx = torch.randperm(len(mu), generator=generator)[:points].numpy()
    x = mu.numpy()[idx]
    stacked = x if means is None else np.concatenate([x, means])
    perplexity = min(30.0, (len(stacked) - 1) / 3.0)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    # one OpenMP thread: on a shared machine the Barnes-Hut threads spin-wait for each other (measured
    # 77 s vs 1.7 s for 130 points on 2 busy cores); t-SNE is a plot, not worth a core's contention
    with threadpool_limits(1):
        emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(stacked)
    plots.plot_latent(emb[:len(x)], labels[idx], path, means=None if means is None else emb[len(x):],
                      weights=weights, active=active, title=f"t-SNE of {len(x)} posterior means",
                      axis_labels=("t-SNE 1", "t-SNE 2"))
