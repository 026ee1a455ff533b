"""Spectral signatures (Tran, Li & Madry, "Spectral Signatures in Backdoor Attacks",
NeurIPS 2018)."""

from __future__ import annotations

from typing import Any

import torch

from eglib.defenses.base import register_defense
from eglib.defenses.filtering import ScoreFilteringDefense, top_projection_norms


@register_defense
class SpectralSignatures(ScoreFilteringDefense):
    """Spectral signatures: per label, the squared projection on the top singular direction.

    Train on the poisoned data; take the penultimate representation (the map the classifier
    pools, globally average-pooled: (N, C)); within each label centre the features and score each
    sample by its squared projection on the top right-singular vector of that matrix; remove
    the top `removal_factor * rate_guess` fraction of every label; retrain a fresh model.

    Parameters (defaults): rate_guess=0.1 (the defender's guess of the poison fraction; the
    paper's epsilon), removal_factor=1.5 (the paper removes 1.5 epsilon per label; with 0.1
    this is BackdoorBench's `percentile: 85`), layer=None ('penultimate'), pool='mean',
    batch_size=256 (feature capture only). The score assumes the poison is a minority of its
    label: when it is the majority (all-to-one at 10 % on 10 classes), the top direction
    still separates the groups but the centre lies between them, and removing 15 % of the
    label misses most of the poison (see the detection table). EigenGuard's score with k=1,
    per label, at this layer ranks samples identically (the same projection, not squared).
    """

    name = "ss"

    def __init__(
        self,
        rate_guess: float = 0.1,
        removal_factor: float = 1.5,
        *,
        layer: str | None = None,
        pool: str = "mean",
        batch_size: int = 256,
    ) -> None:
        super().__init__(rate_guess, removal_factor, layer=layer, pool=pool, batch_size=batch_size)

    def score(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Squared projection (N,) on the top right-singular vector of each label's centred
        features."""
        return top_projection_norms(features, labels, 1, per_label=True).square(), {}
