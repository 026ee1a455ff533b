"""Observation 3: ASR and ACC (three protocols) as the forced dimension k of EigenGuard grows,
for each rescaling rule and tail factor, on BadNets 10 % Fashion-MNIST with cnn-small; ends
with a data-driven default filter (`choose_default`).

The configs built here (`study_config`, `guard_params`) are shared with the ablations study,
so the runs both need come from the cache once trained."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from matplotlib.figure import Figure

from eglib.config import get_profile
from eglib.data import dataset_info
from eglib.experiments import ExperimentConfig, record_row
from eglib.guard import is_identity_filter
from eglib.models import make_model
from eglib.params import check_seeds
from eglib.plots import PROTOCOLS, formatted_table, metric_vs_param
from eglib.studies.base import StudyResult
from eglib.studies.runs import METRIC_COLUMNS, run_records, summarise

NAME = "forced_dimension"
DATASET = "fashion-mnist"
MODEL = "cnn-small"
ATTACK = "badnets"
POISON_RATE = 0.1
UNDEFENDED = "none"  # the `variant` of the undefended run (k = 0)
MAX_ACC_DROP = 0.02  # the default may cost at most 2 ACC points against the undefended model

# How the top-k singular values are rescaled, by label (see eglib.guard.EigenGuard).
VARIANTS: dict[str, dict[str, Any]] = {
    "kth": {"rule": "kth"},
    "mean": {"rule": "mean"},
    "damp 0.001": {"rule": "damp", "top_scale": 0.001},
    "damp 0.1": {"rule": "damp", "top_scale": 0.1},
    "remove": {"rule": "remove"},
}

# Overrides of the profile's run sizes, shared by this study and the ablations. CI trains on
# 2000 images for 2 epochs in batches of 32 (~120 SGD steps, ~7 s of one core per run): too
# little to learn BadNets reliably, enough to run every code path within the notebook budget.
SIZES: dict[str, dict[str, Any]] = {
    "ci": {"train_size": 2000, "test_size": 500, "epochs": 2, "batch_size": 32},
    "demo": {},
    "lite": {},
    "full": {},
}

CHOICE_KEYS = ("variant", "tail_scale", "k")  # what identifies a guard configuration


@dataclass(frozen=True)
class ForcedGrid:
    """The factorial grid of one profile: forced dimensions x rule variants x tail factors.

    Its points where the guard is the identity (`is_identity_point`) are not run."""

    k: tuple[int, ...]
    variants: tuple[str, ...]
    tail_scales: tuple[float, ...]


GRIDS: dict[str, ForcedGrid] = {
    # 2 variants x 2 tails x 3 k, less the identity (kth, tail 1.0, k = 1: see `grid_points`),
    # + the undefended run = 12 small runs
    "ci": ForcedGrid(k=(1, 4, 16), variants=("kth", "damp 0.001"), tail_scales=(1.0, 0.001)),
    "demo": ForcedGrid(k=(1, 4, 16, 64), variants=tuple(VARIANTS), tail_scales=(1.0, 0.001)),
    # 2 variants x 2 tails x 2 k + undefended = 9 runs per seed, 27 in all (~35 s of one
    # core each at the lite size: ~8 min on 2 quiet cores)
    "lite": ForcedGrid(k=(4, 16), variants=("kth", "damp 0.001"), tail_scales=(1.0, 0.001)),
    "full": ForcedGrid(
        k=(1, 2, 4, 8, 16, 32, 64), variants=tuple(VARIANTS), tail_scales=(1.0, 0.001)
    ),
}


def variant_label(params: Mapping[str, Any]) -> str:
    """The label of a guard's rescaling rule: the rule, or 'damp <top_scale>' for damping."""
    rule = params.get("rule", "kth")
    return f"damp {params.get('top_scale', 0.1):g}" if rule == "damp" else str(rule)


def variant_params(label: str) -> dict[str, Any]:
    """Inverse of `variant_label`: 'kth' -> {'rule': 'kth'}, 'damp 0.5' -> rule + top_scale."""
    if label in VARIANTS:
        return dict(VARIANTS[label])
    rule, _, scale = label.partition(" ")
    if rule == "damp" and scale:
        try:
            return {"rule": "damp", "top_scale": float(scale)}
        except ValueError:
            pass
    raise ValueError(f"unknown variant {label!r}; allowed: {list(VARIANTS)} or 'damp <factor>'")


def is_identity_point(k: int, variant: str, tail_scale: float) -> bool:
    """Whether the grid point's guard maps every batch to itself (`eglib.guard.identity_reason`:
    'kth' or 'mean' at k = 1, or 'damp 1', with tail 1.0). EigenGuard refuses such a guard,
    and the study's undefended run (k = 0) is that model already."""
    return is_identity_filter(k, **variant_params(variant), tail_scale=float(tail_scale))


