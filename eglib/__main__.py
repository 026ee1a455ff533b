"""`python -m eglib`: train one experiment, the demo, the attack gallery, sweeps, the figures."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eglib.config import PROFILES  # torch-free: the parser stays quick

FIGURES = Path("figures")


PYTHON_CONSTANTS = {"True": True, "False": False, "None": None}  # as a Python user types them


def _parse_params(pairs: Sequence[str], option: str = "parameter") -> dict[str, Any]:
    """`key=value` pairs; values parsed as JSON when they parse (numbers, true, null), or as
    Python's True/False/None, else text. ValueError for a pair without a key or `=`, or a key
    given twice (`option` names the flag in the message)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, equals, raw = pair.partition("=")
        if not equals or not key:
            raise ValueError(f"{option} {pair!r}: expected KEY=VALUE, e.g. k=8")
        if key in params:
            raise ValueError(f"{option}: parameter {key!r} given twice; give each key once")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = PYTHON_CONSTANTS.get(raw, raw)
    return params


def _print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain-text table of selected columns: ACC and ASR columns in %, empty for None."""

    def fmt(column: str, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{100 * value:6.2f}" if column.startswith(("acc", "asr")) else f"{value:8.1f}"
        return str(value)

    cells = [[fmt(c, row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for line in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


PROTOCOL_COLUMNS = [
    "acc_per_sample",
    "asr_per_sample",
    "acc_mixed",
    "asr_mixed",
    "acc_pure",
    "asr_pure",
]


def cmd_train(args: argparse.Namespace) -> None:
    """Run one experiment and print its metrics."""
    from eglib.experiments import ExperimentConfig, record_row, run_experiment

    overrides: dict[str, Any] = {
        "dataset": args.dataset,
        "model": args.model,
        "attack": None if args.attack == "none" else args.attack,
        "attack_params": _parse_params(args.attack_param, "--attack-param"),
        "poison_rate": args.rate,
        "defense": args.defense,
        "defense_params": _parse_params(args.defense_param, "--defense-param"),
        "seed": args.seed,
        "augment": args.augment,
    }
    overrides.update(
        {
            k: v
            for k, v in {"epochs": args.epochs, "train_size": args.train_size}.items()
            if v is not None  # 0 is refused by the config, not read as "the profile's"
        }
    )
    cfg = ExperimentConfig.from_profile(args.profile, **overrides)
    result = run_experiment(cfg, cache=not args.no_cache)
    row = record_row(result.record)
    _print_rows(
        [row], ["dataset", "model", "attack", "defense", "seed", "acc", "asr", *PROTOCOL_COLUMNS]
    )
    print(json.dumps(row))


def cmd_demo(args: argparse.Namespace) -> None:
    """BadNets 10 % on Fashion-MNIST, cnn-small with and without EigenGuard; figures/demo/."""
    from eglib.demo import run_demo

    run_demo(profile=args.profile, out_dir=FIGURES / "demo")


def cmd_gallery(args: argparse.Namespace) -> None:
    """figures/attacks.png: clean, poisoned and amplified difference for every attack."""
    from eglib.plots import attack_gallery, save_figure

    fig = attack_gallery(seed=args.seed)
    save_figure(fig, FIGURES / "attacks.png")
    print(f"wrote {FIGURES / 'attacks.png'}")


def cmd_sweep(args: argparse.Namespace) -> None:
    """Run a grid file in parallel processes, skip cached runs, write one CSV."""
    from eglib.sweep import load_grid, run_grid, write_csv

    out = Path(args.out)
    if out.is_dir():  # found now, not after every run of the grid has trained
        raise ValueError(f"--out {out} is a folder; give the CSV file's path")
    configs = load_grid(args.grid)
    rows = run_grid(configs, jobs=args.jobs)
    write_csv(rows, args.out)
    _print_rows(rows, ["attack", "defense", "seed", "acc", "asr", *PROTOCOL_COLUMNS])
    print(f"wrote {args.out}")


def cmd_figures(args: argparse.Namespace) -> None:
    """Regenerate the figures and tables under figures/ (profile: --profile or EGLIB_PROFILE)."""
    from eglib.studies import make_figures

    options: dict[str, Any] = {
        key: value
        for key, value in (
            ("attacks", args.attacks),
            ("defenses", args.defenses),
            ("seeds", args.seeds),
            ("grid", args.grid),
            ("ablations", args.ablations),
        )
        if value is not None
    }
    if args.no_detection:
        options["detection"] = False
    if args.cached_only:
        options["cached_only"] = True
    if args.include_slow:
        options["include_slow"] = True
    make_figures(
        profile=args.profile, out_dir=args.out, only=args.only, options=options, jobs=args.jobs
    )


def cmd_redraw(args: argparse.Namespace) -> None:
    """Redraw studies' figures from their saved tables (CSV, JSON), training nothing."""
    from eglib.studies import STUDIES
    from eglib.studies.redraw import redraw_folder, study_folders

    folders = args.folders or study_folders(FIGURES, STUDIES, args.only)
    for folder in folders:
        written, skipped = redraw_folder(folder, STUDIES, args.only)
        for name, paths in written.items():
            print(f"{name}: redrew {', '.join(str(p) for p in paths)}")
        for name, why in skipped.items():
            print(f"{name} in {folder}: skipped; {why}")


