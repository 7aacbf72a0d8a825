"""Mode purity of a mixture prior: does "sample from component k" give one data mode?

For labelled data (the toy generators' mode / arm / cell / ring index, a Parquet ``label`` column,
image classes through a classifier), every component is sampled, each decoded sample gets the
label of the data mode it lands in, and per component:

- ``majority``: the most frequent label among its samples;
- ``purity``: the share of its samples that carry that label (1 = every sample from one mode;
  1 / number of modes = no better than chance for balanced modes).

Over the mixture:

- ``mode_purity``: purity weighted by the component weights (what a user who asks for "a sample
  of mode k", with k drawn like the prior draws it, gets on average);
- ``modes_covered``: how many data modes the prior offers a handle on: a mode counts when the
  components whose majority it is carry, together, at least 1e-2 of the usage (SPEC §4's activity
  threshold applied to the mode's group of components, ``mode_groups``). Counting only modes that
  are the majority of some single active component undercounts a mode split over many small
  components: a 64-component prior gave one of 8 modes to 15 components of usage 0.006 - 0.009
  each (0.125 together, as much as every other mode) and counted 7 modes;
- ``mode_shares``: how often a sample of the whole prior (component drawn by weight) lands in each
  data mode, ``sum_m w_m * share of component m's samples in the mode``;
- ``mode_share_tv``: the total variation distance between those shares and the data's own,
  ``0.5 * sum_k |mode_share_k - data_share_k|`` (0: the prior draws every mode as often as the data
  holds it; a lost mode at 1/8 of balanced data costs at least 0.125). Every data mode counts,
  whether or not a component stands for it, so it sees what ``modes_covered`` does not: inactive
  components' samples and a mode that some component reaches only as a minority.

Where the prior's samples of each data mode lie (``mode_placement``; data in coordinates, not images):

- ``mode_offsets``: for each data mode k the prior draws (share >= 1e-2), the distance between the
  mean of the prior's samples that land in it and the mean of the data's points of mode k, in units
  of the mode's spread ``s_k`` (the data's root-mean-square deviation from that mean per
  coordinate: the standard deviation of an isotropic mode). Purity cannot see a mode decoded off
  its place (every sample still lands nearest mode k); the offset can;
- ``mode_offset_max``: the largest of them, a metric (``where: {mode_offset_max: {max: 3}}``);
- ``mode_widths``: the same samples' root-mean-square deviation from their own mean per coordinate,
  over ``s_k`` (1: as wide as the data's mode; decoder means are often narrower).

Pure: tensors in, numbers out. ``knn_labels`` labels decoded 2D points by their nearest labelled
real points.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from ..priors import active_mask


# A data mode whose prior samples' mean sits this many of its spreads off the data's centre is "displaced"
# (marked in samples.png, pointed out by jobs.train). On the fourth full-schedule mog-ip-lc-gnelbo run the
# seven modes in place measured 0.39 - 0.93, the displaced one 16.5 (docs/modes.md).
DISPLACED_OFFSET = 3.0


@dataclass(frozen=True)
class Purity:
    """Per-component and mixture-level mode purity (module docstring)."""

    purity: list[float]  # (M,) share of the majority label among each component's samples
    majority: list[int]  # (M,) majority label of each component
    mode_purity: float  # weighted by the mixture weights
    modes_covered: int  # data modes whose components carry >= 1e-2 of the usage together (mode_groups)
    num_modes: int  # distinct labels of the data
    mode_shares: dict[int, float]  # data mode -> share of the prior's samples that land in it
    data_shares: dict[int, float] | None = None  # data mode -> its share of the data, when known
    mode_share_tv: float | None = None  # total variation between mode_shares and data_shares
    placement: Placement | None = None  # where each data mode's samples lie (data in coordinates)

    def metrics(self) -> dict[str, float]:
        out = {"mode_purity": self.mode_purity, "modes_covered": float(self.modes_covered)}
        if self.mode_share_tv is not None:
            out["mode_share_tv"] = self.mode_share_tv
        if self.placement is not None and self.placement.offset_max is not None:
            out["mode_offset_max"] = self.placement.offset_max
        return out


@dataclass(frozen=True)
class Placement:
    """Each data mode's prior samples against the data's points of that mode (module docstring).

    ``offsets`` / ``widths``: data mode -> value in units of the mode's spread, for the modes the prior
    draws with share >= ``min_share``; None for a data mode it draws less often (too few samples to place).
    """

    offsets: dict[int, float | None]
    widths: dict[int, float | None]
    centres: dict[int, list[float]]  # data mode -> the data's mean of it (for plots)
    means: dict[int, list[float]]  # data mode -> the prior samples' mean in it, where placed

    def displaced(self, threshold: float = DISPLACED_OFFSET) -> list[int]:
        """The data modes whose samples sit ``threshold`` spreads or more off the data's centre."""
        return [k for k, v in self.offsets.items() if v is not None and v >= threshold]

    @property
    def offset_max(self) -> float | None:
        values = [v for v in self.offsets.values() if v is not None]
        return max(values) if values else None


