"""Numbers that test observation 2 instead of eyeballing a t-SNE: how much of the trigger's
feature change lies in a subspace, and how well a projection separates groups of rows."""

from __future__ import annotations

import torch

from eglib.spectral import flatten_rows


def random_basis(dim: int, k: int, *, seed: int) -> torch.Tensor:
    """A seeded, uniformly random orthonormal basis (dim, k) of a k-dimensional subspace."""
    if not 1 <= k <= dim:
        raise ValueError(f"k={k}; must be in [1, dim = {dim}]")
    gaussian = torch.randn(
        dim, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    q, _ = torch.linalg.qr(gaussian)
    return q


def energy_fraction(rows: torch.Tensor, basis: torch.Tensor) -> float:
    """Share of the rows' total squared norm inside span(basis): ||R Q||_F^2 / ||R||_F^2.

    rows: (N, ...) flattened to (N, D); basis: (D, k) with orthonormal (or zero) columns.
    A random k-subspace of R^D holds about k / D of any fixed vector's energy.
    """
    R = flatten_rows(rows).to(torch.float64)
    if basis.shape[0] != R.shape[1]:
        raise ValueError(f"basis has {basis.shape[0]} rows; the rows have dimension {R.shape[1]}")
    total = float(R.square().sum())
    if total == 0:
        raise ValueError("rows are all zero: their energy fraction is undefined")
    return float((R @ basis.to(torch.float64)).square().sum()) / total


def pairwise_distances(X: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, N) between the flattened rows of X, float64, zero diagonal."""
    M = flatten_rows(X).to(torch.float64)
    return torch.cdist(M, M).fill_diagonal_(0.0)


def neighbour_agreement(
    dist: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, *, n_neighbors: int = 10
) -> float:
    """Mean over the `query` rows (bool mask) of the fraction of their nearest neighbours that
    share their label; `dist`: (N, N) distances (`pairwise_distances`), self excluded.

    With labels = poisoned/clean this is the kNN purity of the poisoned group (chance level:
    (n_poisoned - 1) / (N - 1)); with labels = source classes it says whether poisoned rows
    sit among their own classes.
    """
    n = len(labels)
    if dist.shape != (n, n):
        raise ValueError(f"dist has shape {tuple(dist.shape)}; expected ({n}, {n})")
    if not 1 <= n_neighbors < n or int(query.sum()) == 0:
        raise ValueError(
            f"n_neighbors={n_neighbors}, {int(query.sum())} query rows, N={n}; "
            "need 1 <= n_neighbors < N and at least one query row"
        )
    masked = dist[query].clone()
    masked[torch.arange(len(masked)), query.nonzero().flatten()] = float("inf")
    nearest = masked.topk(n_neighbors, largest=False).indices
    same = labels[nearest] == labels[query].unsqueeze(1)
    return float(same.to(torch.float64).mean())


def silhouette(dist: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette score (in [-1, 1]) of a labelling, from (N, N) distances."""
    from sklearn.metrics import silhouette_score

    if len(torch.unique(labels)) < 2:
        raise ValueError("silhouette needs at least two distinct labels")
    return float(silhouette_score(dist.numpy(), labels.cpu().numpy(), metric="precomputed"))
