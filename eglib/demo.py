"""The demo (`make demo`): BadNets on Fashion-MNIST, cnn-small with and without EigenGuard."""

from __future__ import annotations

from pathlib import Path

from eglib.experiments import record_row, run_experiment
from eglib.io import write_json_atomic
from eglib.plots import save_figure, training_curves
from eglib.studies.defence_table import table_config

# label -> defence; the configs are the defence table's (and the quickstart's): trained once
DEMO_RUNS = {"no defence": "none", "EigenGuard": "eigenguard"}
COLUMNS = ("acc_per_sample", "asr_per_sample", "acc_mixed", "asr_mixed", "acc_pure", "asr_pure")


def run_demo(
    profile: str = "demo", out_dir: str | Path = "figures/demo", progress: bool = True
) -> list[dict]:
    """Train both models (cached), print ACC/ASR under the 3 protocols, write records and curves."""
    out = Path(out_dir)
    records = {}
    for label, defense in DEMO_RUNS.items():
        cfg = table_config(profile, "badnets", defense)
        records[label] = run_experiment(cfg, progress=progress).record
        write_json_atomic(out / f"{defense}.json", records[label])
    save_figure(training_curves(records), out / "training_curves.png")
    rows = [{"run": label, **record_row(rec)} for label, rec in records.items()]
    print(f"\nBadNets 10 % on Fashion-MNIST, cnn-small, profile {profile!r} (ACC / ASR in %)")
    print(f"{'run':<12}" + "".join(f"{c:>16}" for c in COLUMNS))
    for row in rows:
        print(f"{row['run']:<12}" + "".join(f"{100 * row[c]:>16.2f}" for c in COLUMNS))
    print(f"records and training curves under {out}/")
    return rows
