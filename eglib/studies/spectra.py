"""Observation 2: where the trigger lives in feature space. For trained cnn-small models
(BadNets, Blend) and every stage: singular spectra of clean, triggered, mixed and difference
batches at equal row counts; t-SNE of a mixed batch's top-k projection vs its tail; and the
numbers behind it (trigger energy in the top-k subspace vs a random one, neighbour purity)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from eglib.config import get_profile
from eglib.experiments import run_experiment
from eglib.params import check_chosen, check_seeds
from eglib.plots import projection_tsne, separation_summary, singular_spectra
from eglib.spectral import (
    capture_features,
    effective_rank_of_spectrum,  # from singular values: one decomposition per group, not three
    flatten_rows,
    singular_values,
    stable_rank_of_spectrum,
    top_right_basis,
    top_tail_projections,
    tsne_embed,
)
from eglib.studies import rank_vs_asr
from eglib.studies.base import NotRedrawable, StudyResult, paired_test_images
from eglib.studies.metrics import (
    energy_fraction,
    neighbour_agreement,
    pairwise_distances,
    random_basis,
    silhouette,
)

NAME = "spectra"
ATTACKS = ("badnets", "blend")
K = 10  # top directions; features are not centred, as in EigenGuard's own SVD
MIX_RATE = 0.1  # triggered share of the mixed batch (the poison rate)
N_NEIGHBORS = 10


@dataclass(frozen=True)
class SpectraSettings:
    """Sizes per profile: rows per batch (equal for every group) and t-SNE stages."""

    rows: int
    tsne_stages: tuple[str, ...]


SETTINGS: dict[str, SpectraSettings] = {
    "ci": SpectraSettings(rows=200, tsne_stages=("layer1", "layer3")),
    "demo": SpectraSettings(rows=500, tsne_stages=("layer1", "layer3")),
    "lite": SpectraSettings(rows=500, tsne_stages=("layer1", "layer3")),
    "full": SpectraSettings(rows=1000, tsne_stages=("stem", "layer1", "layer2", "layer3")),
}


def mixed_mask(n: int, rate: float, seed: int) -> torch.Tensor:
    """Bool (n,): max(2, round(rate * n)) rows drawn with `seed` are the triggered ones."""
    count = max(2, round(rate * n))
    if count >= n:
        raise ValueError(f"rate={rate} of n={n} rows leaves no clean row; need more rows")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]] = True
    return mask


@dataclass
class StageMeasures:
    """One stage's numbers (a table row), each group's singular values, and the mixed batch's
    top-k coordinates (n, k) and tail (n, D)."""

    row: dict[str, Any]
    spectra: dict[str, torch.Tensor]
    top: torch.Tensor
    tail: torch.Tensor


def stage_measures(
    clean: torch.Tensor,
    triggered: torch.Tensor,
    mask: torch.Tensor,
    classes: torch.Tensor,
    *,
    k: int = K,
    seed: int = 0,
) -> StageMeasures:
    """Rank, energy and separation numbers of one stage, plus each group's singular values.

    clean / triggered: features (n, ...) of the same n images without / with the trigger;
    mask: bool (n,), rows of the mixed batch taken from `triggered`; classes: (n,) source
    classes. Groups (all n rows): clean, triggered, mixed, diff = triggered - clean.
    Energy: share of ||diff||^2 in the top-k right-singular subspace of the mixed batch, of the
    clean batch, and of a random k-subspace (chance k / D). Separation, in the mixed batch's
    top-k coordinates and in its tail: kNN purity of the triggered rows (poisoned vs clean),
    agreement of their neighbours' source classes, and the poisoned/clean silhouette.
    """
    groups = {
        "clean": clean,
        "triggered": triggered,
        "mixed": torch.where(mask.view(-1, *[1] * (clean.dim() - 1)), triggered, clean),
        "diff": triggered - clean,
    }
    dim = flatten_rows(clean).shape[1]
    row: dict[str, Any] = {"rows": len(clean), "poisoned_rows": int(mask.sum()), "k": k, "dim": dim}
    spectra = {}
    for group, feats in groups.items():
        spectra[group] = singular_values(feats)
        row[f"erank_{group}"] = effective_rank_of_spectrum(spectra[group])
        row[f"srank_{group}"] = stable_rank_of_spectrum(spectra[group])
    top, tail = top_tail_projections(groups["mixed"], k)
    bases = {
        "top_mixed": top_right_basis(groups["mixed"], k),
        "top_clean": top_right_basis(clean, k),
        "random": random_basis(dim, k, seed=seed),
    }
    for label, basis in bases.items():
        row[f"energy_{label}"] = energy_fraction(groups["diff"], basis)
    row["energy_chance"] = k / dim
    poisoned = mask.long()
    for space, X in (("top", top), ("tail", tail)):
        dist = pairwise_distances(X)
        row[f"knn_poison_{space}"] = neighbour_agreement(
            dist, poisoned, mask, n_neighbors=N_NEIGHBORS
        )
        row[f"knn_source_{space}"] = neighbour_agreement(
            dist, classes, mask, n_neighbors=N_NEIGHBORS
        )
        row[f"silhouette_{space}"] = silhouette(dist, poisoned)
    row["knn_poison_chance"] = (int(mask.sum()) - 1) / (len(mask) - 1)
    return StageMeasures(row, spectra, top, tail)


def tsne_records(
    measures: StageMeasures, mask: torch.Tensor, classes: torch.Tensor, *, seed: int = 0
) -> list[dict[str, Any]]:
    """t-SNE (seeded) of the mixed batch's top-k coordinates and of its tail, one record each;
    each record's caption holds that space's kNN purity and silhouette."""
    records = []
    k = measures.top.shape[1]
    for space, X in (("top", measures.top), ("tail", measures.tail)):
        idx, xy = tsne_embed(
            X, max_points=len(X), seed=seed, perplexity=min(30.0, (len(X) - 1) / 3)
        )
        records.append(
            {
                "space": f"top-{k}" if space == "top" else "tail",
                "xy": xy.numpy(),
                "classes": classes[idx].numpy(),
                "poisoned": mask[idx].numpy(),
                "caption": _caption(measures.row, space),
            }
        )
    return records


def _caption(row: dict[str, Any], space: str) -> str:
    return (
        f"kNN purity {row[f'knn_poison_{space}']:.2f} (chance {row['knn_poison_chance']:.2f}),"
        f" silhouette {row[f'silhouette_{space}']:.2f}"
    )


def run(
    profile: str | None = None,
    *,
    progress: bool = True,
    attacks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    k: int = K,
) -> StudyResult:
    """Measure every stage of the rank_vs_asr study's trained models (same configs: cached),
    one row per attack, seed (default: the profile's first) and stage; the spectra and t-SNE
    are drawn for the first seed only."""
    prof = get_profile(profile)
    attacks = check_chosen("attacks", attacks, ATTACKS)
    chosen_seeds = check_seeds(seeds, prof.seeds[:1])
    settings = SETTINGS[prof.name]
    rows: list[dict[str, Any]] = []
    spectrum_records: list[dict[str, Any]] = []
    tsne: list[dict[str, Any]] = []
    configs: list[dict[str, Any]] = []
    runs = [(attack, seed) for attack in attacks for seed in chosen_seeds]
    for attack, seed in tqdm(runs, desc=NAME, disable=not progress):
        cfg = rank_vs_asr.config_for(attack, prof.name, seed)
        configs.append(cfg.to_dict())
        result = run_experiment(cfg, progress=progress)
        clean_images, trig_images, source_labels = paired_test_images(result, settings.rows, seed)
        n = len(clean_images)
        classes = source_labels.cpu()
        mask = mixed_mask(n, MIX_RATE, seed)
        stages = result.model.stages
        clean = capture_features(result.model, clean_images, stages)
        triggered = capture_features(result.model, trig_images, stages)
        metrics = result.record["metrics"]
        drawn = seed == chosen_seeds[0]
        for stage in stages:
            measures = stage_measures(clean[stage], triggered[stage], mask, classes, k=k, seed=seed)
            rows.append(
                {
                    "attack": attack,
                    "seed": seed,
                    "stage": stage,
                    **measures.row,
                    "model_acc": metrics["acc"],
                    "model_asr": metrics.get("asr"),
                }
            )
            if not drawn:
                continue
            spectrum_records.extend(
                {
                    "attack": attack,
                    "stage": stage,
                    "group": g,
                    "spectrum": s.numpy(),
                    "rows": n,
                    **({"poisoned_rows": int(mask.sum())} if g == "mixed" else {}),
                }
                for g, s in measures.spectra.items()
            )
            if stage in settings.tsne_stages:
                tsne.extend(
                    {"attack": attack, "stage": stage, **rec}
                    for rec in tsne_records(measures, mask, classes, seed=seed)
                )
    return StudyResult(
        name=NAME,
        profile=prof.name,
        rows=rows,
        seeds=chosen_seeds,
        data={"spectra": spectrum_records, "tsne": tsne},
        notes={
            "attacks": list(attacks),
            "k": k,
            "rows_per_group": settings.rows,
            "mix_rate": MIX_RATE,
            "tsne_stages": list(settings.tsne_stages),
            "spectra_and_tsne_seed": chosen_seeds[0],
            "n_neighbors": N_NEIGHBORS,
            "centred": False,
            "configs": configs,
        },
    )


def data_from_tables(tables: dict[str, list[dict[str, Any]]], command: str) -> dict[str, Any]:
    """Refused: the spectra and t-SNE need the features, which no table holds."""
    raise NotRedrawable(
        f"{NAME} draws singular values and t-SNE embeddings that its tables do not hold; "
        f"rerun `{command}`"
    )


def figures(result: StudyResult) -> dict[str, Figure]:
    """Spectra (''), t-SNE ('tsne') and the separation numbers ('separation')."""
    n = result.rows[0]["rows"] if result.rows else 0
    figs = {
        "": singular_spectra(result.data["spectra"]),
        "separation": separation_summary(result.rows),
    }
    if result.data["tsne"]:
        figs["tsne"] = projection_tsne(
            result.data["tsne"],
            title=f"t-SNE of a mixed batch ({n} test images, {MIX_RATE:.0%} triggered, seeded)\n"
            f"top-{result.notes['k']} projection vs tail; colour = true class, X = triggered",
        )
    return figs
