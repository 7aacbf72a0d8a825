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
- ``modes_covered``: how many distinct data modes are the majority of some *active* component
  (the prior offers a handle on that many modes).

Pure: tensors in, numbers out. ``knn_labels`` labels decoded 2D points by their nearest labelled
real points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..priors import active_mask


@dataclass(frozen=True)
class Purity:
    """Per-component and mixture-level mode purity (module docstring)."""

    purity: list[float]  # (M,) share of the majority label among each component's samples
    majority: list[int]  # (M,) majority label of each component
    mode_purity: float  # weighted by the mixture weights
    modes_covered: int  # distinct majority labels among active components
    num_modes: int  # distinct labels of the data

    def metrics(self) -> dict[str, float]:
        return {"mode_purity": self.mode_purity, "modes_covered": float(self.modes_covered)}


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


def mode_purity(sample_labels: Tensor, weights: Tensor, active: Tensor | None = None,
                num_modes: int | None = None) -> Purity:
    """Purity from the labels of each component's samples.

    sample_labels: (M, S) int, the data-mode label of S decoded samples of each of M components;
    weights: (M,) mixture weights (normalised here); active: (M,) bool, components counted by
    ``modes_covered`` (default: all); num_modes: the data's number of modes (default: the
    distinct labels seen).
    """
    m, s = sample_labels.shape
    if s == 0:
        raise ValueError("sample_labels: need at least one sample per component")
    labels = sample_labels.long()
    majority = torch.mode(labels, dim=1).values  # (M,)
    purity = (labels == majority.unsqueeze(1)).double().mean(1)  # (M,)
    w = weights.detach().double().cpu()
    w = w / w.sum()
    act = torch.ones(m, dtype=torch.bool) if active is None else active.bool().cpu()
    covered = len(set(majority[act].tolist()))
    return Purity(purity=purity.tolist(), majority=majority.tolist(), mode_purity=float((w * purity).sum()),
                  modes_covered=covered, num_modes=num_modes or len(set(labels.flatten().tolist())))


def mixture_purity(sample_labels: Tensor, weights: Tensor, usage: Tensor | None = None,
                   num_modes: int | None = None) -> Purity:
    """``mode_purity`` of a mixture prior with SPEC §4's active components: usage ``c_i >= 1e-2``,
    or weight ``>= 1e-2`` when no usage is known."""
    weights = weights.detach().cpu()
    active = active_mask(usage.cpu() if usage is not None else weights)
    return mode_purity(sample_labels, weights, active, num_modes=num_modes)
