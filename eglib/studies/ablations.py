"""Ablations of EigenGuard around a reference filter, one factor at a time: the layer, k, the
tail factor, the rescaling rule (remove-top-k vs damping), the poison rate, the eval mode at
several evaluation batch sizes, and the architecture.

Every run is a BadNets config of the forced-dimension study (`forced_dimension.study_config`)
with one field changed, so runs the two studies share come from the cache. Each
sub-ablation's runs come from its `*_configs` builder (`all_configs`), the eval-mode one
from `eval_mode_ablation`; `GRIDS` sizes them per profile.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm.auto import tqdm

from eglib.config import get_profile, torch_threads
from eglib.evaluate import (
    EVAL_MODES,
    TriggeredLike,
    accuracy,
    attack_success_rate,
    guards_eval_mode,
)
from eglib.experiments import ExperimentConfig, is_cached, run_experiment
from eglib.params import check_seeds
from eglib.plots import metric_vs_param
from eglib.studies.base import StudyResult
from eglib.studies.forced_dimension import (
    ATTACK,
    DATASET,
    METRIC_COLUMNS,
    MODEL,
    UNDEFENDED,
    VARIANTS,
    describe,
    guard_params,
    is_identity_point,
    model_stages,
    percent_table,
    run_configs,
    study_config,
)
from eglib.studies.forced_dimension import GRIDS as FORCED_GRIDS
from eglib.studies.runs import summarise

NAME = "ablations"


@dataclass(frozen=True)
class AblationGrid:
    """What each sub-ablation varies in one profile; everything else stays at `reference`.

    `reference`: the guard the other factors are varied around (k, variant, tail_scale; at
    the model's default stage); `slow_layer_models` join the layer ablation only when
    `include_slow=True` (every stage of a big model is slow on CPU).
    """

    reference: dict[str, Any]
    k: tuple[int, ...]
    tail_scales: tuple[float, ...]
    variants: tuple[str, ...]
    poison_rates: tuple[float, ...]
    layer_models: tuple[str, ...]
    models: tuple[str, ...]
    eval_batch_sizes: tuple[int, ...] = (1, 16, 256)
    slow_layer_models: tuple[str, ...] = field(default=())


ALL_MODELS = ("cnn-small", "resnet18", "resnet34", "preact-resnet18", "vgg16", "mobilenetv2")
# The reference filter: 'kth' with the tail left alone (EigenGuard's documented provisional
# default) at k = 4, a point of every profile's forced-dimension grid (so it is cached there).
REFERENCE: dict[str, Any] = {"k": 4, "variant": "kth", "tail_scale": 1.0}

GRIDS: dict[str, AblationGrid] = {
    # k, tails and variants as in the CI forced-dimension grid (+ 'remove'): 12 runs in all
    "ci": AblationGrid(
        reference=REFERENCE,
        k=FORCED_GRIDS["ci"].k,
        tail_scales=(1.0, 0.001),
        variants=("kth", "damp 0.001", "remove"),
        poison_rates=(0.05, 0.1),
        layer_models=(MODEL,),
        models=(MODEL,),
    ),
    "demo": AblationGrid(
        reference=REFERENCE,
        k=FORCED_GRIDS["demo"].k,
        tail_scales=(1.0, 0.001),
        variants=tuple(VARIANTS),
        poison_rates=(0.01, 0.05, 0.1, 0.2),
        layer_models=(MODEL,),
        models=(MODEL, "resnet18"),
    ),
    # beyond the forced-dimension runs: 3 stages, 'remove' and 2 runs at 5 % per seed (18)
    "lite": AblationGrid(
        reference=REFERENCE,
        k=FORCED_GRIDS["lite"].k,
        tail_scales=(1.0, 0.001),
        variants=("kth", "damp 0.001", "remove"),
        poison_rates=(0.05, 0.1),
        layer_models=(MODEL,),
        models=(MODEL,),
    ),
    "full": AblationGrid(
        reference=REFERENCE,
        k=FORCED_GRIDS["full"].k,
        tail_scales=(1.0, 0.001),
        variants=tuple(VARIANTS),
        poison_rates=(0.01, 0.05, 0.1, 0.2),
        layer_models=(MODEL,),
        models=ALL_MODELS,
        slow_layer_models=("preact-resnet18",),
    ),
}


def grid_for(profile: str | None = None) -> AblationGrid:
    """The ablation grid of a profile (EGLIB_PROFILE when None)."""
    return GRIDS[get_profile(profile).name]


def _reference(grid: AblationGrid, **changes: Any) -> dict[str, Any]:
    """Guard parameters of the reference filter with some of k/variant/tail_scale/at changed."""
    return guard_params(**{**grid.reference, **changes})


Seeds = Sequence[int] | None  # a study's seeds; None: the profile's


def _per_seed(
    profile: str, build: Callable[[int], list[ExperimentConfig]], seeds: Seeds = None
) -> list[ExperimentConfig]:
    """`build(seed)` for every seed (None: the profile's), concatenated."""
    chosen = check_seeds(seeds, get_profile(profile).seeds)
    return [cfg for seed in chosen for cfg in build(seed)]


def layer_configs(
    profile: str, *, include_slow: bool = False, seeds: Seeds = None
) -> list[ExperimentConfig]:
    """Per model: the undefended run and the reference guard after each stage in turn."""
    grid = grid_for(profile)
    models = grid.layer_models + (grid.slow_layer_models if include_slow else ())
    return _per_seed(
        profile,
        lambda seed: [
            cfg
            for model in models
            for cfg in [
                study_config(profile, seed, model=model),
                *(
                    study_config(profile, seed, _reference(grid, at=stage), model=model)
                    for stage in model_stages(model, DATASET)[0]
                ),
            ]
        ],
        seeds,
    )


def _vary(
    profile: str, param: str, values: Sequence[Any], seeds: Seeds = None
) -> list[ExperimentConfig]:
    """The undefended run and the reference guard with `param` set to each of `values`,
    less the values where the guard is the identity (`is_identity_point`, e.g. k = 1 for
    'kth' with tail 1.0: the undefended run is that model)."""
    grid = grid_for(profile)
    kept = [v for v in values if not is_identity_point(**{**grid.reference, param: v})]
    return _per_seed(
        profile,
        lambda seed: [
            study_config(profile, seed),
            *(study_config(profile, seed, _reference(grid, **{param: v})) for v in kept),
        ],
        seeds,
    )


def k_configs(profile: str, seeds: Seeds = None) -> list[ExperimentConfig]:
    """The undefended run and the reference guard at each k."""
    return _vary(profile, "k", grid_for(profile).k, seeds)


def tail_configs(profile: str, seeds: Seeds = None) -> list[ExperimentConfig]:
    """The undefended run and the reference guard with each tail factor (0.001 vs 1)."""
    return _vary(profile, "tail_scale", grid_for(profile).tail_scales, seeds)


def rule_configs(profile: str, seeds: Seeds = None) -> list[ExperimentConfig]:
    """The undefended run and the reference guard with each rule: damping vs remove-top-k."""
    return _vary(profile, "variant", grid_for(profile).variants, seeds)


def poison_rate_configs(profile: str, seeds: Seeds = None) -> list[ExperimentConfig]:
    """Undefended and reference-guarded runs at each poison rate."""
    grid = grid_for(profile)
    return _per_seed(
        profile,
        lambda seed: [
            cfg
            for rate in grid.poison_rates
            for cfg in (
                study_config(profile, seed, poison_rate=rate),
                study_config(profile, seed, _reference(grid), poison_rate=rate),
            )
        ],
        seeds,
    )


def architecture_configs(profile: str, seeds: Seeds = None) -> list[ExperimentConfig]:
    """Undefended and reference-guarded (at the model's default stage) runs of each model."""
    grid = grid_for(profile)
    return _per_seed(
        profile,
        lambda seed: [
            cfg
            for model in grid.models
            for cfg in (
                study_config(profile, seed, model=model),
                study_config(profile, seed, _reference(grid), model=model),
            )
        ],
        seeds,
    )


def all_configs(
    profile: str, *, include_slow: bool = False, seeds: Seeds = None
) -> dict[str, list[ExperimentConfig]]:
    """The training runs of every sub-ablation, by name (eval_mode reuses the reference run)."""
    return {
        "layer": layer_configs(profile, include_slow=include_slow, seeds=seeds),
        "k": k_configs(profile, seeds),
        "tail": tail_configs(profile, seeds),
        "rule": rule_configs(profile, seeds),
        "poison_rate": poison_rate_configs(profile, seeds),
        "architecture": architecture_configs(profile, seeds),
    }


def _rows(
    name: str, configs: Sequence[ExperimentConfig], jobs: int | None, progress: bool
) -> list[dict[str, Any]]:
    """Rows of `configs` tagged with the ablation's name."""
    return [{"ablation": name, **row} for row in run_configs(configs, jobs=jobs, progress=progress)]


SMALL_BATCH = 32  # evaluation batches below this run on one CPU thread


def eval_mode_rows(
    model: nn.Module,
    images: Any,
    labels: Any,
    triggered: TriggeredLike,
    batch_sizes: Sequence[int] = (1, 16, 256),
) -> list[dict[str, Any]]:
    """ACC and ASR of one trained model for each guard eval mode and evaluation batch size.

    'running' filters each image on its own; 'batch' filters each evaluation batch (clean
    batches for ACC, triggered ones for ASR), which is undefined for batches smaller than
    the filter needs (a batch of 1 always): such a row gets acc = asr = None,
    `defined` False and the guard's message in `note`, instead of an exception.
    """
    rows = []
    for mode in EVAL_MODES:
        for size in batch_sizes:
            row: dict[str, Any] = {"eval_mode": mode, "eval_batch_size": size, "defined": True}
            threads = 1 if size < SMALL_BATCH else torch.get_num_threads()
            with guards_eval_mode(model, mode), torch_threads(threads):
                try:
                    row["acc"] = accuracy(model, images, labels, batch_size=size)
                    row["asr"] = attack_success_rate(
                        model,
                        triggered.images,
                        triggered.labels,
                        triggered.source_labels,
                        batch_size=size,
                    )
                    row["note"] = ""
                except ValueError as error:
                    if mode != "batch":
                        raise
                    row.update(acc=None, asr=None, defined=False, note=f"undefined: {error}")
            rows.append(row)
    return rows


def eval_mode_ablation(
    profile: str | None = None,
    *,
    seeds: Seeds = None,
    jobs: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Rows: the reference guarded model of each seed under both eval modes at each
    evaluation batch size of the grid (ACC on the clean test set, ASR on the triggered one)."""
    name = get_profile(profile).name
    grid = grid_for(name)
    configs = _per_seed(name, lambda seed: [study_config(name, seed, _reference(grid))], seeds)
    run_configs(configs, jobs=jobs, progress=progress)  # trains what the cache lacks
    rows = []
    for cfg in tqdm(configs, desc="eval_mode", disable=not progress):
        result = run_experiment(cfg, progress=False)  # cached above: loads it
        data = result.data
        if data.triggered is None:
            raise ValueError(f"config {cfg.key()} has no attack; eval-mode ASR needs one")
        tags = {"ablation": "eval_mode", **describe(cfg), "seed": cfg.seed, "model": cfg.model}
        rows += [
            {**tags, **row}
            for row in eval_mode_rows(
                result.model,
                data.test_images,
                data.test_labels,
                data.triggered,
                grid.eval_batch_sizes,
            )
        ]
    return rows


# The sub-ablations in their order: eval_mode evaluates the reference runs, the others are
# the runs `all_configs` builds.
ABLATIONS: tuple[str, ...] = (
    "layer",
    "k",
    "tail",
    "rule",
    "poison_rate",
    "eval_mode",
    "architecture",
)


def run(
    profile: str | None = None,
    *,
    progress: bool = True,
    jobs: int | None = None,
    include_slow: bool = False,
    ablations: Sequence[str] | None = None,
    seeds: Seeds = None,
    cached_only: bool = False,
) -> StudyResult:
    """Run the chosen sub-ablations (all when `ablations` is None) on `seeds` (None: the
    profile's); the rows of all, tagged.

    Every training run they need is trained first in one parallel sweep (cached runs are
    skipped), so the sub-ablations then only read the cache. `include_slow` adds the
    `slow_layer_models` (every stage of preact-resnet18: a GPU's work) to the layer
    ablation. `cached_only=True` trains nothing: the rows are the runs the cache holds (runs
    trained elsewhere, e.g. on a GPU machine, whose records were copied in); it does not
    apply to 'eval_mode', which needs the models, and a choice with none cached is a
    ValueError.
    """
    prof = get_profile(profile)
    names = list(ABLATIONS) if ablations is None else list(dict.fromkeys(ablations))
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation {unknown[0]!r}; allowed: {list(ABLATIONS)}")
    configs = all_configs(prof.name, include_slow=include_slow, seeds=seeds)
    if cached_only:
        configs = _cached_only(configs, names, prof.name)
    needed = [c for n in names for c in configs.get(n, [])]
    run_configs(needed, jobs=jobs, progress=progress)
    rows: list[dict[str, Any]] = []
    for name in names:
        if name == "eval_mode":
            rows += eval_mode_ablation(prof.name, seeds=seeds, jobs=jobs, progress=progress)
        else:
            rows += _rows(name, configs[name], jobs, progress=False)
    grid = grid_for(prof.name)
    return StudyResult(
        name=NAME,
        profile=prof.name,
        rows=rows,
        # cached-only: the seeds the cache held, not those asked for
        seeds=tuple(sorted({r["seed"] for r in rows}))
        if cached_only
        else check_seeds(seeds, prof.seeds),
        notes={
            "ablations": names,
            "dataset": DATASET,
            "attack": ATTACK,
            "reference": grid.reference,
            "grid": {**asdict(grid), "slow_layer_models_included": include_slow},
            "cached_only": cached_only,
        },
    )


def _cached_only(
    configs: dict[str, list[ExperimentConfig]], names: Sequence[str], profile: str
) -> dict[str, list[ExperimentConfig]]:
    """`configs` cut to the runs the cache holds; ValueError for 'eval_mode' among `names`
    or when the chosen sub-ablations have no run cached."""
    if "eval_mode" in names:
        raise ValueError(
            "cached_only does not apply to the 'eval_mode' ablation (it re-evaluates the "
            "models); choose other ablations or run without cached_only"
        )
    cached = {name: [c for c in runs if is_cached(c)] for name, runs in configs.items()}
    if not any(cached[name] for name in names):
        raise ValueError(
            f"cached_only: none of the runs of the ablations {list(names)} in this {profile!r} "
            "grid is cached; run without cached_only (--cached-only) to train them"
        )
    return cached


# How each sub-ablation is drawn: the varied parameter, its hue, and plot options.
FIGURES: dict[str, dict[str, Any]] = {
    "layer": {"param": "at", "hue": "model", "xlabel": "guarded stage ('none': undefended)"},
    "k": {"param": "k", "hue": "variant", "logx": True, "xlabel": "forced dimension k"},
    "tail": {"param": "tail_scale", "hue": "variant", "xlabel": "factor on the tail"},
    "rule": {"param": "variant", "xlabel": "rule ('none': undefended)"},
    "poison_rate": {"param": "poison_rate", "hue": "variant", "xlabel": "poison rate"},
    "eval_mode": {
        "param": "eval_batch_size",
        "hue": "eval_mode",
        "protocols": None,
        "logx": True,
        "xlabel": "evaluation batch size",
    },
    "architecture": {"param": "model", "hue": "variant", "xlabel": "architecture"},
}
# Sub-ablations whose x axis has no place for the undefended run: it becomes a dashed line.
BASELINE_AS_LINE = ("k", "tail")


def ablation_figure(name: str, rows: Sequence[dict[str, Any]], profile: str = "") -> Figure:
    """The figure of one sub-ablation from its rows (ASR and ACC per protocol vs its factor)."""
    if name not in FIGURES:
        raise ValueError(f"unknown ablation {name!r}; allowed: {list(FIGURES)}")
    spec = dict(FIGURES[name])
    mine = [r for r in rows if r.get("ablation", name) == name]
    baseline: list[dict[str, Any]] = []
    if name in BASELINE_AS_LINE:
        baseline = [r for r in mine if r["variant"] == UNDEFENDED]
        mine = [r for r in mine if r["variant"] != UNDEFENDED]
    if name == "tail":
        mine = [{**r, "tail_scale": f"x {r['tail_scale']:g}"} for r in mine]
    param = spec.pop("param")
    ref = ", ".join(f"{k}={v}" for k, v in REFERENCE.items())
    return metric_vs_param(
        mine,
        param,
        baseline=baseline,
        title=f"ablation '{name}' around {ref}: {_seeds_per_point([*mine, *baseline], param)}, "
        f"profile {profile or '?'}",
        **spec,
    )


def _seeds_per_point(rows: Sequence[dict[str, Any]], param: str) -> str:
    """'3 seed(s)', or '1-3 seeds per point' when the points (and the baseline) average
    different numbers of seeds (a cached-only table)."""
    seeds: dict[tuple[Any, ...], set[Any]] = {}
    for row in rows:
        point = (row.get(param), row.get("variant"), row.get("model"), row.get("eval_mode"))
        seeds.setdefault(point, set()).add(row.get("seed"))
    counts = sorted({len(s) for s in seeds.values()})
    if len(counts) == 1:
        return f"{counts[0]} seed(s)"
    return f"{counts[0]}-{counts[-1]} seeds per point"


def ablation_table(rows: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """One sub-ablation's table: mean +- std (%) of ACC and ASR under every protocol (the
    eval-mode one: of its single pass) per level of its factor (and hue)."""
    if name not in FIGURES:
        raise ValueError(f"unknown ablation {name!r}; allowed: {list(FIGURES)}")
    spec = FIGURES[name]
    by = [spec["param"], *([spec["hue"]] if "hue" in spec else [])]
    metrics = ("acc", "asr") if name == "eval_mode" else METRIC_COLUMNS
    return percent_table([r for r in rows if r.get("ablation") == name], by, metrics)


def eval_mode_findings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Plain sentences on the eval-mode rows: where batch mode is undefined, and how much
    ACC and ASR move with the evaluation batch size in each mode (mean over seeds)."""
    mine = [r for r in rows if r.get("ablation", "eval_mode") == "eval_mode"]
    if not mine:
        raise ValueError("no eval_mode rows")
    sentences = []
    for mode in EVAL_MODES:
        table = summarise(
            [r for r in mine if r["eval_mode"] == mode], ["eval_batch_size"], ["acc", "asr"]
        )
        undefined = [e["eval_batch_size"] for e in table if math.isnan(e["acc"])]
        defined = [e for e in table if not math.isnan(e["acc"])]
        if undefined:
            sentences.append(f"{mode}: undefined at evaluation batch size(s) {undefined}.")
        for metric in ("acc", "asr"):
            values = {e["eval_batch_size"]: round(100 * e[metric], 1) for e in defined}
            spread = max(values.values()) - min(values.values()) if values else math.nan
            sentences.append(
                f"{mode}: {metric.upper()} (%) by batch size {values}: spread {spread:.1f} points."
            )
    return sentences


def figures(result: StudyResult) -> dict[str, Figure]:
    """One figure per sub-ablation present in the rows, by its name."""
    present = list(dict.fromkeys(r["ablation"] for r in result.rows))
    return {name: ablation_figure(name, result.rows, result.profile) for name in present}