def knn_labels(reference: Tensor, reference_labels: Tensor, query: Tensor, k: int = 15,
               chunk: int = 4_096) -> Tensor:
    """Majority label of the ``k`` nearest ``reference`` points of every ``query`` point: (Q,) int64.

    Ties go to the smallest label (``torch.mode``). reference (R, d), reference_labels (R,), query (Q, d).
    """
    if reference.shape[0] < k:
        raise ValueError(f"k: {k} nearest neighbours need at least {k} reference points, got {reference.shape[0]}")
    ref, labels = reference.float(), reference_labels.long()
    out = []
    for i in range(0, query.shape[0], chunk):
        d = torch.cdist(query[i:i + chunk].float(), ref)  # (q, R)
        nearest = d.topk(k, dim=1, largest=False).indices  # (q, k)
        out.append(torch.mode(labels[nearest], dim=1).values)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def label_shares(labels: Tensor, weights: Tensor | None = None) -> dict[int, float]:
    """Share of each label: ``labels`` (N,) plain, or (M, S) rows averaged with ``weights`` (M,)."""
    labels = labels.long().cpu()
    if labels.dim() == 1:
        labels, weights = labels.unsqueeze(0), None
    w = torch.ones(labels.shape[0], dtype=torch.float64) if weights is None else weights.detach().double().cpu()
    w = w / w.sum()
    values = sorted(set(labels.flatten().tolist()))
    return {v: float((w * (labels == v).double().mean(1)).sum()) for v in values}