def cmd_runs(args: argparse.Namespace) -> None:
    """List the cached runs: finished ones with ACC and ASR, unfinished ones with their epoch."""
    from eglib.config import cache_dir
    from eglib.inventory import COLUMNS, UNFINISHED, cached_runs, count_states
    from eglib.plots.tables import rate_label
    from eglib.sweep import write_csv

    rows = [r for r in cached_runs() if not args.unfinished or r["state"] in UNFINISHED]
    if args.out:
        write_csv(rows, args.out)
    if rows:
        rate = "poison_rate"  # None (a run without a config yet) stays an empty cell
        shown = [{**r, rate: None if r[rate] is None else rate_label(r[rate])} for r in rows]
        _print_rows(shown, [c for c in COLUMNS if c != "note"])  # notes follow the table
    counts = ", ".join(f"{n} {state}" for state, n in count_states(rows).items())
    runs = f"{len(rows)} run{'' if len(rows) == 1 else 's'}"
    print(f"{runs} in {cache_dir() / 'runs'}" + (f": {counts}" if counts else ""))
    for row in rows:
        if row["note"]:
            print(f"{row['key']} ({row['state']}): {row['note']}")


def _positive_int(text: str) -> int:
    """An int >= 1 from the command line."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int >= 1")
    return value


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of integers."""
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers like 0,1,2") from None


def _grid_file(text: str) -> str:
    """The path of a grid file that exists."""
    if not Path(text).is_file():
        why = "is a folder" if Path(text).is_dir() else "does not exist"
        raise argparse.ArgumentTypeError(f"grid file {text} {why}")
    return text


PROFILE_HELP = f"one of {', '.join(PROFILES)} (default: EGLIB_PROFILE, else full)"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="python -m eglib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help=cmd_train.__doc__)
    train.add_argument("--dataset", default="fashion-mnist")
    train.add_argument("--model", default="cnn-small")
    train.add_argument(
        "--attack", default="badnets", help="an attack name, or 'none' for clean training"
    )
    train.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--rate", type=float, default=0.1, help="poison rate")
    train.add_argument("--defense", default="none")
    train.add_argument("--defense-param", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--epochs", type=int)
    train.add_argument("--train-size", type=int)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--augment", action="store_true", help="random crop (+ flip) in training")
    train.add_argument("--profile", help=PROFILE_HELP)
    train.add_argument("--no-cache", action="store_true")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help=cmd_demo.__doc__)
    demo.add_argument("--profile", default="demo")
    demo.set_defaults(func=cmd_demo)

    gallery = sub.add_parser("gallery", help=cmd_gallery.__doc__)
    gallery.add_argument("--seed", type=int, default=0)
    gallery.set_defaults(func=cmd_gallery)

    sweep = sub.add_parser("sweep", help=cmd_sweep.__doc__)
    sweep.add_argument("grid", type=_grid_file, help="a YAML or JSON grid file")
    sweep.add_argument("--jobs", type=_positive_int, default=1, help="worker processes (>= 1)")
    sweep.add_argument("--out", default="sweep.csv")
    sweep.set_defaults(func=cmd_sweep)

    figures = sub.add_parser("figures", help=cmd_figures.__doc__)
    figures.add_argument("--profile", help=PROFILE_HELP)
    figures.add_argument("--only", action="append", help="a study name (repeatable)")
    figures.add_argument("--out", type=Path, default=FIGURES, help="folder (default figures/)")
    figures.add_argument(
        "--jobs",
        type=_positive_int,
        help="worker processes for the runs to train (default: one per CPU core; 1 on a GPU, "
        "where 3 sharing it are faster)",
    )
    subset = figures.add_argument_group(
        "a subset of the profile's grid (one --only study that takes it: --seeds in "
        "defence_table, forced_dimension, ablations, centring and rank_vs_asr, --grid in "
        "forced_dimension, "
        "--ablations in ablations, the rest in defence_table)"
    )
    subset.add_argument("--attacks", type=_names, help="comma-separated, e.g. badnets,blend")
    subset.add_argument("--defenses", type=_names, help="comma-separated, e.g. none,eigenguard")
    subset.add_argument("--seeds", type=_ints, help="comma-separated, e.g. 0,1,2")
    subset.add_argument(
        "--grid", help="another profile's k x rule x tail grid, e.g. lite (forced_dimension)"
    )
    subset.add_argument(
        "--ablations", type=_names, help="comma-separated, e.g. eval_mode,poison_rate (ablations)"
    )
    subset.add_argument(
        "--no-detection",
        action="store_true",
        help="skip the detection runs at 1 and 5 %% (made for the chosen detection attacks)",
    )
    subset.add_argument(
        "--cached-only",
        action="store_true",
        help="train nothing: the grid's runs already cached, n seeds per cell (defence_table, "
        "ablations)",
    )
    subset.add_argument(
        "--include-slow",
        action="store_true",
        help="also every stage of preact-resnet18 in the layer ablation: a GPU's work (ablations)",
    )
    figures.set_defaults(func=cmd_figures)

    redraw = sub.add_parser("redraw", help=cmd_redraw.__doc__)
    redraw.add_argument(
        "folders",
        nargs="*",
        type=Path,
        help="folders a study wrote (default: every one under figures/)",
    )
    redraw.add_argument("--only", action="append", help="a study name (repeatable)")
    redraw.set_defaults(func=cmd_redraw)

    runs = sub.add_parser("runs", help=cmd_runs.__doc__)
    runs.add_argument(
        "--unfinished", action="store_true", help="only runs still training or interrupted"
    )
    runs.add_argument("--out", help="also write every column of the rows to this CSV")
    runs.set_defaults(func=cmd_runs)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: bad input (a ValueError naming it) ends with that line and status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:
        parser.exit(2, f"python -m eglib {args.command}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
