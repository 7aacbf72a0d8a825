"""Improved precision and recall of a generative model (Kynkäänniemi et al. 2019; SPEC §7.4).

Each set of feature vectors defines a manifold estimate: the union of balls centred at its
points, each with the radius to that point's k-th nearest neighbour *in its own set* (the point
itself not counted). Precision = share of generated points inside the real manifold; recall =
share of real points inside the generated manifold. A point on a ball's boundary counts as
inside (``<=``, as in the paper), so a set against itself gives exactly 1. (The intro_prior
code uses ``<`` and k = 4 for recall; SPEC fixes k = 3 for both.)

Distances are computed in float64, in blocks of 1,024 rows, so that 50,000 x 50,000 pairs never sit in
memory at once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DEFAULT_K = 3  # SPEC §7.4


def _as_tensor(x: np.ndarray | Tensor, device: str | torch.device | None = None) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"features: expected (N, D), got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float64)


def knn_radii(features: np.ndarray | Tensor, k: int = DEFAULT_K, block: int = 1024,
              device: str | torch.device | None = None) -> Tensor:
    """Distance of every point (N, D) to its k-th nearest *other* point of the same set: (N,)."""
    f = _as_tensor(features, device)
    if not 1 <= k < f.shape[0]:
        raise ValueError(f"k: {k} needs at least k + 1 = {k + 1} points, got {f.shape[0]}")
    radii = []
    for i in range(0, f.shape[0], block):
        d = torch.cdist(f[i:i + block], f)  # (b, N); row j holds 0 at the point itself
        # the (k+1)-th smallest in each row skips exactly one zero: the point's own distance
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(queries: np.ndarray | Tensor, manifold: np.ndarray | Tensor, radii: Tensor,
                      block: int = 1024) -> float:
    """Share of ``queries`` (Q, D) within ``radii[j]`` of at least one ``manifold[j]`` (N, D)."""
    q, m = _as_tensor(queries, radii.device), _as_tensor(manifold, radii.device)
    inside = 0
    for i in range(0, q.shape[0], block):
        d = torch.cdist(q[i:i + block], m)  # (b, N)
        inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / q.shape[0]


def precision_recall(real: np.ndarray | Tensor, fake: np.ndarray | Tensor, k: int = DEFAULT_K,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """``(precision, recall)`` of generated features ``fake`` against real features ``real``.

    ``device``: where the pairwise distances are computed (a GPU makes 50,000 x 50,000 Inception
    features a matter of seconds; on CPU it is the slow part of an evaluation).
    """
    precision = manifold_coverage(fake, real, knn_radii(real, k, device=device))
    recall = manifold_coverage(real, fake, knn_radii(fake, k, device=device))
    return precision, recall