def total_variation(p: dict[int, float], q: dict[int, float]) -> float:
    """``0.5 * sum_k |p_k - q_k|`` over the union of the keys (a missing key has share 0)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def mode_groups(majority: list[int | None], usage: Tensor, threshold: float = 1e-2) -> dict[int, list[int]]:
    """Data mode -> the components that stand for it, for every mode the prior offers.

    majority: (M,) each component's majority data mode (None: unknown); usage: (M,) the components'
    usage ``c_i`` (or weights). A mode is offered when the components whose majority it is carry
    ``>= threshold`` of the usage together; it is then stood for by those of them that are active
    (``c_i >= threshold``), or by all of them when the mode is split over components each below the
    threshold. Modes in ascending order, components in index order.
    """
    u = usage.detach().double().cpu()
    if len(majority) != u.numel():
        raise ValueError(f"majority: {len(majority)} labels for {u.numel()} components")
    group: dict[int, list[int]] = {}
    for i, k in enumerate(majority):
        if k is not None:
            group.setdefault(int(k), []).append(i)
    active = active_mask(u, threshold)
    out = {}
    for k in sorted(group):
        idx = group[k]
        if float(u[idx].clamp_min(0).sum()) >= threshold:
            out[k] = [i for i in idx if bool(active[i])] or idx
    return out


def mode_placement(samples: Tensor, sample_labels: Tensor, weights: Tensor, reference: Tensor,
                   reference_labels: Tensor, min_share: float = 1e-2) -> Placement:
    """Offset and width of each data mode's prior samples (module docstring), in float64.

    samples: (M, S, d) decoded samples of each of M components; sample_labels: (M, S) their data-mode
    labels; weights: (M,) mixture weights (a component's samples count with its weight, as the prior
    draws them); reference: (R, d) labelled data points, reference_labels: (R,), which give each mode's
    centre and spread. A data mode with no reference points, or one whose spread is 0, is left out.
    """
    m, s = sample_labels.shape
    x = samples.detach().double().cpu().reshape(m, s, -1)
    labels = sample_labels.long().cpu()
    w = weights.detach().double().cpu()
    w = (w / w.sum() / s).unsqueeze(1).expand(m, s)  # each sample's probability under the prior
    ref, ref_labels = reference.detach().double().cpu(), reference_labels.long().cpu()
    d = ref.shape[1]
    if x.shape[2] != d:
        raise ValueError(f"samples: {x.shape[2]} coordinates, the reference points have {d}")
    offsets: dict[int, float | None] = {}
    widths: dict[int, float | None] = {}
    centres: dict[int, list[float]] = {}
    means: dict[int, list[float]] = {}
    for k in sorted(set(ref_labels.tolist())):
        pts = ref[ref_labels == k]
        centre = pts.mean(0)
        spread = float(((pts - centre) ** 2).sum(1).mean().div(d).sqrt())
        if spread <= 0.0:
            continue
        centres[k] = centre.tolist()
        mask = labels == k
        mass = float(w[mask].sum())
        if mass < min_share:
            offsets[k] = widths[k] = None
            continue
        pw = w[mask] / mass
        mine = x[mask]  # (n, d)
        mean = (pw.unsqueeze(1) * mine).sum(0)
        means[k] = mean.tolist()
        offsets[k] = float((mean - centre).norm()) / spread
        widths[k] = float((pw * ((mine - mean) ** 2).sum(1)).sum().div(d).sqrt()) / spread
    return Placement(offsets=offsets, widths=widths, centres=centres, means=means)


def mode_purity(sample_labels: Tensor, weights: Tensor, usage: Tensor | None = None,
                num_modes: int | None = None, data_labels: Tensor | None = None) -> Purity:
    """Purity from the labels of each component's samples.

    sample_labels: (M, S) int, the data-mode label of S decoded samples of each of M components;
    weights: (M,) mixture weights (normalised here); usage: (M,) the components' usage, which
    decides ``modes_covered`` (``mode_groups``; default: the weights); num_modes: the data's number
    of modes (default: the distinct labels seen); data_labels: (N,) labels of data points, for
    ``data_shares`` and ``mode_share_tv`` (None: both absent).
    """
    m, s = sample_labels.shape
    if s == 0:
        raise ValueError("sample_labels: need at least one sample per component")
    labels = sample_labels.long()
    majority = torch.mode(labels, dim=1).values  # (M,)
    purity = (labels == majority.unsqueeze(1)).double().mean(1)  # (M,)
    w = weights.detach().double().cpu()
    w = w / w.sum()
    covered = len(mode_groups(majority.tolist(), w if usage is None else usage))
    shares = label_shares(labels, w)
    data_shares = None if data_labels is None or data_labels.numel() == 0 else label_shares(data_labels)
    return Purity(purity=purity.tolist(), majority=majority.tolist(), mode_purity=float((w * purity).sum()),
                  modes_covered=covered, num_modes=num_modes or len(set(labels.flatten().tolist())),
                  mode_shares=shares, data_shares=data_shares,
                  mode_share_tv=None if data_shares is None else total_variation(shares, data_shares))


def mixture_purity(sample_labels: Tensor, weights: Tensor, usage: Tensor | None = None,
                   num_modes: int | None = None, data_labels: Tensor | None = None,
                   samples: Tensor | None = None, data_points: Tensor | None = None) -> Purity:
    """``mode_purity`` of a mixture prior, its modes covered by SPEC §4's usage ``c_i`` (the weights
    when no usage is known). With the decoded ``samples`` (M, S, d) and the labelled ``data_points``
    (R, d) of ``data_labels``: also ``placement`` (``mode_placement``)."""
    purity = mode_purity(sample_labels, weights.detach().cpu(), None if usage is None else usage.cpu(),
                         num_modes=num_modes, data_labels=data_labels)
    if samples is None or data_points is None or data_labels is None:
        return purity
    return replace(purity, placement=mode_placement(samples, sample_labels, weights, data_points, data_labels))


def purity_extra(purity: Purity) -> dict[str, Any]:
    """What a checkpoint keeps of a purity measurement (``extra``): the per-component lists
    ``mode_purity`` and ``majority_mode``, and ``mode_shares`` (data mode -> share of the prior's
    samples), with ``data_shares`` when the data's own shares are known and ``mode_offsets`` /
    ``mode_widths`` (data mode -> value or None) when the placement was measured."""
    out: dict[str, Any] = {"mode_purity": purity.purity, "majority_mode": purity.majority,
                           "mode_shares": dict(purity.mode_shares)}
    if purity.data_shares is not None:
        out["data_shares"] = dict(purity.data_shares)
    if purity.placement is not None:
        out["mode_offsets"] = dict(purity.placement.offsets)
        out["mode_widths"] = dict(purity.placement.widths)
    return out
