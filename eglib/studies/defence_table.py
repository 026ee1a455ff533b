"""The defence table: attacks x defences on Fashion-MNIST with cnn-small, ACC and ASR under the
three protocols as mean +- std over seeds, and the detection table of the data-filtering
defences (AUROC, poison and clean removed) at poison rates 1, 5 and 10 %.

Every run goes through `eglib.experiments.run_experiment` (cached by config hash); the runs
missing from the cache are trained in parallel processes by `eglib.sweep.run_grid`. The
BadNets runs without a defence and with EigenGuard are the same configs as the quickstart's
(`table_config(profile, 'badnets', 'none' | 'eigenguard')`), so they are trained once.

Detection is measured on the undefended runs: a data-filtering defence first trains exactly
that model (same seed, same data) and scores its training set, so every detector is scored
on the cached undefended model of each (attack, rate, seed), one training for four
detectors instead of four trainings and four retrainings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from eglib.config import get_profile
from eglib.defenses.base import recorded_params
from eglib.defenses.detection import detection_table, evaluate_detectors
from eglib.experiments import (
    ExperimentConfig,
    check_config,
    derived_is_current,
    derived_stamp,
    is_cached,
    record_row,
    run_dir,
    run_experiment,
)
from eglib.io import read_json, write_json_atomic
from eglib.params import check_chosen, check_seeds
from eglib.plots import PROTOCOLS, defence_heatmaps, detection_heatmaps, protocol_heatmaps
from eglib.poison import ATTACKS
from eglib.studies.ablations import REFERENCE
from eglib.studies.base import StudyResult, attack_rate
from eglib.studies.forced_dimension import MAX_ACC_DROP, guard_params, model_stages
from eglib.studies.runs import run_records, summarise

NAME = "defence_table"
DATASET = "fashion-mnist"
MODEL = "cnn-small"

ALL_ATTACKS = (
    "badnets",
    "blend",
    "sig",
    "lc",
    "wanet",
    "ssba",
    "lf",
    "bpp",
    "inputaware",
    "refool",
)
ALL_DEFENSES = ("none", "eigenguard", "ft", "nad", "anp", "abl", "ss", "spectre", "ac")
DETECTORS = ("ss", "spectre", "ac", "eigenguard-score")
DETECTION_RATES = (0.01, 0.05, 0.1)
DETECTION_METRICS = ("auroc", "tpr", "fpr")  # tpr: share of the poison removed; fpr: of the clean
ANP_MAX_ACC_DROP = 0.1  # see `defense_params`
DETECTION_FILE = "detection.json"  # the detectors' reports, next to the undefended run

METRIC_COLUMNS: tuple[str, ...] = (
    "acc",
    "asr",
    *(f"{m}_{p}" for p in PROTOCOLS for m in ("acc", "asr")),
    "train_s",
)


@dataclass(frozen=True)
class TableGrid:
    """What one profile runs: the table's attacks x defences, and the detection table's
    attacks x detectors x poison rates (detectors score the undefended runs, so the table's
    own are scored at its rate, `attack_rate`: 10 %, 5 % for the clean-label attacks)."""

    attacks: tuple[str, ...]
    defenses: tuple[str, ...]
    detection_attacks: tuple[str, ...]
    detectors: tuple[str, ...]
    detection_rates: tuple[float, ...]


GRIDS: dict[str, TableGrid] = {
    # the notebook's CI budget: BadNets x (none, EigenGuard, SS), one seed; detection: every
    # detector on the undefended run at 10 % (no extra training)
    "ci": TableGrid(("badnets",), ("none", "eigenguard", "ss"), ("badnets",), DETECTORS, (0.1,)),
    # the committed figures (about 1.5 h on 2 cores): four attacks that need no fitting
    # (patch, blend, clean-label, low-frequency) x every defence; WaNet is left out, its
    # undefended ASR was 10-13 % at this size (3 seeds): nothing to defend. Detection at 1,
    # 5, 10 % on the two all-to-one dirty-label attacks whose trigger is a fixed pattern
    "lite": TableGrid(
        ("badnets", "blend", "sig", "lf"),
        ALL_DEFENSES,
        ("badnets", "blend"),
        DETECTORS,
        DETECTION_RATES,
    ),
    "demo": TableGrid(
        ("badnets", "blend", "wanet"),
        ("none", "eigenguard", "ft", "ss", "ac"),
        ("badnets",),
        DETECTORS,
        DETECTION_RATES,
    ),
    # detection at 1 and 5 % costs one undefended training per (attack, rate, seed): the
    # all-to-one dirty-label attacks (where the majority-poison pitfall bites); clean-label
    # ones cannot reach 10 % and are scored at their table rate
    "full": TableGrid(
        ALL_ATTACKS,
        ALL_DEFENSES,
        tuple(a for a in ALL_ATTACKS if not ATTACKS[a].clean_label),
        DETECTORS,
        DETECTION_RATES,
    ),
}


def grid_for(profile: str | None = None) -> TableGrid:
    """The grid of a profile (EGLIB_PROFILE when None)."""
    return GRIDS[get_profile(profile).name]


def attack_params(attack: str, profile: str) -> dict[str, Any]:
    """An attack's parameters in a profile: learned attacks use their CI-sized `quick_params`
    outside the full profile (their fit would take longer than the run), else the defaults."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; allowed: {sorted(ATTACKS)}")
    cls = ATTACKS[attack]
    if cls.needs_fit and get_profile(profile).name != "full":
        return dict(getattr(cls, "quick_params", {}))
    return {}


