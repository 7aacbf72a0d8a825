"""Final evaluation of a run: 2D (SPEC §6.5, §6.6): gnELBO, histogram KL / JSD, prior usage, plots;
images: the cheap end-of-training summary of ``evaluate_images`` (the 2D metrics do not apply).

The full image evaluation of SPEC §7.4 (FID, precision / recall, latent probes) lives in
``service.image_eval`` and ``jobs/evaluate.py``. Hook: when ``service.image_eval`` defines
``evaluate_after_training(model, cfg, train_source, test_source, *, device, plot_dir) -> dict``,
``evaluate_images`` calls it and merges its metrics (and its plots, same file names, win).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .config import ExperimentConfig
from .data import PointSource, make_source
from .gaussian import LOG_2PI, kl_to_standard_normal, randn
from .metrics.density import gnelbo_with_grid, histogram_jsd, histogram_kl
from .metrics.modes import Placement, Purity, knn_labels, mixture_purity, purity_extra
from .model import Model
from .priors import active_components, active_mask, normalized_entropy
from .sampling import decoder_sigma, prior_usage, reconstruct, sample

EVAL_SEED_OFFSET = 7_919  # evaluation draws never reuse the training streams
PURITY_SEED_OFFSET = 104_729  # mode purity has its own stream: adding it changed no other metric
CALIBRATED_SEED_OFFSET = 1_299_709  # the calibrated decoder's metrics too: adding them changed no other metric
PURITY_REFERENCE_POINTS = 5_000  # labelled real points that label the decoded samples (k-NN)


def energy_fn(model: Model, mc_samples: int, generator: torch.Generator | None,
              kl_estimator: str = "closed") -> Callable[[Tensor], Tensor]:
    """``W(x) = KL[q(z|x) || p] + ||x - D(mu(x))||^2`` with betas 1 (SPEC §6.5): (B, d_x) -> (B,).

    Standard Gaussian: closed-form KL, or MC when ``kl_estimator == "mc"`` (the run's
    ``objective.kl_estimator``: the paper's Table 1 SG column is MC, T = 100). Mixtures: always
    MC. MC uses the *same* ``mc_samples`` noise draws for every point. The posterior
    log-variance is clamped at -80 from below.
    """
    noise: dict[str, Tensor] = {}
    chunk = max(1, 262_144 // mc_samples)  # points per block: T * chunk rows of (rows, M) responsibilities

    def w_block(x: Tensor) -> Tensor:
        mu, logvar = model.encoder(x)
        logvar = logvar.clamp(min=-80.0)
        rec = (x - model.decoder(mu)).pow(2).flatten(1).sum(1)
        if not model.prior.is_mixture and kl_estimator != "mc":
            return kl_to_standard_normal(mu, logvar) + rec
        if "eps" not in noise:
            noise["eps"] = randn((mc_samples, 1, mu.shape[-1]), generator, mu)
        eps = noise["eps"]  # (T, 1, D): one set of draws shared by all points
        z = mu + torch.exp(0.5 * logvar) * eps  # (T, B, D)
        log_q = -0.5 * (LOG_2PI + logvar + eps * eps).sum(-1)  # (T, B)
        log_p = model.prior.log_prob(z.reshape(-1, mu.shape[-1])).reshape(z.shape[:2])
        return (log_q - log_p).mean(0) + rec

    def w(x: Tensor) -> Tensor:
        return torch.cat([w_block(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])

    return w


@torch.no_grad()
def evaluate(model: Model, source: PointSource, cfg: ExperimentConfig, *, device: str | torch.device = "cpu",
             plot_dir: str | Path | None = None, gnelbo: bool = True) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of SPEC §6.5 (lower is better) plus prior usage; plots into ``plot_dir``.

    Returns ``(metrics, extra)``; ``extra`` holds the per-component usage (for serving).
    ``gnelbo=False`` leaves out ``gnelbo_x1e7`` and its two parts (``tracking.GNELBO_METRICS``) and the energy
    plot, but takes its random draws all the same, so every other metric is the same number as with it.
    Image sources go to ``evaluate_images``.
    """
    if cfg.data.is_image:
        return evaluate_images(model, source, cfg, device=device, plot_dir=plot_dir)
    model.eval()
    ev, L = cfg.eval, source.eval_range
    gen = torch.Generator().manual_seed(cfg.seed + EVAL_SEED_OFFSET)
    data = source.sample(ev.data_points, gen)[0]
    energy = energy_fn(model, ev.mc_samples, gen, cfg.objective.kl_estimator)
    metrics: dict[str, float] = {}
    grid_w = None
    if gnelbo:
        value, grid_w, data_mean = gnelbo_with_grid(energy, data, L, ev.grid_size, device=device)
        metrics["gnelbo_x1e7"] = value * 1e7
        # its two parts, the data's mean energy (numerator) and the grid's (the far field, most of the denominator):
        # after the three headline metrics (the console's evaluation line reads in this order)
        parts = {"gnelbo_data_energy": data_mean, "gnelbo_grid_energy": float(grid_w.mean())}
    elif model.prior.is_mixture or cfg.objective.kl_estimator == "mc":  # the energy's one MC draw, from ``gen``:
        randn((ev.mc_samples, 1, cfg.network.latent_dim), gen, data)  # taken anyway, so later draws are the same

    def draw() -> tuple[np.ndarray, np.ndarray]:
        real = source.sample(ev.hist_samples, gen)[0].numpy()
        fake = sample(model, ev.hist_samples, generator=gen)[0].cpu().numpy()
        return real, fake

    real, fake = draw()
    metrics["hist_kl"] = histogram_kl(real, fake, L, ev.bins)
    metrics["hist_jsd"] = histogram_jsd(*draw(), L, ev.bins)
    if gnelbo:
        metrics.update(parts)
    extra: dict[str, Any] = {}
    purity: Purity | None = None
    if model.prior.is_mixture:
        usage = prior_usage(model, torch.as_tensor(real[: ev.hist_samples]).to(device), ev.mc_samples, gen)
        metrics["prior_entropy_norm"] = float(normalized_entropy(usage))
        metrics["prior_active_components"] = float(active_components(usage))
        extra["usage"] = usage.cpu()
        purity = component_purity(model, source, cfg, usage=extra["usage"])
        if purity is not None:
            metrics |= purity.metrics()
            extra |= purity_extra(purity)
    metrics |= calibrated_metrics(model, source, cfg, data.to(device))
    if plot_dir is not None and ev.plots and grid_w is not None:
        _plots(model, source, real, fake, grid_w, extra.get("usage"), Path(plot_dir), gen, metrics, extra,
               placement=None if purity is None else purity.placement)
    model.train()
    return metrics, extra


@torch.no_grad()
def calibrated_metrics(model: Model, source: PointSource, cfg: ExperimentConfig, data: Tensor) -> dict[str, float]:
    """Histogram KL / JSD of samples from the calibrated Gaussian decoder, beside the paper's decoder means.

    ``decoder_sigma``: the maximum-likelihood sigma of ``N(D(z), sigma^2 I)`` on ``data``
    (``sampling.decoder_sigma``); ``hist_kl_calibrated`` / ``hist_jsd_calibrated``: SPEC §6.5's
    histograms of ``D(z) + sigma * eps``, ``z ~ p``. The paper scores decoder means, so ``hist_kl`` /
    ``hist_jsd`` stay its metrics; a decoder that maps every latent of a data mode onto the mode's centre
    has a near-zero spread there that only the means' metrics punish. Own random stream.
    """
    ev, L = cfg.eval, source.eval_range
    gen = torch.Generator().manual_seed(cfg.seed + CALIBRATED_SEED_OFFSET)
    sigma = decoder_sigma(model, data, gen)

    def draw() -> tuple[np.ndarray, np.ndarray]:
        real = source.sample(ev.hist_samples, gen)[0].numpy()
        fake = sample(model, ev.hist_samples, generator=gen, decoder_sigma=sigma)[0].cpu().numpy()
        return real, fake

    return {"decoder_sigma": sigma, "hist_kl_calibrated": histogram_kl(*draw(), L, ev.bins),
            "hist_jsd_calibrated": histogram_jsd(*draw(), L, ev.bins)}


@torch.no_grad()
def component_purity(model: Model, source: PointSource, cfg: ExperimentConfig, *, usage: Tensor | None = None,
                     temperature: float = 1.0) -> Purity | None:
    """Mode purity of a mixture prior on labelled 2D data (``service.metrics.modes``); None otherwise.

    ``eval.purity_samples`` decoded samples per component at ``temperature``, each labelled by the
    majority of its ``eval.purity_k`` nearest labelled real points; active components are those
    with usage >= 1e-2 (SPEC §4; by weight when no usage is given). The same samples and reference
    points give each data mode's placement (``mode_offset_max``, ``extra["mode_offsets"]``).
    """
    if not model.prior.is_mixture or not getattr(source, "labelled", False):
        return None
    ev = cfg.eval
    gen = torch.Generator().manual_seed(cfg.seed + PURITY_SEED_OFFSET)
    device = next(model.parameters()).device
    ref, ref_labels = source.sample(PURITY_REFERENCE_POINTS, gen)
    m = model.prior.num_components
    comps = torch.arange(m).repeat_interleave(ev.purity_samples)
    x = sample(model, m * ev.purity_samples, component=comps.to(device), generator=gen, temperature=temperature)[0]
    labels = knn_labels(ref.to(device), ref_labels.to(device), x, k=ev.purity_k).cpu()
    return mixture_purity(labels.reshape(m, ev.purity_samples), model.prior.components(detach=True).weights, usage,
                          num_modes=len(set(ref_labels.tolist())), data_labels=ref_labels,
                          samples=x.cpu().reshape(m, ev.purity_samples, -1), data_points=ref)


def _plots(model: Model, source: PointSource, real: np.ndarray, fake: np.ndarray, grid_w: Tensor,
           usage: Tensor | None, out: Path, gen: torch.Generator, metrics: dict[str, float] | None = None,
           extra: dict[str, Any] | None = None, placement: Placement | None = None) -> None:
    from . import plots  # matplotlib only when plotting

    out.mkdir(parents=True, exist_ok=True)
    L = source.eval_range
    displaced = ([(k, placement.centres[k], placement.means[k], placement.offsets[k]) for k in placement.displaced()]
                 if placement is not None and real.shape[1] == 2 else None)
    plots.plot_samples(real[:1024], fake[:1024], L, out / "samples.png", displaced=displaced)
    plots.plot_density(grid_w.cpu().numpy(), L, out / "density.png")
    x, labels = source.sample(2048, gen)
    device = next(model.parameters()).device
    mu = model.encoder(x.to(device))[0].cpu().numpy()
    kw: dict[str, Any] = {}
    if model.prior.is_mixture:
        comps = model.prior.components(detach=True)
        kw = {"means": comps.means.cpu().numpy(), "weights": comps.weights.cpu().numpy(),
              "active": active_mask(usage).numpy() if usage is not None else None}
        if extra and "majority_mode" in extra and metrics:
            kw["majority"] = np.asarray(extra["majority_mode"])
            kw["title"] = (f"latent space: mode purity {metrics['mode_purity']:.2f}, "
                           f"{int(metrics['modes_covered'])} modes covered"
                           + (f", share TV {metrics['mode_share_tv']:.2f}" if "mode_share_tv" in metrics else ""))
    d = mu.shape[1]

    def log_density(z2: np.ndarray) -> np.ndarray:
        z = torch.zeros(z2.shape[0], d, device=device)
        z[:, :2] = torch.as_tensor(z2, dtype=torch.float32, device=device)
        return model.prior.log_prob(z).cpu().numpy()

    plots.plot_latent(mu, labels.numpy(), out / "latent.png", log_density=log_density if d == 2 else None, **kw)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def evaluate_images(model: Model, source: Any, cfg: ExperimentConfig, *, device: str | torch.device = "cpu",
                    plot_dir: str | Path | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """End-of-training summary on the first ``eval.data_points`` test images (model in eval mode).

    ``rec_error_test``: mean ``||x - D(z)||^2`` per image, ``z ~ q(z|x)`` (the training loss's
    reconstruction term, SPEC §1); mixtures: ``prior_entropy_norm`` and
    ``prior_active_components`` of the test set (MC ``eval.mc_samples``, SPEC §4). Plots:
    ``samples.png`` (prior samples; a row per component for mixtures) and ``reconstructions.png``
    (test images over their reconstructions). Then the ``service.image_eval`` hook (module docstring),
    outside ``no_grad``: it may train its feature extractor. The hook returns its metrics, or
    ``(metrics, extra)``: that ``extra`` (e.g. per-component ``mode_purity`` / ``majority_mode``
    lists, which are no MLflow metrics) joins this function's ``extra`` (the checkpoint's).
    """
    import importlib
    import importlib.util

    was_training = model.training
    with torch.no_grad():
        metrics, extra, test = _image_summary(model, cfg, torch.device(device), plot_dir)
    if importlib.util.find_spec("service.image_eval") is not None:
        hook = getattr(importlib.import_module("service.image_eval"), "evaluate_after_training", None)
        if hook is not None:
            model.eval()
            with torch.enable_grad():  # evaluate() runs under no_grad
                result = hook(model, cfg, source, test, device=device, plot_dir=plot_dir)
            hook_metrics, hook_extra = result if isinstance(result, tuple) else (result, {})
            metrics.update(hook_metrics)
            extra.update(hook_extra)
    model.train(was_training)
    return metrics, extra


def _image_summary(model: Model, cfg: ExperimentConfig, device: torch.device,
                   plot_dir: str | Path | None) -> tuple[dict[str, float], dict[str, Any], Any]:
    """The metrics and plots of ``evaluate_images`` (model in eval mode); also returns the test split."""
    model.eval()
    ev = cfg.eval
    gen = torch.Generator(device=device).manual_seed(cfg.seed + EVAL_SEED_OFFSET)
    test = make_source(cfg.data, "test")
    x = test.get(torch.arange(min(ev.data_points, len(test))))[0]
    rec = []
    for i in range(0, len(x), 256):
        xb = x[i:i + 256].to(device)
        rec.append((xb - reconstruct(model, xb, generator=gen)).pow(2).flatten(1).sum(1).cpu())
    metrics = {"rec_error_test": float(torch.cat(rec).mean())}
    extra: dict[str, Any] = {}
    if model.prior.is_mixture:
        usage = prior_usage(model, x.to(device), ev.mc_samples, gen, chunk=256).cpu()
        metrics["prior_entropy_norm"] = float(normalized_entropy(usage))
        metrics["prior_active_components"] = float(active_components(usage))
        extra["usage"] = usage
    if plot_dir is not None and ev.plots:
        from torchvision.utils import save_image

        out = Path(plot_dir)
        out.mkdir(parents=True, exist_ok=True)
        per_row = 8
        if model.prior.is_mixture:
            m = model.prior.num_components
            comps = torch.arange(m, device=device).repeat_interleave(per_row)
            samples = sample(model, m * per_row, component=comps, generator=gen)[0]
        else:
            samples = sample(model, per_row * per_row, generator=gen)[0]
        save_image(samples.clamp(0, 1).cpu(), out / "samples.png", nrow=per_row, pad_value=1.0)
        shown = x[:per_row].to(device)
        pairs = torch.cat([shown, reconstruct(model, shown, generator=gen)]).clamp(0, 1).cpu()
        save_image(pairs, out / "reconstructions.png", nrow=per_row, pad_value=1.0)
    return metrics, extra, test