def _factorial(grid: ForcedGrid) -> list[tuple[int, str, float]]:
    """(k, variant, tail_scale) of every point of `grid`: by variant, then tail, then k."""
    return [(k, v, t) for v in grid.variants for t in grid.tail_scales for k in grid.k]


def grid_points(grid: ForcedGrid) -> list[tuple[int, str, float]]:
    """(k, variant, tail_scale) of every guarded run of `grid` (the `guard_params`
    arguments), by variant, then tail, then k; identity points left out
    (`is_identity_point`: k = 1 with 'kth' or 'mean' and tail 1.0)."""
    return [point for point in _factorial(grid) if not is_identity_point(*point)]


def guard_params(k: int, variant: str, tail_scale: float, at: str | None = None) -> dict[str, Any]:
    """EigenGuard parameters (+ `at`) of one grid point, every filter parameter explicit.

    Explicit values keep cached runs valid if EigenGuard's defaults change later.
    """
    params: dict[str, Any] = {"k": k, **variant_params(variant), "tail_scale": float(tail_scale)}
    if at is not None:
        params["at"] = at
    return params


@cache
def model_stages(model: str = MODEL, dataset: str = DATASET) -> tuple[tuple[str, ...], str]:
    """(stage names, default guard stage) of `model` built for `dataset`."""
    info = dataset_info(dataset)
    net = make_model(model, info.num_classes, info.in_channels)
    return net.stages, net.default_guard_stage


def study_config(
    profile: str, seed: int, guard: Mapping[str, Any] | None = None, **overrides: Any
) -> ExperimentConfig:
    """BadNets 10 % on Fashion-MNIST with cnn-small, sized by `profile` and `SIZES`.

    `guard` None: the undefended run; else EigenGuard with these parameters, placed at
    `guard['at']` or, when absent, the model's default stage (named explicitly in the config).
    `overrides` change any other config field (model, poison_rate, ...).
    """
    fields: dict[str, Any] = {
        "dataset": DATASET,
        "model": MODEL,
        "attack": ATTACK,
        "poison_rate": POISON_RATE,
        **SIZES[get_profile(profile).name],
        **overrides,
        "seed": seed,
    }
    if guard is not None:
        params = dict(guard)
        if params.get("at") is None:
            params["at"] = model_stages(fields["model"], fields["dataset"])[1]
        fields.update(defense="eigenguard", defense_params=params)
    return ExperimentConfig.from_profile(profile, **fields)


def forced_grid(profile: str, grid: str | None = None) -> ForcedGrid:
    """The grid named `grid` (a profile name), else the profile's own; ValueError if unknown."""
    name = get_profile(profile).name if grid is None else grid
    if name not in GRIDS:
        raise ValueError(f"grid={grid!r}; allowed: {sorted(GRIDS)} (a profile's grid)")
    return GRIDS[name]


def study_configs(
    profile: str | None = None, seeds: Sequence[int] | None = None, grid: str | None = None
) -> list[ExperimentConfig]:
    """Every run of the study: per seed, the undefended run then the whole grid, less its
    identity points (`grid_points`: the undefended run is their model).

    `seeds` (default: the profile's) and `grid` (another profile's grid, e.g. lite's 8
    filters at full size) choose a subset of what the profile would run.
    """
    prof = get_profile(profile)
    points = grid_points(forced_grid(prof.name, grid))
    configs = []
    for seed in check_seeds(seeds, prof.seeds):
        configs.append(study_config(prof.name, seed))
        configs += [study_config(prof.name, seed, guard_params(*point)) for point in points]
    return configs


def describe(cfg: ExperimentConfig) -> dict[str, Any]:
    """The study's columns of a run: variant, k (0 when undefended), tail_scale, at."""
    if cfg.defense == "none":
        return {"variant": UNDEFENDED, "k": 0, "tail_scale": None, "at": UNDEFENDED}
    if cfg.defense != "eigenguard":
        raise ValueError(f"defense={cfg.defense!r}; this study knows 'none' and 'eigenguard'")
    params = dict(cfg.defense_params)
    return {
        "variant": variant_label(params),
        "k": params["k"],
        "tail_scale": params.get("tail_scale", 1.0),
        "at": params.get("at"),
    }