def defense_params(defense: str) -> dict[str, Any]:
    """A defence's parameters in the table: EigenGuard's reference filter (the ablations'
    `REFERENCE`, every parameter and the stage explicit); ANP prunes only as far as the
    clean-reserve accuracy drops by at most 10 points (BackdoorBench keeps the pruned model
    whose ACC fell by no more than 10 %; plain threshold pruning left cnn-small at 10-11 %
    ACC, lite BadNets seeds 0 and 1); every other defence its defaults."""
    if defense == "eigenguard":
        return guard_params(**REFERENCE, at=model_stages(MODEL, DATASET)[1])
    if defense == "anp":
        return {"max_acc_drop": ANP_MAX_ACC_DROP}
    return {}


def table_config(
    profile: str | None, attack: str, defense: str, seed: int | None = None, **overrides: Any
) -> ExperimentConfig:
    """One cell's run: `attack` at `attack_rate` (target 0) on Fashion-MNIST, cnn-small,
    `defense`, sized by the profile (seed: the profile's first when None); `overrides` change
    any field."""
    prof = get_profile(profile)
    fields: dict[str, Any] = {
        "dataset": DATASET,
        "model": MODEL,
        "attack": attack,
        "attack_params": attack_params(attack, prof.name),
        "poison_rate": attack_rate(attack),
        "defense": defense,
        "defense_params": defense_params(defense),
        "seed": prof.seeds[0] if seed is None else seed,
        **overrides,
    }
    return ExperimentConfig.from_profile(prof, **fields)


def table_configs(
    profile: str | None,
    attacks: Sequence[str],
    defenses: Sequence[str],
    seeds: Sequence[int],
    rates: Sequence[float] | None = None,
) -> list[ExperimentConfig]:
    """Every (attack, defence, rate, seed) config, attack-major, in the given orders; `rates`
    None: each attack's table rate (`attack_rate`)."""
    return [
        table_config(profile, attack, defense, seed, poison_rate=rate)
        for attack in attacks
        for defense in defenses
        for rate in (rates if rates is not None else (attack_rate(attack),))
        for seed in seeds
    ]


def detection_configs(
    profile: str | None, seeds: Sequence[int], attacks: Sequence[str] | None = None
) -> list[ExperimentConfig]:
    """The undefended runs the detectors score: each detection attack (of those among
    `attacks`, when given) at every rate."""
    grid = grid_for(profile)
    chosen = [a for a in grid.detection_attacks if attacks is None or a in attacks]
    return table_configs(profile, chosen, ("none",), seeds, rates=grid.detection_rates)


