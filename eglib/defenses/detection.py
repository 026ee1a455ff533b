"""Poison detection: the detector interface, its metrics, and tables comparing detectors.

A detector is a data-filtering defence (SS, SPECTRE, AC, EigenGuard score; see
`eglib.defenses.filtering`): from a trained model's features it scores every training sample
(higher = more suspicious) and picks the samples to remove. The scoring code lives once, in
each detector's `detect`; `score_samples` and `evaluate_detectors` call it, and so does the
defence's `run`. Ground truth (`poison_idx`) enters only `detection_report`, for reporting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

import torch
from sklearn.metrics import roc_auc_score

from eglib.defenses.base import DEFENSES, make_defense
from eglib.models.base import StagedNet


@dataclass
class Detection:
    """What a detector found: `scores` (N,) float (higher = more suspicious), `removed` (N,)
    bool (the samples it would drop), and plain-JSON `info` about how it decided."""

    scores: torch.Tensor
    removed: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Detector(Protocol):
    """A defence that can score samples: feature extraction plus detection on features."""

    def features(
        self, model: StagedNet, images: torch.Tensor, *, device: torch.device | None = None
    ) -> torch.Tensor:
        """(N, D) float features of uint8 `images` (N, C, H, W) at this detector's layer."""
        ...

    def feature_key(self, model: StagedNet) -> tuple[str, str]:
        """(layer, pooling): detectors with equal keys can share one feature matrix."""
        ...

    def detect(self, features: torch.Tensor, labels: torch.Tensor) -> Detection:
        """Score the (N, D) `features` of samples with (N,) `labels`; choose which to remove."""
        ...


def detector_names() -> list[str]:
    """Names of the registered defences that are detectors, sorted."""
    return sorted(name for name, cls in DEFENSES.items() if issubclass(cls, Detector))


def make_detector(name: str, **params: Any) -> Detector:
    """Build the detector called `name`; a name that is no detector lists the allowed ones."""
    allowed = detector_names()
    if name not in allowed:
        raise ValueError(f"unknown detector {name!r}; allowed: {allowed}")
    return cast(Detector, make_defense(name, **params))


def score_samples(
    detector_name: str, features: torch.Tensor, labels: torch.Tensor, **params: Any
) -> torch.Tensor:
    """Suspicion scores (N,) of a detector (with `params`) on (N, D) `features` and (N,) labels."""
    return make_detector(detector_name, **params).detect(features, labels).scores


def detection_report(
    scores: torch.Tensor, poison_idx: torch.Tensor, removed_mask: torch.Tensor
) -> dict[str, Any]:
    """How well `scores` (N,) and the removal `removed_mask` (N,) bool match the true poison.

    Returns plain data: auroc (of the scores vs poison membership; NaN with a `note` when
    there is no poison or nothing clean), tpr (fraction of the poison removed), fpr (fraction
    of the clean samples removed), precision (poison share of the removed), and counts.
    """
    scores = torch.as_tensor(scores).detach().cpu().double().reshape(-1)
    removed = torch.as_tensor(removed_mask).detach().cpu().reshape(-1)
    n = scores.numel()
    if removed.dtype != torch.bool or removed.numel() != n:
        raise ValueError(
            f"removed_mask must be bool with {n} entries (one per score); "
            f"got {removed.dtype} with {removed.numel()}"
        )
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    poison = torch.zeros(n, dtype=torch.bool)
    idx = torch.as_tensor(poison_idx).reshape(-1).cpu()
    if idx.numel() and (idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex()):
        raise ValueError(
            f"poison_idx must hold integer indices; got {idx.dtype} (a boolean mask: pass "
            "mask.nonzero().reshape(-1))"
        )
    idx = idx.long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"poison_idx out of range for {n} samples: [{idx.min()}, {idx.max()}]")
    poison[idx] = True
    n_poison, n_removed = int(poison.sum()), int(removed.sum())
    n_removed_poison = int((poison & removed).sum())
    report: dict[str, Any] = {
        "auroc": math.nan,
        "tpr": n_removed_poison / n_poison if n_poison else math.nan,
        "fpr": (n_removed - n_removed_poison) / (n - n_poison) if n > n_poison else math.nan,
        "precision": n_removed_poison / n_removed if n_removed else math.nan,
        "n_total": n,
        "n_poison": n_poison,
        "n_removed": n_removed,
        "n_removed_poison": n_removed_poison,
    }
    if 0 < n_poison < n:
        report["auroc"] = float(roc_auc_score(poison.numpy(), scores.numpy()))
    else:
        report["note"] = (
            "AUROC undefined: no poisoned samples"
            if n_poison == 0
            else "AUROC undefined: all samples poisoned"
        )
    return report


