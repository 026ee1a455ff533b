"""Data-filtering defences: train, score every sample from the model's features, remove the
most suspicious ones, retrain a fresh model on the rest.

`FilteringDefense` holds the shared procedure (and the feature extraction: one stage's output,
average-pooled or flattened); subclasses implement `detect(features, labels) -> Detection`.
`ScoreFilteringDefense` adds the common rule "remove the top `removal_factor * rate_guess`
fraction of scores, per label or overall" (Tran et al. 2018 remove 1.5 x the expected poison
fraction per label; SPECTRE does the same). Ground truth `ctx.poison_idx` is used only for
the detection metrics put into the outcome's info.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar, Literal

import torch

from eglib.defenses.base import Defense, DefenseContext, DefenseOutcome
from eglib.defenses.detection import Detection, detection_report
from eglib.defenses.loops import poisoned_model, train_phase
from eglib.models.base import PENULTIMATE, StagedNet
from eglib.params import check_choice, check_float, check_int, check_layer
from eglib.spectral import capture_features, top_coordinates

POOLS: tuple[str, ...] = ("mean", "flatten")


def pool_features(features: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, C, H, W) stage output -> (N, C) ('mean': global average pool) or (N, C*H*W)
    ('flatten'); (N, D) features are returned as they are."""
    check_choice("pool", pool, POOLS)
    if pool == "mean" and features.dim() > 2:
        return features.flatten(2).mean(dim=2)
    return features.reshape(features.shape[0], -1)


def check_features(features: torch.Tensor, labels: torch.Tensor) -> None:
    """ValueError unless `features` is a finite (N, D) float matrix with N labels (N,)."""
    if features.dim() != 2 or labels.dim() != 1 or features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"features must be (N, D) with one label per row; got {tuple(features.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    if features.shape[0] == 0 or not features.is_floating_point():
        raise ValueError(
            f"features must be a non-empty float matrix; got {features.dtype} "
            f"{tuple(features.shape)}"
        )
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features have NaN or inf entries")


