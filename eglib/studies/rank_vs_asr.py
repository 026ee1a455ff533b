"""Observation 1: effective (and stable) rank of clean, triggered and difference features at
every stage of cnn-small, per epoch and at eighths of the first epoch (where ASR rises),
next to ACC and ASR, for dirty- and clean-label attacks.

`erank_<group>/<stage>` and `srank_<group>/<stage>` are uncentred; runs trained since the
tracker records them also carry `erank_centred_...` and `srank_centred_...` (the column mean
over rows subtracted first), which a shift of the mean alone cannot lower.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from tqdm.auto import tqdm

from eglib.config import get_profile
from eglib.data import dataset_info
from eglib.experiments import ExperimentConfig, run_experiment
from eglib.models import make_model
from eglib.params import check_chosen, check_seeds
from eglib.plots import rank_curves
from eglib.plots.rank import rank_stages
from eglib.studies.base import StudyResult, attack_rate

NAME = "rank_vs_asr"
DATASET = "fashion-mnist"
MODEL = "cnn-small"
# attacks per profile: SIG (clean-label) only in the full run, to keep CI within its budget
ATTACKS: dict[str, tuple[str, ...]] = {
    "ci": ("badnets", "blend"),
    "demo": ("badnets", "blend"),
    "lite": ("badnets", "blend"),
    "full": ("badnets", "blend", "sig"),
}
# fractions of the first epoch also measured (0: the initial weights): ASR is near its final
# value after one epoch, so the rise can only be seen within it
PROBE_FRACTIONS = (0.0, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)
TRAIN_IMAGES = 60_000  # Fashion-MNIST's training split (a profile's train_size=None)
RANK_PREFIXES = ("erank_", "srank_")  # uncentred and centred (`erank_centred_...`) alike
CENTRING = (
    "erank_/srank_<group>/<stage>: uncentred (a shift shared by all rows lowers them); "
    "erank_centred_/srank_centred_<group>/<stage>: column mean over rows subtracted first"
)


def model_stages(model: str = MODEL, dataset: str = DATASET) -> tuple[str, ...]:
    """All stage names of `model` built for `dataset`."""
    info = dataset_info(dataset)
    return make_model(model, info.num_classes, info.in_channels).stages


def probe_steps(profile: str | None = None) -> tuple[int, ...]:
    """The optimizer steps at `PROBE_FRACTIONS` of the first epoch under a profile (counted
    on the images left after the clean reserve, rounded down: each stays inside epoch 1)."""
    prof = get_profile(profile)
    kept = int((prof.train_size or TRAIN_IMAGES) * (1 - ExperimentConfig.clean_reserve))
    steps = kept // prof.batch_size
    return tuple(dict.fromkeys(int(f * steps) for f in PROBE_FRACTIONS))


def config_for(
    attack: str, profile: str | None = None, seed: int | None = None
) -> ExperimentConfig:
    """The run of one attack: cnn-small, rank tracking at every stage after every epoch and
    at `probe_steps(profile)`, the attack's study rate (`attack_rate`: 10 %, 5 % for a clean-label
    attack, which poisons only target-class images: 10 % of the set would be nearly all of
    them). `seed`: default the profile's first.

    The spectra study and the notebooks reuse these configs, so their models come from the
    cache instead of being trained again.
    """
    return ExperimentConfig.from_profile(
        profile,
        dataset=DATASET,
        model=MODEL,
        attack=attack,
        poison_rate=attack_rate(attack),
        track_stages=model_stages(),
        track_steps=probe_steps(profile),
        **({} if seed is None else {"seed": seed}),
    )


def history_rows(
    attack: str, history: Sequence[dict[str, Any]], seed: int = 0
) -> list[dict[str, Any]]:
    """Table rows of one run's history, each epoch's probes (mid-epoch, `step` and a fractional
    `epoch`) before the epoch's row: attack, seed, epoch, step (None in runs recorded before
    steps), loss (None at probes), acc, asr, asr_correct (ASR among the images classified right
    without the trigger; None before it was recorded or when none is), rank_samples and
    every `erank_<group>/<stage>` and `srank_<group>/<stage>` value, with the centred
    `erank_centred_<group>/<stage>` and `srank_centred_<group>/<stage>` where recorded."""
    rows = []
    for entry in (e for epoch in history for e in (*epoch.get("probes", ()), epoch)):
        missing = [k for k in ("epoch", "acc", "asr") if k not in entry]
        if missing:
            raise ValueError(f"history row of {attack!r} lacks {missing}; has {sorted(entry)}")
        row: dict[str, Any] = {
            "attack": attack,
            "seed": seed,
            "epoch": entry["epoch"],
            "step": entry.get("step"),
            "loss": entry.get("loss"),
            "acc": entry["acc"],
            "asr": entry["asr"],
            "asr_correct": entry.get("asr_correct"),
            "rank_samples": entry.get("rank_samples"),
        }
        row.update({k: v for k, v in entry.items() if k.startswith(RANK_PREFIXES)})
        rows.append(row)
    return rows


def run(
    profile: str | None = None,
    *,
    progress: bool = True,
    attacks: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> StudyResult:
    """Train (or load) one tracked cnn-small per attack and seed (default: the profile's
    first); one row per attack, seed and measurement (epoch end or probe)."""
    prof = get_profile(profile)
    chosen = check_chosen("attacks", attacks, ATTACKS[prof.name])
    chosen_seeds = check_seeds(seeds, prof.seeds[:1])
    rows: list[dict[str, Any]] = []
    records: dict[str, dict[str, Any]] = {}
    runs = [(attack, seed) for attack in chosen for seed in chosen_seeds]
    for attack, seed in tqdm(runs, desc=NAME, disable=not progress):
        result = run_experiment(config_for(attack, prof.name, seed), progress=progress)
        records[f"{attack}/seed{seed}"] = result.record
        rows.extend(history_rows(attack, result.record["history"], seed))
    counts = sorted({int(r["rank_samples"]) for r in rows if r["rank_samples"] is not None})
    return StudyResult(
        name=NAME,
        profile=prof.name,
        rows=rows,
        seeds=chosen_seeds,
        data={"records": records},
        notes={
            "attacks": list(chosen),
            "model": MODEL,
            "dataset": DATASET,
            "poison_rate": {attack: attack_rate(attack) for attack in chosen},
            "stages": list(model_stages()),
            "probe_steps": list(probe_steps(prof.name)),
            "rank_samples_per_group": counts,
            "centring": CENTRING,
            "centred_ranks": bool(rank_stages(rows, "erank_centred")),  # False: cached before
        },
    )


def figures(result: StudyResult) -> dict[str, Figure]:
    """The effective-rank figure (''), the stable-rank one ('stable') and, when the runs
    recorded it, the centred effective rank ('centred')."""
    figs = {
        "": rank_curves(result.rows, measure="erank"),
        "stable": rank_curves(result.rows, measure="srank"),
    }
    if rank_stages(result.rows, "erank_centred"):
        figs["centred"] = rank_curves(result.rows, measure="erank_centred")
    return figs