def detector_reports(
    cfg: ExperimentConfig, detectors: Sequence[str], *, cached_only: bool = False
) -> list[dict[str, Any]]:
    """Each detector's report (`evaluate_detectors`: AUROC, tpr, fpr, counts, its `info`) on
    the trained undefended model of `cfg` and its own poisoned training set, plus attack,
    poison_rate, seed and target. Trains `cfg` if the cache lacks it (`cached_only`: reads
    the cached reports only, and returns none where the cache holds no current ones: scoring
    a full-profile run takes minutes, and a record copied without its model would retrain);
    the reports are cached next to the run (`DETECTION_FILE`) and recomputed when the
    detectors or any of their parameters (their current defaults) differ, or the run was
    retrained since they were scored (`derived_is_current`)."""
    if cfg.defense != "none" or cfg.attack is None:
        raise ValueError(
            f"detectors score an undefended, poisoned run; got attack={cfg.attack!r}, "
            f"defense={cfg.defense!r} (need an attack and defense='none')"
        )
    chosen = {name: recorded_params(name) for name in detectors}
    path = run_dir(cfg) / DETECTION_FILE
    if path.exists():
        cached = read_json(path)
        if cached.get("detectors") == chosen and derived_is_current(cfg, cached):
            return list(cached["records"])
    if cached_only:
        return []
    result = run_experiment(cfg, progress=False)
    data = result.data
    assert data.poisoned is not None  # an attack was named
    extra = {
        "attack": cfg.attack,
        "poison_rate": cfg.poison_rate,
        "seed": cfg.seed,
        "target": cfg.target,
    }
    records = evaluate_detectors(
        result.model,
        data.train_images,
        data.train_labels,
        data.poisoned.poison_idx,
        chosen,
        extra=extra,
    )
    write_json_atomic(
        path, {"detectors": chosen, **derived_stamp(result.record), "records": records}
    )
    return records


def detection_report_of(record: dict[str, Any]) -> dict[str, Any] | None:
    """The detection metrics a data-filtering defence put into its record, or ABL's of its
    isolation (precision: the poison's share of the isolated samples); None for others."""
    info = record.get("defense", {}).get("info") or {}
    report = info.get("detection", info.get("isolation"))
    return report if isinstance(report, dict) else None


def seed_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per run (`record_row`), plus `det_<metric>` for data-filtering defences
    and ABL (`detection_report_of`)."""
    rows = []
    for record in records:
        row = record_row(record)
        report = detection_report_of(record)
        if report is not None:
            row.update({f"det_{m}": report.get(m) for m in (*DETECTION_METRICS, "precision")})
        rows.append(row)
    return rows


def _target_share(report: dict[str, Any]) -> dict[str, Any]:
    """For activation clustering: the poison's share of the target label (all the poison
    carries the target label under all-to-one and clean-label attacks), the smaller
    cluster's share and whether AC flagged it (the majority-poison pitfall); empty for
    other detectors."""
    clusters = (report.get("info") or {}).get("clusters")
    mine = [c for c in clusters or () if c.get("label") == report["target"]]
    if not mine:
        return {}
    n_label = sum(mine[0]["sizes"])
    return {
        "target_poison_share": report["n_poison"] / n_label if n_label else None,
        "target_smaller_share": mine[0]["smaller_share"],
        "target_flagged": mine[0]["flagged"],
    }


def detection_records(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat record per detector report (`detector_reports`): attack, detector,
    poison_rate, seed, auroc, tpr (poison removed), fpr (clean removed), precision and
    counts; AC adds the poison's share of the target label and whether it flagged there."""
    keys = ("attack", "detector", "poison_rate", "seed", *DETECTION_METRICS, "precision")
    out = []
    for report in reports:
        entry = {k: report.get(k) for k in (*keys, "n_poison", "n_removed", "n_total")}
        entry.update(_target_share(report))
        out.append(entry)
    return out


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attack, defence): `n` seeds, each metric's mean and its std (`_std`)."""
    return summarise(rows, ("attack", "defense"), METRIC_COLUMNS)