def label_groups(labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(label, indices of its samples) for every label present, ascending."""
    labels = labels.cpu()
    return [(int(c), (labels == c).nonzero().reshape(-1)) for c in labels.unique()]


def remove_top_fraction(
    scores: torch.Tensor, labels: torch.Tensor, fraction: float, *, per_label: bool
) -> torch.Tensor:
    """Bool mask (N,) of the fraction * n (half up) highest scores, within each label or overall."""
    check_float("fraction", fraction, low=0.0, high=1.0)
    scores = scores.cpu()
    removed = torch.zeros(scores.numel(), dtype=torch.bool)
    groups = label_groups(labels) if per_label else [(-1, torch.arange(scores.numel()))]
    for _, idx in groups:  # loop over labels
        count = int(fraction * idx.numel() + 0.5)
        if count:
            removed[idx[scores[idx].topk(count).indices]] = True
    return removed


def top_projection_norms(
    features: torch.Tensor, labels: torch.Tensor, k: int, *, per_label: bool
) -> torch.Tensor:
    """Norm (N,) of each sample's projection on the top-k right-singular vectors of its group's
    centred feature matrix (the group: its label, or all samples). k is capped at the group's
    min(n, D). Spectral signatures are this with k=1 per label, squared."""
    check_int("k", k, 1)
    out = torch.zeros(features.shape[0], dtype=torch.float64)
    groups = label_groups(labels) if per_label else [(-1, torch.arange(features.shape[0]))]
    for _, idx in groups:  # loop over labels
        group = features[idx.to(features.device)]
        top = top_coordinates(group, min(k, *group.shape), center=True)
        out[idx] = top.norm(dim=1).cpu()
    return out


class FilteringDefense(Defense):
    """Base of the data-filtering defences (see the module docstring).

    Parameters: `layer` (the feature scored: a stage's output or 'penultimate', see
    `StagedNet.feature_module`; None: the class default, 'penultimate' (the representation
    the classifier reads, which the papers score) or the model's `default_guard_stage`),
    `pool` ('mean' or 'flatten'),
    `batch_size` (feature capture). Subclasses call `super().__init__` with these.
    """

    stage = "data"
    starts_from_poisoned_model = True
    default_layer: ClassVar[Literal["penultimate", "guard"]] = "penultimate"

    def __init__(self, *, layer: str | None, pool: str, batch_size: int = 256) -> None:
        self.layer = check_layer("layer", layer)
        self.pool = check_choice("pool", pool, POOLS)
        self.batch_size = check_int("batch_size", batch_size, 1)

    def resolve_layer(self, model: StagedNet) -> str:
        """The feature scored on `model` (KeyError listing the valid ones if unknown)."""
        if self.layer is not None:
            name = self.layer
        elif self.default_layer == "penultimate":
            name = PENULTIMATE
        else:
            name = model.default_guard_stage
        model.feature_module(name)
        return name

    def check_model(self, model: StagedNet) -> None:
        """ValueError if `layer` is not one of the model's features."""
        try:
            self.resolve_layer(model)
        except KeyError as error:
            raise ValueError(f"layer={self.layer!r}: {error.args[0]}") from None

    def feature_key(self, model: StagedNet) -> tuple[str, str]:
        """(layer, pool): detectors with equal keys can share one feature matrix."""
        return self.resolve_layer(model), self.pool

    def features(
        self, model: StagedNet, images: torch.Tensor, *, device: torch.device | None = None
    ) -> torch.Tensor:
        """(N, D) float32 CPU features of uint8 `images` at this defence's layer and pooling."""
        layer = self.resolve_layer(model)
        captured = capture_features(
            model, images, [layer], batch_size=self.batch_size, device=device
        )
        return pool_features(captured[layer], self.pool)

    @abstractmethod
    def detect(self, features: torch.Tensor, labels: torch.Tensor) -> Detection:
        """Score the (N, D) `features` of samples with (N,) `labels`; choose which to remove."""

    def run(self, ctx: DefenseContext) -> DefenseOutcome:
        """Train on everything, detect on the trained model's features, retrain on the rest."""
        model = poisoned_model(self, ctx)
        # the scoring runs where the features are: the run's device (SVDs are fast there)
        features = self.features(model, ctx.images, device=ctx.device).to(ctx.device)
        found = self.detect(features, ctx.labels)
        keep = ~found.removed
        if not bool(keep.any()):
            raise ValueError(
                f"{self.name}: every training sample was flagged; nothing to retrain on"
            )
        defended = self.build_model(ctx)
        train_phase(ctx, defended, "filtered", keep=keep)
        info: dict[str, Any] = {
            "layer": self.resolve_layer(model),
            "pool": self.pool,
            "n_removed": int(found.removed.sum()),
            "n_kept": int(keep.sum()),
            "detection": detection_report(found.scores, ctx.poison_idx, found.removed),
            **found.info,
        }
        return DefenseOutcome(defended, info)


class ScoreFilteringDefense(FilteringDefense):
    """A filtering defence whose decision is "remove the top `removal_factor * rate_guess`".

    `rate_guess` is the defender's guess of the poison fraction (default 0.1); with
    `removal_factor` 1.5 the top 15 % of each label are removed (per label; BackdoorBench's
    spectral defence removes the scores above the 85th percentile, the same). Under an
    all-to-one attack the target label holds most of the poison, which can then exceed what
    is removed there: see the spec's pitfall and the detection table at 1, 5 and 10 %.
    Subclasses implement `score(features, labels) -> (scores, info)`.
    """

    per_label: bool = True

    def __init__(
        self,
        rate_guess: float = 0.1,
        removal_factor: float = 1.5,
        *,
        layer: str | None,
        pool: str,
        batch_size: int = 256,
    ) -> None:
        super().__init__(layer=layer, pool=pool, batch_size=batch_size)
        self.rate_guess = check_float(
            "rate_guess", rate_guess, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.removal_factor = check_float("removal_factor", removal_factor, low=0.0, low_open=True)
        if self.rate_guess * self.removal_factor >= 1:
            raise ValueError(
                f"rate_guess * removal_factor = {self.rate_guess * self.removal_factor:g}; "
                "must be < 1 (it is the fraction removed)"
            )

    @abstractmethod
    def score(
        self, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Suspicion scores (N,) (higher = more suspicious) and plain-JSON info."""

    def detect(self, features: torch.Tensor, labels: torch.Tensor) -> Detection:
        """Scores, then the top `removal_factor * rate_guess` fraction removed."""
        check_features(features, labels)
        scores, info = self.score(features, labels)
        fraction = self.rate_guess * self.removal_factor
        removed = remove_top_fraction(scores, labels, fraction, per_label=self.per_label)
        return Detection(scores.cpu(), removed, {"fraction_removed": fraction, **info})