def evaluate_detectors(
    model: StagedNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    poison_idx: torch.Tensor,
    detectors: Mapping[str, Mapping[str, Any]] | Sequence[str] | None = None,
    *,
    device: torch.device | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run detectors on one trained model's features; one flat record per detector.

    `detectors`: names (default parameters) or {name: params}; None = every detector. Each
    record is {"detector", "params", **extra, **detection_report(...), "info": the
    detector's own plain-JSON account of its decision}; features are computed
    once per (layer, pooling). Put e.g. {"poison_rate": 0.05, "attack": "badnets"} in
    `extra` so `detection_table` can lay the records out side by side.
    """
    if detectors is None:
        detectors = detector_names()
    chosen = dict(detectors) if isinstance(detectors, Mapping) else {n: {} for n in detectors}
    cache: dict[tuple[str, str], torch.Tensor] = {}
    records = []
    for name, params in chosen.items():
        detector = make_detector(name, **params)
        key = detector.feature_key(model)
        if key not in cache:
            cache[key] = detector.features(model, images, device=device)
        found = detector.detect(cache[key], labels)
        report = detection_report(found.scores, poison_idx, found.removed)
        records.append(
            {
                "detector": name,
                "params": dict(params),
                **(extra or {}),
                **report,
                "info": found.info,
            }
        )
    return records


def detection_table(
    records: Iterable[Mapping[str, Any]],
    *,
    column: str = "poison_rate",
    metrics: Sequence[str] = ("auroc", "tpr", "fpr"),
    row_keys: Sequence[str] = ("attack", "detector"),
) -> list[dict[str, Any]]:
    """Lay flat detection records out as table rows (pandas-free, ready for csv.DictWriter).

    One row per distinct value of `row_keys` (keys no record has are left out); one column
    per metric and value of `column`, named like "auroc@5%" for poison_rate 0.05 (values of a
    key ending in "rate" are shown as percentages), metrics in the given order and column
    values ascending. Records sharing a row and column (e.g. seeds) are averaged; a missing
    cell is NaN. Rows are sorted by their keys.
    """
    records = list(records)
    keys = [k for k in row_keys if any(k in r for r in records)]
    cells: dict[tuple[Any, ...], dict[tuple[str, Any], list[float]]] = {}
    for record in records:
        if column not in record:
            raise ValueError(f"record {dict(record)} lacks the column key {column!r}")
        missing = [m for m in metrics if m not in record]
        if missing:
            raise ValueError(f"record {dict(record)} lacks the metrics {missing}")
        cell = cells.setdefault(tuple(record.get(k) for k in keys), {})
        for metric in metrics:
            cell.setdefault((metric, record[column]), []).append(float(record[metric]))
    values = sorted({record[column] for record in records})

    def name(metric: str, value: Any) -> str:
        shown = f"{100 * value:g}%" if column.endswith("rate") else str(value)
        return f"{metric}@{shown}"

    rows = []
    for row_id in sorted(cells, key=lambda r: tuple(str(v) for v in r)):
        row: dict[str, Any] = dict(zip(keys, row_id, strict=True))
        for metric in metrics:
            for value in values:
                got = cells[row_id].get((metric, value))
                row[name(metric, value)] = sum(got) / len(got) if got else math.nan
        rows.append(row)
    return rows