def run_configs(
    configs: Sequence[ExperimentConfig], *, jobs: int | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """Rows (`describe` + `record_row`) of the configs' runs, in order (see `run_records`)."""
    records = run_records(configs, jobs=jobs, progress=progress)
    return [{**describe(c), **record_row(r)} for c, r in zip(configs, records, strict=True)]


def percent_table(
    rows: Sequence[dict[str, Any]],
    by: Sequence[str],
    metrics: Sequence[str] = METRIC_COLUMNS,
) -> list[dict[str, Any]]:
    """`summarise` for reading: the `by` keys, `n`, and each metric as 'mean ± std' in %
    under its label (`eglib.plots.formatted_table`)."""
    return formatted_table(summarise(rows, by, metrics), metrics, keys=(*by, "n"))


# Observation 3 "holds" for a filter if its ASR falls by >= ASR_FALL from the smallest to the
# largest k and its ACC never drops more than MAX_ACC_DROP below the undefended model's.
ASR_FALL = 0.10


LEARNED_ASR = 0.5  # an undefended per-sample ASR below this: the backdoor was not learned


def trend_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Observation 3, checked per filter (variant, tail_scale) and protocol, in % points.

    Columns per protocol p: `asr_kmin_<p>` / `asr_kmax_<p>` (mean ASR at the smallest and
    largest k), `worst_acc_drop_<p>` (largest ACC loss against the undefended model over
    all k) and `holds_<p>` (ASR fell by >= ASR_FALL and ACC stayed within MAX_ACC_DROP;
    None, void, when the undefended per-sample ASR is below `LEARNED_ASR`: no backdoor was
    learned to fall). Plus `undefended_asr` and the k range.
    """
    base = summarise([r for r in rows if r["variant"] == UNDEFENDED], ["variant"])
    if not base:
        raise ValueError("rows hold no undefended run (variant 'none'); the check needs one")
    entries = summarise([r for r in rows if r["variant"] != UNDEFENDED], CHOICE_KEYS)
    filters = list(dict.fromkeys((e["variant"], e["tail_scale"]) for e in entries))
    table = []
    for variant, tail in filters:
        mine = sorted(
            (e for e in entries if (e["variant"], e["tail_scale"]) == (variant, tail)),
            key=lambda e: e["k"],
        )
        first, last = mine[0], mine[-1]
        row: dict[str, Any] = {
            "variant": variant,
            "tail_scale": tail,
            "k": f"{first['k']}..{last['k']}",
            "undefended_asr": round(100 * base[0]["asr_per_sample"], 1),
        }
        for p in PROTOCOLS:
            drop = max(base[0][f"acc_{p}"] - e[f"acc_{p}"] for e in mine)
            fall = first[f"asr_{p}"] - last[f"asr_{p}"]
            row[f"asr_kmin_{p}"] = round(100 * first[f"asr_{p}"], 1)
            row[f"asr_kmax_{p}"] = round(100 * last[f"asr_{p}"], 1)
            row[f"worst_acc_drop_{p}"] = round(100 * drop, 1)
            holds = bool(fall >= ASR_FALL and drop <= MAX_ACC_DROP + 1e-9)
            row[f"holds_{p}"] = holds if base[0]["asr_per_sample"] >= LEARNED_ASR else None
        table.append(row)
    return table


def default_table(
    rows: Sequence[dict[str, Any]],
    *,
    max_acc_drop: float = MAX_ACC_DROP,
    protocol: str = "per_sample",
) -> list[dict[str, Any]]:
    """The guarded configurations (mean over seeds), ranked for `choose_default`.

    Each entry: variant, tail_scale, k, n, every protocol's ACC/ASR mean and std, `eligible`
    (ACC under `protocol` >= undefended ACC - max_acc_drop) and `rank` (1 = the choice;
    None when not eligible). Eligible ones come first, by ASR ascending, then ACC descending,
    then k ascending (the smaller change to the network); the others follow, ordered the same.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {list(PROTOCOLS)}")
    if not 0 <= max_acc_drop <= 1:
        raise ValueError(f"max_acc_drop={max_acc_drop!r}; must be a fraction in [0, 1]")
    acc, asr = f"acc_{protocol}", f"asr_{protocol}"
    baseline = [float(r[acc]) for r in rows if r["variant"] == UNDEFENDED]
    guarded = [r for r in rows if r["variant"] != UNDEFENDED]
    if not baseline or not guarded:
        raise ValueError(
            f"rows hold {len(baseline)} undefended and {len(guarded)} guarded runs; "
            "the choice needs at least one of each"
        )
    floor = statistics.fmean(baseline) - max_acc_drop
    table = summarise(guarded, CHOICE_KEYS)
    for entry in table:
        entry["eligible"] = entry[acc] >= floor - 1e-9  # exactly at the budget counts
    table.sort(key=lambda e: (not e["eligible"], e[asr], -e[acc], e["k"]))
    for rank, entry in enumerate(table, start=1):
        entry["rank"] = rank if entry["eligible"] else None
    return table


def choose_default(
    rows: Sequence[dict[str, Any]],
    *,
    max_acc_drop: float = MAX_ACC_DROP,
    protocol: str = "per_sample",
) -> dict[str, Any]:
    """The data-driven default filter: among guarded configurations whose mean ACC under
    `protocol` is within `max_acc_drop` (2 points) of the undefended model's, the one with
    the lowest mean ASR under `protocol`; ties go to the higher ACC, then the smaller k.
    The rows' metrics are test-set metrics (the study holds out no validation split), so the
    choice's own ACC and ASR are optimistic estimates.

    `rows`: study rows (`variant` ('none' for the undefended run), `k`, `tail_scale`,
    `acc_<protocol>`, `asr_<protocol>`), any number of seeds each. Returns a dict with
    `params` (EigenGuard keyword arguments, or None when no configuration is within the
    budget), the choice's variant / k / tail_scale / ACC / ASR, the undefended ACC and ASR,
    the budget and the candidate counts.
    """
    table = default_table(rows, max_acc_drop=max_acc_drop, protocol=protocol)
    acc, asr = f"acc_{protocol}", f"asr_{protocol}"
    baseline = summarise([r for r in rows if r["variant"] == UNDEFENDED], ["variant"])[0]
    eligible = [e for e in table if e["eligible"]]
    choice: dict[str, Any] = {
        "params": None,
        "protocol": protocol,
        "max_acc_drop": max_acc_drop,
        "baseline_acc": baseline[acc],
        "baseline_asr": baseline[asr],
        "candidates": len(table),
        "eligible": len(eligible),
    }
    if eligible:
        best = eligible[0]
        choice.update(
            params=guard_params(best["k"], best["variant"], best["tail_scale"]),
            variant=best["variant"],
            k=best["k"],
            tail_scale=best["tail_scale"],
            n=best["n"],
            acc=best[acc],
            asr=best[asr],
        )
    return choice


def run(
    profile: str | None = None,
    *,
    progress: bool = True,
    jobs: int | None = None,
    seeds: Sequence[int] | None = None,
    grid: str | None = None,
) -> StudyResult:
    """Train (or load) the undefended run and the whole grid for every seed of the profile
    (or `seeds`), on the profile's grid (or the `grid` of another profile, see `study_configs`)."""
    prof = get_profile(profile)
    chosen = forced_grid(prof.name, grid)
    used_seeds = check_seeds(seeds, prof.seeds)
    rows = run_configs(study_configs(prof.name, used_seeds, grid), jobs=jobs, progress=progress)
    choice = choose_default(rows)
    return StudyResult(
        name=NAME,
        profile=prof.name,
        rows=rows,
        seeds=used_seeds,
        data={"choice": choice, "table": default_table(rows)},
        notes={
            "dataset": DATASET,
            "model": MODEL,
            "attack": ATTACK,
            "poison_rate": POISON_RATE,
            "guard_stage": model_stages()[1],
            "grid": grid or prof.name,
            "k": list(chosen.k),
            "variants": list(chosen.variants),
            "tail_scales": list(chosen.tail_scales),
            "identity_points_skipped": [
                {"variant": v, "tail_scale": t, "k": k}
                for k, v, t in _factorial(chosen)
                if is_identity_point(k, v, t)
            ],
            "size_overrides": SIZES[prof.name],
            "choice": {k: v for k, v in choice.items()},
            "choice_rule": (
                f"lowest per-sample ASR among configurations within {100 * MAX_ACC_DROP:g} "
                "ACC points of the undefended model; ties: higher ACC, then smaller k. "
                "The committed default must come from the full profile."
            ),
        },
    )


def figures(result: StudyResult) -> dict[str, Figure]:
    """ASR and ACC vs k (one colour per rule, one dash per tail factor; one panel per
    protocol; the undefended model dashed grey)."""
    guarded = [r for r in result.rows if r["variant"] != UNDEFENDED]
    baseline = [r for r in result.rows if r["variant"] == UNDEFENDED]
    seeds = len(result.seeds)
    return {
        "": metric_vs_param(
            guarded,
            "k",
            hue="variant",
            style="tail_scale",
            baseline=baseline,
            logx=True,
            xlabel="forced dimension k",
            title=(
                f"BadNets {100 * POISON_RATE:g} % on {DATASET}, {MODEL}, guard after "
                f"{model_stages()[1]}: mean +- std over {seeds} seed(s), profile {result.profile}"
            ),
        )
    }