def detection_summary(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (attack, detector, rate): mean and std over seeds of AUROC, tpr, fpr."""
    return summarise(records, ("attack", "detector", "poison_rate"), DETECTION_METRICS)


def compare_to_undefended(
    table: Sequence[dict[str, Any]],
    *,
    protocol: str = "per_sample",
    max_acc_drop: float = MAX_ACC_DROP,
) -> list[dict[str, Any]]:
    """Each defence against the undefended model of the same attack, under `protocol`.

    `table`: summary rows (`summary_rows`). One entry per (attack, defence other than
    'none'): acc, asr (means), d_acc and d_asr (change against no defence), within_budget
    (ACC at most `max_acc_drop` below the undefended model's), rank (by ASR, then ACC,
    among the attack's defences within the budget; None outside it), and n / n_undefended,
    the seeds each mean rests on: where they differ (a partial cache), d_acc and d_asr
    compare means over different seeds, not paired runs. Attacks without an undefended row
    are left out.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {list(PROTOCOLS)}")
    acc, asr = f"acc_{protocol}", f"asr_{protocol}"
    reference = {r["attack"]: r for r in table if r["defense"] == "none"}
    out: list[dict[str, Any]] = []
    for attack, ref in reference.items():
        entries = [
            {
                "attack": attack,
                "defense": r["defense"],
                "acc": r[acc],
                "asr": r[asr],
                "d_acc": r[acc] - ref[acc],
                "d_asr": r[asr] - ref[asr],
                "within_budget": r[acc] >= ref[acc] - max_acc_drop - 1e-9,
                "n": r.get("n"),
                "n_undefended": ref.get("n"),
            }
            for r in table
            if r["attack"] == attack and r["defense"] != "none"
        ]
        ranked = sorted(
            (e for e in entries if e["within_budget"]), key=lambda e: (e["asr"], -e["acc"])
        )
        for entry in entries:
            entry["rank"] = next((i for i, e in enumerate(ranked, 1) if e is entry), None)
        out.extend(entries)
    return out


def detection_wide(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The detection table: one row per (attack, detector), a column per metric and rate
    ('auroc@1%', 'tpr@5%', ...; means over seeds, NaN where not run)."""
    return detection_table(records, metrics=DETECTION_METRICS) if records else []


def run(
    profile: str | None = None,
    *,
    progress: bool = True,
    jobs: int | None = None,
    attacks: Sequence[str] | None = None,
    defenses: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    detection: bool = True,
    cached_only: bool = False,
) -> StudyResult:
    """Train (or load) the table's runs and the detection runs; summarise them.

    `attacks`, `defenses`, `seeds` override the profile's grid. The detectors score the
    undefended run of every table attack at its table rate (`attack_rate`) and of the chosen
    attacks that are the grid's detection attacks at every detection rate (`--attacks lf`
    trains no BadNets run at 1 %); `detection=False` skips the extra trainings at 1 and 5 %
    (and with no 'none' among the defences, no run is scored). `cached_only=True` trains
    nothing and scores nothing: the table holds the grid's runs the cache has (each row's `n`
    says how many seeds) and the detection reports it has (the others are listed in the
    notes' `detection_not_scored`), and a grid with none cached is a ValueError.
    """
    prof = get_profile(profile)
    grid = GRIDS[prof.name]
    chosen_attacks = check_chosen("attacks", attacks, grid.attacks)
    chosen_defenses = check_chosen("defenses", defenses, grid.defenses)
    chosen_seeds = check_seeds(seeds, prof.seeds)
    main = table_configs(prof.name, chosen_attacks, chosen_defenses, chosen_seeds)
    extra = detection_configs(prof.name, chosen_seeds, chosen_attacks) if detection else []
    for cfg in (*main, *extra):  # a misspelt name is an error, not a cell left out as uncached
        check_config(cfg)
    if cached_only:
        main, extra = _cached(main, prof.name), [c for c in extra if is_cached(c)]
        chosen_attacks = tuple(dict.fromkeys(c.attack for c in main if c.attack))
        chosen_seeds = tuple(sorted({c.seed for c in main}))
    records = run_records([*main, *extra], jobs=jobs, progress=progress)
    rows = seed_rows(records[: len(main)])
    scored = list(dict.fromkeys([*(c for c in main if c.defense == "none"), *extra]))
    reports = {
        cfg: detector_reports(cfg, grid.detectors, cached_only=cached_only)
        for cfg in tqdm(scored, desc="detection", disable=not progress)
    }
    det = detection_records([r for found in reports.values() for r in found])
    return StudyResult(
        name=NAME,
        profile=prof.name,
        rows=summary_rows(rows),
        seeds=chosen_seeds,
        data=_figure_data(rows, det),
        notes={
            "dataset": DATASET,
            "model": MODEL,
            "poison_rate": {a: attack_rate(a) for a in chosen_attacks},
            "attacks": list(chosen_attacks),
            "defenses": list(chosen_defenses),
            "defense_params": {d: defense_params(d) for d in chosen_defenses},
            "detectors": list(grid.detectors),
            "detection_rates": sorted({c.poison_rate for c in scored}),
            "detection_scores": "the undefended runs' models (see the module docstring)",
            "runs": len(dict.fromkeys([*main, *extra])),
            "std": "sample std over seeds (NaN for one seed)",
            "cached_only": cached_only,
            "detection_not_scored": [cfg.key() for cfg, found in reports.items() if not found],
        },
    )


def _cached(configs: Sequence[ExperimentConfig], profile: str) -> list[ExperimentConfig]:
    """The configs whose runs the cache holds; ValueError when it holds none of them."""
    cached = [c for c in configs if is_cached(c)]
    if not cached:
        raise ValueError(
            f"cached_only: none of the {len(configs)} runs of this {profile!r} grid is cached; "
            "run without cached_only (--cached-only) to train them"
        )
    return cached


def _figure_data(rows: list[dict[str, Any]], det: list[dict[str, Any]]) -> dict[str, Any]:
    """`StudyResult.data`: per-seed rows and detection records, with the detection summary
    and wide table made from them."""
    return {
        "seed_rows": rows,
        "detection_records": det,
        "detection": detection_summary(det),
        "detection_table": detection_wide(det),
    }


def data_from_tables(tables: dict[str, list[dict[str, Any]]], command: str) -> dict[str, Any]:
    """`StudyResult.data` rebuilt from the study's saved tables (`eglib.studies.redraw`)."""
    return _figure_data(tables["seeds"], tables.get("detection_seeds", []))


def tables(result: StudyResult) -> dict[str, list[dict[str, Any]]]:
    """Extra CSV tables by suffix: per-seed rows ('seeds'), the detection table ('detection',
    one row per attack and detector, a column per metric and rate) and its per-seed records."""
    return {
        "seeds": result.data["seed_rows"],
        "detection": result.data["detection_table"],
        "detection_seeds": result.data["detection_records"],
    }


def figures(result: StudyResult) -> dict[str, Figure]:
    """ASR and ACC heat maps per sample (''), ASR under the three protocols ('protocols'),
    and the detection heat maps ('detection', when there are detection runs)."""
    rates = sorted(set(result.notes["poison_rate"].values()))
    shown = " or ".join(f"{100 * r:g}" for r in rates)
    where = f"{DATASET}, {MODEL}, {shown} % poison, profile {result.profile}"
    figs = {
        "": defence_heatmaps(
            result.rows,
            title=f"Defence table (per-sample protocol): mean ± std over {_seed_count(result)}; "
            f"{where}",
        ),
        "protocols": protocol_heatmaps(
            result.rows, title=f"ASR under the three evaluation protocols; {where}"
        ),
    }
    if result.data["detection"]:
        figs["detection"] = detection_heatmaps(
            result.data["detection"],
            title=f"Poison detection of the data-filtering defences; {DATASET}, {MODEL}",
        )
    return figs


def _seed_count(result: StudyResult) -> str:
    """'3 seeds', or '1-3 seeds per cell (column n)' when the cells' seed counts differ."""
    counts = sorted({int(row["n"]) for row in result.rows})
    if len(counts) == 1:
        return f"{counts[0]} seed(s)"
    return f"{counts[0]}-{counts[-1]} seeds per cell (column n)"
