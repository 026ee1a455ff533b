"""Adaptive attacks (the reviewers' ask) against EigenGuard and the strongest baselines: a
high-rank trigger family (`highrank`) and adversarial noise before BadNets (`advnoise`), with
BadNets as the reference; for each attack the effective rank of its trigger features at the
guard's stage next to ACC / ASR under the three protocols.

The runs are the defence table's configs (`defence_table.table_config`): the BadNets ones are
shared with it (and with the quickstart), so they come from the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from eglib.config import get_profile, torch_threads
from eglib.experiments import (
    MODEL_DIGEST,
    ExperimentConfig,
    ExperimentResult,
    derived_is_current,
    derived_stamp,
    record_row,
    run_dir,
    run_experiment,
)
from eglib.io import read_json, write_json_atomic
from eglib.params import check_chosen, check_seeds
from eglib.plots import adaptive_summary, protocol_heatmaps
from eglib.plots.rank import RANK_GROUPS
from eglib.spectral import (
    capture_features,
    effective_rank,
    stable_rank,
)
from eglib.studies.base import POISON_RATE, StudyResult, paired_test_images
from eglib.studies.defence_table import DATASET, METRIC_COLUMNS, MODEL, table_configs
from eglib.studies.runs import run_records, summarise

NAME = "adaptive"
ATTACKS = ("badnets", "highrank", "advnoise")  # BadNets: the non-adaptive reference
RANK_COLUMNS: tuple[str, ...] = tuple(f"{m}_{g}" for m in ("erank", "srank") for g in RANK_GROUPS)
RANK_DEFENSES = ("none", "eigenguard")  # the models whose trigger features are measured


@dataclass(frozen=True)
class AdaptiveGrid:
    """What one profile runs: defences against the three attacks, and the rank sample count."""

    defenses: tuple[str, ...]
    rank_samples: int  # test images per group (clean, triggered, difference): equal counts


# the baselines a high-rank trigger threatens most (the spectral detectors SS, SPECTRE) and
# the post-training repairs that do not look at the spectrum (FT, ANP)
BASELINES = ("none", "eigenguard", "ft", "anp", "ss", "spectre")
GRIDS: dict[str, AdaptiveGrid] = {
    "ci": AdaptiveGrid(("none", "eigenguard"), rank_samples=256),
    "lite": AdaptiveGrid(BASELINES, rank_samples=512),
    "demo": AdaptiveGrid(("none", "eigenguard", "ss"), rank_samples=512),
    "full": AdaptiveGrid(BASELINES, rank_samples=1000),
}


def trigger_ranks(
    result: ExperimentResult, *, count: int, seed: int, stage: str | None = None
) -> dict[str, Any]:
    """Effective and stable rank of the clean, triggered and difference f(x+t) - f(x)
    features of `count` paired test images (seeded) at `stage` (default: the model's guard
    stage; with a guard there, its output), all three groups at the same count."""
    clean_images, trig_images, _ = paired_test_images(result, count, seed)
    model = result.model
    where: str = stage or str(getattr(model, "default_guard_stage", model.stages[0]))
    clean = capture_features(model, clean_images, [where])[where]
    triggered = capture_features(model, trig_images, [where])[where]
    groups = {"clean": clean, "triggered": triggered, "diff": triggered - clean}
    out: dict[str, Any] = {"rank_stage": where, "rank_samples": len(clean_images)}
    for group, feats in groups.items():
        out[f"erank_{group}"] = effective_rank(feats)
        out[f"srank_{group}"] = stable_rank(feats)
    return out


def run_ranks(cfg: ExperimentConfig, *, count: int) -> dict[str, Any]:
    """`trigger_ranks` of a run's model (seeded by the run's seed), cached as JSON in the
    run's cache folder: loading a model re-poisons its data (PGD for advnoise), so a warm
    rerun reads the numbers instead (recomputed when the run was retrained since, see
    `derived_is_current`). Runs on one CPU thread: the matrices are small, and on
    a busy 2-core machine a 2-thread 256 x 256 eigh took about 3 s (6 ms on one thread)."""
    path = run_dir(cfg) / f"trigger_ranks_{count}.json"
    if path.exists():
        cached = dict(read_json(path))
        if derived_is_current(cfg, cached):
            cached.pop(MODEL_DIGEST, None)
            return cached
    with torch_threads(1):
        result = run_experiment(cfg, progress=False)
        ranks = trigger_ranks(result, count=count, seed=cfg.seed)
    write_json_atomic(path, {**ranks, **derived_stamp(result.record)})
    return ranks


def adaptive_rows(
    configs: Sequence[ExperimentConfig],
    records: Sequence[dict[str, Any]],
    *,
    count: int,
    rank_defenses: Sequence[str] = RANK_DEFENSES,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Per-seed rows (`record_row`), with the trigger ranks of the `rank_defenses` models
    (each reloads its run, which re-poisons the data: a progress bar with `progress`)."""
    rows = []
    pairs = zip(configs, records, strict=True)
    for cfg, record in tqdm(pairs, total=len(configs), desc="trigger ranks", disable=not progress):
        row = record_row(record)
        if cfg.defense in rank_defenses:
            row.update(run_ranks(cfg, count=count))
        rows.append(row)
    return rows


def run(
    profile: str | None = None,
    *,
    progress: bool = True,
    jobs: int | None = None,
    defenses: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> StudyResult:
    """Train (or load) every attack x defence x seed run; measure the trigger ranks."""
    prof = get_profile(profile)
    grid = GRIDS[prof.name]
    chosen = check_chosen("defenses", defenses, grid.defenses)
    chosen_seeds = check_seeds(seeds, prof.seeds)
    configs = table_configs(prof.name, ATTACKS, chosen, chosen_seeds)
    records = run_records(configs, jobs=jobs, progress=progress)
    rows = adaptive_rows(configs, records, count=grid.rank_samples, progress=progress)
    table = summarise(rows, ("attack", "defense"), (*METRIC_COLUMNS, *RANK_COLUMNS))
    stage = next((r["rank_stage"] for r in rows if "rank_stage" in r), None)
    counts = sorted({r["rank_samples"] for r in rows if "rank_samples" in r})
    return StudyResult(
        name=NAME,
        profile=prof.name,
        rows=table,
        seeds=chosen_seeds,
        data={"seed_rows": rows},
        notes={
            "dataset": DATASET,
            "model": MODEL,
            "poison_rate": POISON_RATE,
            "attacks": list(ATTACKS),
            "defenses": list(chosen),
            "rank_stage": stage,
            "rank_samples_per_group": counts,
            "rank_models": list(RANK_DEFENSES),
        },
    )


def tables(result: StudyResult) -> dict[str, list[dict[str, Any]]]:
    """Extra CSV tables by suffix: the per-seed rows ('seeds')."""
    return {"seeds": result.data["seed_rows"]}


def figures(result: StudyResult) -> dict[str, Figure]:
    """Trigger ranks (undefended model) beside per-sample ASR / ACC (''), and ASR under the
    three protocols ('protocols')."""
    notes = result.notes
    seeds = len(result.seeds)
    return {
        "": adaptive_summary(
            result.rows,
            rank_title=(
                f"trigger features at {notes['rank_stage']}, no defence "
                f"({', '.join(map(str, notes['rank_samples_per_group']))} images per group)"
            ),
            title=(
                f"Adaptive attacks on {DATASET}, {MODEL}: mean ± std over {seeds} seed(s), "
                f"per-sample protocol, profile {result.profile}"
            ),
        ),
        "protocols": protocol_heatmaps(
            result.rows, title="Adaptive attacks: ASR under the three evaluation protocols"
        ),
    }
