"""Observation 1 under both centring conventions: is "triggered features have low effective
rank" a property of the trigger's directions, or of a mean shift?

The ranks of `eglib.spectral` are uncentred by default, as EigenGuard's own SVD is, and a
shift shared by every row (a trigger that adds the same activation to every image) lowers an
uncentred effective rank while the centred one ignores it. This study takes the trained
undefended models of the defence table (cached: full-profile runs need no retraining),
captures every stage's features of the same test images without and with the trigger, at an
equal row count, and reports the effective and stable rank of the clean, triggered and
difference f(x + t) - f(x) groups both ways, with the triggered/clean ratio per convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from eglib.config import get_profile
from eglib.experiments import MODEL_FILE, ExperimentConfig, is_cached, run_dir, run_experiment
from eglib.params import check_chosen, check_seeds
from eglib.plots import rank_ratio_bars
from eglib.spectral import capture_features, spectrum_ranks
from eglib.studies.base import StudyResult, paired_test_images
from eglib.studies.defence_table import table_config
from eglib.studies.spectra import SETTINGS

NAME = "centring"
ATTACKS = ("badnets", "blend", "wanet", "bpp", "lf")
GROUPS = ("clean", "triggered", "diff")
CONVENTIONS = ("uncentred", "centred")


def group_ranks(clean: torch.Tensor, triggered: torch.Tensor) -> dict[str, float]:
    """Effective and stable rank of the clean, triggered and difference rows, uncentred and
    centred: keys `erank_<group>`, `erank_centred_<group>` (same for srank), and per convention
    the effective-rank ratios triggered / clean (`ratio_<convention>`) and diff / clean
    (`diff_ratio_<convention>`)."""
    if clean.shape != triggered.shape:
        shapes = f"clean {tuple(clean.shape)}, triggered {tuple(triggered.shape)}"
        raise ValueError(f"features of other shapes: {shapes}; need the same images' features")
    row: dict[str, float] = {}
    for group, feats in zip(GROUPS, (clean, triggered, triggered - clean), strict=True):
        row.update({f"{m}_{group}": v for m, v in spectrum_ranks(feats).items()})
    for convention, erank in zip(CONVENTIONS, ("erank", "erank_centred"), strict=True):
        row[f"ratio_{convention}"] = row[f"{erank}_triggered"] / row[f"{erank}_clean"]
        row[f"diff_ratio_{convention}"] = row[f"{erank}_diff"] / row[f"{erank}_clean"]
    return row


def run_rows(cfg: ExperimentConfig, rows: int) -> list[dict[str, Any]]:
    """`group_ranks` at every stage of `cfg`'s trained model, on `rows` paired test images
    (seeded by the run's seed), tagged with the attack, seed and stage."""
    result = run_experiment(cfg, progress=False)
    clean_images, trig_images, _ = paired_test_images(result, rows, cfg.seed)
    stages = list(result.model.stages)
    clean = capture_features(result.model, clean_images, stages)
    triggered = capture_features(result.model, trig_images, stages)
    tags = {"attack": cfg.attack, "seed": cfg.seed, "rows": len(clean_images)}
    return [{**tags, "stage": s, **group_ranks(clean[s], triggered[s])} for s in stages]


def run(
    profile: str | None = None,
    *,
    progress: bool = True,
    attacks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    cached_only: bool = False,
) -> StudyResult:
    """Measure the undefended table runs of `attacks` x `seeds` (trained when not cached;
    `cached_only`: only those whose model the cache holds, a ValueError when none)."""
    prof = get_profile(profile)
    chosen_seeds = check_seeds(seeds, prof.seeds)
    configs = [
        table_config(prof.name, a, "none", s)
        for a in check_chosen("attacks", attacks, ATTACKS)
        for s in chosen_seeds
    ]
    if cached_only:  # a record copied without its weights would retrain: left out
        configs = [c for c in configs if is_cached(c) and (run_dir(c) / MODEL_FILE).exists()]
        if not configs:
            raise ValueError(f"cached_only: no undefended {prof.name!r} table model is cached")
    rows_per_group = SETTINGS[prof.name].rows
    rows = [
        row
        for cfg in tqdm(configs, desc=NAME, disable=not progress)
        for row in run_rows(cfg, rows_per_group)
    ]
    return StudyResult(
        name=NAME,
        profile=prof.name,
        rows=rows,
        seeds=tuple(sorted({c.seed for c in configs})),
        notes={
            "attacks": list(dict.fromkeys(str(c.attack) for c in configs)),
            "rows_per_group": rows_per_group,
            "groups": "clean, triggered and diff = f(x + t) - f(x), of the same test images",
            "centred": "columns *_centred_*: rows minus their column mean before the SVD",
            "ratio": "erank(triggered) / erank(clean), per convention",
            "diff_ratio": "erank(diff) / erank(clean), per convention",
            "keys": [c.key() for c in configs],
        },
    )


def figures(result: StudyResult) -> dict[str, Figure]:
    """The triggered / clean and diff / clean effective-rank ratios per stage and attack,
    uncentred and centred."""
    return {"": rank_ratio_bars(result.rows, CONVENTIONS)}
