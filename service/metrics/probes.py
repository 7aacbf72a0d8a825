"""Representation probes on the latents (SPEC §7.4), as in the paper's code.

One stochastic latent per train and test image (drawn by the caller); a ``StandardScaler`` fit on
the train latents; four classifiers fit on train and scored on test:

| metric name    | classifier                                             |
| -------------- | ------------------------------------------------------ |
| ``svm_2k_acc`` | ``SVC(kernel='linear', C=0.025, max_iter=2000)``       |
| ``svm_10k_acc``| ``SVC(kernel='linear', C=0.025, max_iter=10000)``      |
| ``knn_5_acc``  | ``KNeighborsClassifier(n_neighbors=5)``                |
| ``knn_100_acc``| ``KNeighborsClassifier(n_neighbors=100)``              |

The iteration caps are part of the protocol (the SVMs usually stop at the cap), so the
scikit-learn ``ConvergenceWarning`` they raise is expected and silenced here.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

PROBES: dict[str, Callable[[], ClassifierMixin]] = {
    "svm_2k_acc": lambda: SVC(kernel="linear", C=0.025, max_iter=2_000),
    "svm_10k_acc": lambda: SVC(kernel="linear", C=0.025, max_iter=10_000),
    "knn_5_acc": lambda: KNeighborsClassifier(n_neighbors=5),
    "knn_100_acc": lambda: KNeighborsClassifier(n_neighbors=100),
}
MIN_TRAIN = 100  # k-NN(100) needs at least 100 training latents


def probe_accuracies(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray,
                     probes: tuple[str, ...] | None = None) -> dict[str, float]:
    """Test accuracy of each probe (all of ``PROBES`` by default) on standardised latents."""
    z_train, z_test = np.asarray(z_train, np.float64), np.asarray(z_test, np.float64)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if z_train.ndim != 2 or z_test.ndim != 2 or z_train.shape[1] != z_test.shape[1]:
        raise ValueError(f"latents: expected (N, D) train and test with the same D, got {z_train.shape} "
                         f"and {z_test.shape}")
    if len(y_train) != len(z_train) or len(y_test) != len(z_test):
        raise ValueError("labels: one label per latent is needed")
    if len(z_train) < MIN_TRAIN:
        raise ValueError(f"probes: {len(z_train)} training latents; at least {MIN_TRAIN} are needed (k-NN(100))")
    names = tuple(PROBES) if probes is None else probes
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise ValueError(f"probes: {unknown} not among {list(PROBES)}")
    scaler = StandardScaler().fit(z_train)
    z_train, z_test = scaler.transform(z_train), scaler.transform(z_test)
    out: dict[str, float] = {}
    for name in names:
        clf = PROBES[name]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(z_train, y_train)
        out[name] = float(clf.score(z_test, y_test))
    return out
