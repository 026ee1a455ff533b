"""Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by
Activation Clustering", SafeAI@AAAI 2019; arXiv 2018)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning

from eglib.defenses.base import register_defense
from eglib.defenses.detection import Detection
from eglib.defenses.filtering import FilteringDefense, check_features, label_groups
from eglib.params import check_choice, check_float, check_int

REDUCTIONS: tuple[str, ...] = ("ica", "pca")


def numerical_rank(X: np.ndarray, rtol: float = 1e-6) -> int:
    """Number of singular values of the centred X above `rtol` times the largest (0 if flat)."""
    s = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    return int((s > rtol * s[0]).sum()) if s.size and s[0] > 0 else 0


def two_means(X: np.ndarray, dims: int, reduce: str, seed: int) -> tuple[np.ndarray, bool]:
    """Reduce rows X (n, D) to `dims` components (FastICA or PCA) and split them by 2-means.

    Returns (cluster of each row (n,) in {0, 1}, whether the reduction converged). The
    components are capped at min(dims, n - 1, numerical rank of X): dead units (constant
    activations) would make FastICA's whitening divide by zero. If FastICA does not converge
    (e.g. on Gaussian data) its result is used anyway; if it returns non-finite values, PCA
    is used instead; both are reported as not converged. Flat data is one cluster.
    """
    n_comp = min(dims, X.shape[0] - 1, numerical_rank(X))
    if n_comp < 1:
        return np.zeros(X.shape[0], dtype=np.int64), True
    converged = True
    Y = None
    if reduce == "ica":
        ica = FastICA(n_components=n_comp, random_state=seed, max_iter=500)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            Y = ica.fit_transform(X)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if not np.isfinite(Y).all():
            Y, converged = None, False
    if Y is None:
        Y = PCA(n_components=n_comp, random_state=seed).fit_transform(X)
    km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(Y)
    return km.labels_.astype(np.int64), converged


@register_defense
class ActivationClustering(FilteringDefense):
    """Activation clustering: per label, 2-means on reduced activations; drop small clusters.

    Train on the poisoned data; take the penultimate activations, globally pooled; within
    each label reduce them to `dims` components (FastICA as in the paper and BackdoorBench,
    or PCA) and split them into two clusters with k-means (sklearn, seeded). The smaller
    cluster is flagged as poison when its share of the label is below `size_threshold`
    (the paper's relative-size analysis); flagged clusters are removed and a fresh model is
    retrained on the rest.

    Score (for AUROC): 1 - the share of the label held by the sample's cluster, so samples
    in small clusters score high; with size_threshold <= 0.5 a cluster is flagged exactly
    when its samples score above 1 - size_threshold.

    When the poison outnumbers its label's clean samples (all-to-one at 10 % on 10 classes:
    about 53 % of the target label), AC cannot tell: the smaller cluster is then the CLEAN
    part. If its share is >= `size_threshold` nothing is flagged in that label (the poison
    stays); if it is below, the clean samples of the target label are removed and the
    poison kept. This implementation does not guess which case holds (it has no ground
    truth); it reports, per label, both cluster sizes, the smaller share, whether it was
    flagged and whether FastICA converged (`info['clusters']`), so a notebook can show the
    failure at 10 %.

    Parameters (defaults): dims=10 and size_threshold=0.35 (Chen et al.; BackdoorBench
    `nb_dims: 10`, `nb_clusters: 2`; size_threshold=1 always flags the smaller cluster,
    BackdoorBench's `cluster_analysis: smaller`), reduce='ica', seed=0, layer=None
    ('penultimate'), pool='mean', batch_size=256. Labels with fewer than 4 samples are not
    clustered.
    """

    name = "ac"

    def __init__(
        self,
        dims: int = 10,
        size_threshold: float = 0.35,
        reduce: str = "ica",
        seed: int = 0,
        *,
        layer: str | None = None,
        pool: str = "mean",
        batch_size: int = 256,
    ) -> None:
        super().__init__(layer=layer, pool=pool, batch_size=batch_size)
        self.dims = check_int("dims", dims, 1)
        self.size_threshold = check_float("size_threshold", size_threshold, low=0.0, high=1.0)
        self.reduce = check_choice("reduce", reduce, REDUCTIONS)
        self.seed = check_int("seed", seed, 0)

    def detect(self, features: torch.Tensor, labels: torch.Tensor) -> Detection:
        """Cluster each label in two; flag the smaller cluster if its share < size_threshold."""
        check_features(features, labels)
        n = features.shape[0]
        scores = torch.zeros(n, dtype=torch.float64)
        removed = torch.zeros(n, dtype=torch.bool)
        clusters: list[dict[str, Any]] = []
        for label, idx in label_groups(labels):  # loop over labels
            if idx.numel() < 4:
                continue
            X = features[idx.to(features.device)].double().cpu().numpy()
            assign, converged = two_means(X, self.dims, self.reduce, self.seed)
            sizes = np.bincount(assign, minlength=2)
            small = int(np.argmin(sizes))
            share = float(sizes[small]) / idx.numel()
            flagged = share < self.size_threshold
            scores[idx] = torch.from_numpy(1.0 - sizes[assign] / idx.numel())
            removed[idx[torch.from_numpy(assign == small)]] = flagged
            clusters.append(
                {
                    "label": label,
                    "sizes": [int(sizes[small]), int(sizes[1 - small])],
                    "smaller_share": share,
                    "flagged": flagged,
                    "converged": converged,
                }
            )
        info = {
            "clusters": clusters,
            "labels_flagged": [c["label"] for c in clusters if c["flagged"]],
        }
        return Detection(scores, removed, info)
