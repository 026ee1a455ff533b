"""Tests for the forced-dimension and ablation studies: the default choice on hand-made rows,
the eval-mode ablation on a tiny model, the grids of every profile, figures from hand-made
rows. No real training beyond a tiny model for a few steps."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from eglib.config import PROFILES
from eglib.defenses import make_defense
from eglib.defenses.base import recorded_params
from eglib.experiments import ExperimentConfig, run_dir
from eglib.guard import EigenGuard, insert_guard
from eglib.io import write_json_atomic
from eglib.models import make_model
from eglib.plots import PROTOCOLS
from eglib.studies import STUDIES, ablations, forced_dimension, runs
from eglib.studies.base import StudyResult
from eglib.studies.forced_dimension import (
    GRIDS,
    UNDEFENDED,
    VARIANTS,
    choose_default,
    default_table,
    describe,
    guard_params,
    model_stages,
    study_config,
    study_configs,
    variant_label,
    variant_params,
)
from eglib.studies.runs import summarise
from eglib.train import TrainSettings, train_model


def _row(variant: str, k: int, tail: float | None, acc: float, asr: float, seed: int = 0) -> dict:
    """A study row with the same ACC/ASR under every protocol but 'mixed' (ASR + 0.5)."""
    row = {"variant": variant, "k": k, "tail_scale": tail, "seed": seed}
    for protocol in PROTOCOLS:
        row[f"acc_{protocol}"] = acc
        row[f"asr_{protocol}"] = min(1.0, asr + (0.5 if protocol == "mixed" else 0.0))
    row["defense"] = "none" if variant == UNDEFENDED else "eigenguard"
    return row


def test_choose_default_lowest_asr_within_the_acc_budget() -> None:
    rows = [
        _row(UNDEFENDED, 0, None, acc=0.90, asr=0.95),
        _row("kth", 4, 1.0, acc=0.89, asr=0.30),
        _row("remove", 16, 1.0, acc=0.879, asr=0.01),  # lowest ASR but 2.1 points of ACC lost
        _row("damp 0.001", 8, 0.001, acc=0.88, asr=0.20),  # exactly 2 points: still allowed
        _row("mean", 2, 1.0, acc=0.95, asr=0.60),
    ]
    choice = choose_default(rows)
    assert choice["params"] == {"k": 8, "rule": "damp", "top_scale": 0.001, "tail_scale": 0.001}
    assert (choice["variant"], choice["k"], choice["tail_scale"]) == ("damp 0.001", 8, 0.001)
    assert choice["asr"] == pytest.approx(0.20) and choice["acc"] == pytest.approx(0.88)
    assert choice["baseline_acc"] == pytest.approx(0.90)
    assert (choice["candidates"], choice["eligible"]) == (4, 3)
    EigenGuard(**choice["params"])  # the choice is a valid guard
    table = default_table(rows)
    assert [e["variant"] for e in table] == ["damp 0.001", "kth", "mean", "remove"]
    assert [e["rank"] for e in table] == [1, 2, 3, None]
    assert table[-1]["eligible"] is False
    # a looser budget admits 'remove'; the 'mixed' protocol ranks by its own ASR
    assert choose_default(rows, max_acc_drop=0.05)["variant"] == "remove"
    assert choose_default(rows, protocol="mixed")["asr"] == pytest.approx(0.70)


def test_choose_default_ties_mean_over_seeds_and_no_candidate() -> None:
    tie = [
        _row(UNDEFENDED, 0, None, acc=0.80, asr=0.9),
        _row("kth", 16, 1.0, acc=0.79, asr=0.1),
        _row("mean", 16, 1.0, acc=0.80, asr=0.1),  # same ASR, higher ACC: wins
        _row("kth", 4, 1.0, acc=0.80, asr=0.1),  # same ASR and ACC, smaller k: wins
    ]
    assert (choose_default(tie)["variant"], choose_default(tie)["k"]) == ("kth", 4)
    seeds = [
        _row(UNDEFENDED, 0, None, acc=0.80, asr=0.9, seed=0),
        _row(UNDEFENDED, 0, None, acc=0.84, asr=0.9, seed=1),  # baseline mean ACC 0.82
        _row("kth", 4, 1.0, acc=0.81, asr=0.0, seed=0),
        _row("kth", 4, 1.0, acc=0.79, asr=0.4, seed=1),  # mean 0.80, ASR 0.2: eligible
        _row("remove", 4, 1.0, acc=0.85, asr=0.1, seed=0),
        _row("remove", 4, 1.0, acc=0.75, asr=0.1, seed=1),  # mean 0.80, ASR 0.1: wins
    ]
    choice = choose_default(seeds)
    assert choice["variant"] == "remove" and choice["n"] == 2
    assert choice["baseline_acc"] == pytest.approx(0.82)
    none_fit = [_row(UNDEFENDED, 0, None, 0.9, 0.9), _row("kth", 4, 1.0, 0.5, 0.0)]
    empty = choose_default(none_fit)
    assert empty["params"] is None and empty["eligible"] == 0 and empty["candidates"] == 1
    with pytest.raises(ValueError, match="undefended"):
        choose_default([_row("kth", 4, 1.0, 0.5, 0.0)])
    with pytest.raises(ValueError, match="protocol"):
        choose_default(none_fit, protocol="batch")


def test_summarise_mean_std_and_undefined_values() -> None:
    rows = [
        {"g": "a", "acc": 0.5, "asr": None},
        {"g": "a", "acc": 0.7, "asr": 0.2},
        {"g": "b", "acc": 0.9, "asr": math.nan},
        {"g": "c", "acc": 0.9, "asr": math.nan},
        {"g": "c", "acc": 0.8, "asr": 0.3},  # NaN beside a value: left out of the mean
    ]
    table = summarise(rows, ["g"], metrics=["acc", "asr"])
    assert [e["g"] for e in table] == ["a", "b", "c"] and [e["n"] for e in table] == [2, 1, 2]
    assert table[0]["acc"] == pytest.approx(0.6)
    assert table[0]["acc_std"] == pytest.approx(math.sqrt(0.02))  # sample std
    assert table[0]["asr"] == pytest.approx(0.2) and math.isnan(table[0]["asr_std"])
    assert math.isnan(table[1]["asr"])
    assert table[2]["asr"] == pytest.approx(0.3)


def test_trend_table_checks_observation_3_per_filter_and_protocol() -> None:
    rows = [
        _row(UNDEFENDED, 0, None, acc=0.90, asr=0.95),
        _row("kth", 1, 1.0, acc=0.90, asr=0.90),
        _row("kth", 16, 1.0, acc=0.89, asr=0.20),  # ASR falls 70 points, ACC -1: holds
        _row("remove", 1, 1.0, acc=0.90, asr=0.50),
        _row("remove", 4, 1.0, acc=0.80, asr=0.40),  # ACC -10 at k = 4: does not hold
        _row("remove", 16, 1.0, acc=0.90, asr=0.10),
    ]
    table = {e["variant"]: e for e in forced_dimension.trend_table(rows)}
    kth, remove = table["kth"], table["remove"]
    assert kth["k"] == "1..16" and kth["undefended_asr"] == 95.0
    assert (kth["asr_kmin_per_sample"], kth["asr_kmax_per_sample"]) == (90.0, 20.0)
    assert kth["worst_acc_drop_per_sample"] == 1.0 and kth["holds_per_sample"] is True
    # 'mixed' ASR is +50 points, capped at 100 %: 100 -> 70 is still a fall of >= 10 points
    assert kth["holds_mixed"] is True and kth["asr_kmin_mixed"] == 100.0
    assert remove["worst_acc_drop_per_sample"] == 10.0 and remove["holds_per_sample"] is False
    with pytest.raises(ValueError, match="undefended"):
        forced_dimension.trend_table(rows[1:])
    # an unlearned backdoor (undefended ASR 30 %): no verdict, though the ASR 'fell'
    weak = [_row(UNDEFENDED, 0, None, acc=0.9, asr=0.3), *rows[1:3]]
    weak[1]["asr_per_sample"] = 0.3
    void = forced_dimension.trend_table(weak)[0]
    assert void["holds_per_sample"] is None and void["undefended_asr"] == 30.0


def test_tables_for_reading() -> None:
    rows = [_row("kth", 4, 1.0, 0.5, 0.1, seed=s) for s in (0, 1)]
    rows[1]["acc_per_sample"] = 0.7
    table = forced_dimension.percent_table(rows, ["variant", "k"])
    assert table[0]["variant"] == "kth" and table[0]["n"] == 2
    assert table[0]["ACC (%), per-sample"] == "60.0 ± 14.1"
    assert table[0]["ASR (%), pure triggered batches"] == "10.0 ± 0.0"
    eval_rows = [
        {"ablation": "eval_mode", "eval_mode": m, "eval_batch_size": b, "acc": acc, "asr": 0.2}
        for m, b, acc in (("running", 1, 0.6), ("running", 8, 0.6), ("batch", 1, None))
        + (("batch", 8, 0.5),)
    ]
    shown = ablations.ablation_table(eval_rows, "eval_mode")
    assert [(e["eval_batch_size"], e["eval_mode"]) for e in shown][:2] == [
        (1, "running"),
        (8, "running"),
    ]
    assert shown[2]["ACC (%)"] == "-"  # batch mode at size 1: undefined
    findings = ablations.eval_mode_findings(eval_rows)
    assert "batch: undefined at evaluation batch size(s) [1]." in findings
    assert any(f.startswith("running: ACC") and "spread 0.0 points" in f for f in findings)
    with pytest.raises(ValueError, match="unknown ablation 'colour'; allowed: "):
        ablations.ablation_table(eval_rows, "colour")


def test_variants_round_trip_and_guard_params() -> None:
    for label, params in VARIANTS.items():
        assert variant_label(params) == label and variant_params(label) == params
    assert variant_params("damp 0.5") == {"rule": "damp", "top_scale": 0.5}
    with pytest.raises(ValueError, match="unknown variant"):
        variant_params("shrink")
    params = guard_params(4, "damp 0.1", 0.001, at="layer2")
    assert params == {"k": 4, "rule": "damp", "top_scale": 0.1, "tail_scale": 0.001, "at": "layer2"}


@dataclass
class _Triggered:
    images: torch.Tensor
    labels: torch.Tensor
    source_labels: torch.Tensor


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: small ops on a shared, oversubscribed CPU stay fast."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.usefixtures("one_thread")
def test_eval_mode_batch_of_one_is_reported_undefined() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 1, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (48,), generator=gen)
    model = make_model("cnn-small", 3, 1)
    insert_guard(model, at="layer1", k=4)
    train_model(
        model, images, labels, TrainSettings(epochs=1, batch_size=16), seed=0, progress=False
    )
    triggered = _Triggered(images[:20], torch.zeros(20, dtype=torch.long), labels[:20])
    torch.set_num_threads(2)
    rows = ablations.eval_mode_rows(model, images[:30], labels[:30], triggered, (1, 3, 10))
    assert torch.get_num_threads() == 2  # small batches ran on one thread; restored after
    by = {(r["eval_mode"], r["eval_batch_size"]): r for r in rows}
    assert set(by) == {(m, b) for m in ("running", "batch") for b in (1, 3, 10)}
    for size in (1, 3):  # a batch-wise filter with k = 4 cannot run on batches of 1 or 3
        row = by[("batch", size)]
        assert row["defined"] is False and row["acc"] is None and row["asr"] is None
        assert row["note"].startswith("undefined:") and "B=" in row["note"]
    assert by[("batch", 10)]["defined"] and 0 <= by[("batch", 10)]["acc"] <= 1
    running = [by[("running", b)] for b in (1, 3, 10)]
    assert all(r["defined"] for r in running)
    # per-sample filtering: the batch size does not change a prediction
    assert len({r["acc"] for r in running}) == 1 and len({r["asr"] for r in running}) == 1


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_grids_are_well_formed(profile: str) -> None:
    configs = study_configs(profile)
    every = [c for cs in ablations.all_configs(profile, include_slow=True).values() for c in cs]
    assert configs and every
    for cfg in dict.fromkeys([*configs, *every]):
        assert isinstance(cfg, ExperimentConfig) and cfg.attack == "badnets"
        assert cfg.seed in PROFILES[profile].seeds
        if cfg.defense == "eigenguard":
            params = dict(cfg.defense_params)
            make_defense("eigenguard", **params)  # validates every guard parameter
            assert params["at"] in model_stages(cfg.model)[0]
            assert cfg.batch_size >= params["k"] + 1  # the guard's min_batch
        else:
            assert cfg.defense == "none"
    grid = ablations.GRIDS[profile]
    assert set(grid.variants) <= set(VARIANTS) and grid.eval_batch_sizes[0] == 1
    forced = GRIDS[profile]
    ref = grid.reference
    # the reference guard is a point of the forced-dimension grid, so the cache serves both
    assert ref["k"] in forced.k and ref["variant"] in forced.variants
    assert ref["tail_scale"] in forced.tail_scales
    n_seeds = len(PROFILES[profile].seeds)
    # the grid's identity points (k = 1 with 'kth' or 'mean' at tail 1.0: EigenGuard refuses
    # them, and the undefended run is their model) are not run
    identity = sum(
        k == 1 and v in ("kth", "mean") and t == 1.0
        for k in forced.k
        for v in forced.variants
        for t in forced.tail_scales
    )
    per_seed = 1 + len(forced.k) * len(forced.variants) * len(forced.tail_scales) - identity
    assert len(configs) == n_seeds * per_seed


def test_forced_grid_skips_identity_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """k = 1 with 'kth' or 'mean' and tail 1.0 maps s_1 to itself and leaves the tail: the
    identity guard, which EigenGuard refuses. The grid leaves those points out (the
    undefended run is their model) and keeps their neighbours; the notes list them."""
    points = {
        (d["k"], d["variant"], d["tail_scale"])
        for d in map(describe, study_configs("ci"))
        if d["variant"] != UNDEFENDED
    }
    assert (1, "kth", 1.0) not in points and len(points) == 11  # 2 x 2 x 3 - 1
    assert {(1, "kth", 0.001), (1, "damp 0.001", 1.0), (4, "kth", 1.0)} <= points
    for profile in ("demo", "full"):
        run = [describe(c) for c in study_configs(profile, (0,))]
        assert not [
            d
            for d in run
            if d["k"] == 1 and d["tail_scale"] == 1.0 and d["variant"] in ("kth", "mean")
        ]
        assert {"variant": "mean", "k": 1, "tail_scale": 0.001, "at": "layer1"} in run
    assert forced_dimension.is_identity_point(1, "mean", 1.0)
    assert forced_dimension.is_identity_point(4, "damp 1", 1.0)
    assert not forced_dimension.is_identity_point(1, "remove", 1.0)
    assert not forced_dimension.is_identity_point(1, "kth", 0.001)
    monkeypatch.setattr(forced_dimension, "run_configs", lambda configs, **kw: _fake_rows())
    notes = forced_dimension.run("ci", progress=False).notes
    assert notes["identity_points_skipped"] == [{"variant": "kth", "tail_scale": 1.0, "k": 1}]
    assert notes["k"] == [1, 4, 16]  # the grid itself is unchanged


def test_ci_grids_are_small_and_shared() -> None:
    forced = set(study_configs("ci"))
    ablation = {c for cs in ablations.all_configs("ci").values() for c in cs}
    # 13 grid points less the identity one (kth, k = 1, tail 1.0), which is not run
    assert len(forced) <= 12 and len(ablation) <= 12
    assert len(ablation - forced) <= 6  # most ablation runs come from the forced-dim cache
    assert {c.model for c in ablation} == {"cnn-small"}
    slow = ablations.layer_configs("full", include_slow=True)
    assert "preact-resnet18" in {c.model for c in slow}
    assert "preact-resnet18" not in {c.model for c in ablations.layer_configs("full")}


def test_run_configs_reads_the_cache_without_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path))
    configs = [study_config("ci", 0), study_config("ci", 0, guard_params(4, "kth", 1.0))]
    for i, cfg in enumerate(configs):
        metrics = {
            "acc": 0.5 + i,
            "protocols": {p: {"acc": 0.5, "asr": 0.1 * i} for p in PROTOCOLS},
        }
        record = {"config": cfg.to_dict(), "metrics": metrics, "timings": {"train_s": 1.0}}
        write_json_atomic(run_dir(cfg) / "record.json", {**record, "key": cfg.key()})

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("run_grid called although every run is cached")

    monkeypatch.setattr(runs, "run_grid", no_training)
    rows = forced_dimension.run_configs([*configs, configs[0]])
    assert [r["variant"] for r in rows] == [UNDEFENDED, "kth", UNDEFENDED]
    assert rows[1]["k"] == 4 and rows[1]["at"] == "layer1" and rows[1]["asr_pure"] == 0.1
    assert describe(configs[1]) == {"variant": "kth", "k": 4, "tail_scale": 1.0, "at": "layer1"}


def test_study_configs_take_seeds_and_another_profiles_grid() -> None:
    """`figures --profile full --only forced_dimension --seeds 0 --grid lite`: lite's 8
    filters and the undefended run, trained at full size, one seed."""
    configs = study_configs("full", seeds=(0,), grid="lite")
    lite = GRIDS["lite"]
    assert len(configs) == 1 + len(lite.k) * len(lite.variants) * len(lite.tail_scales)
    assert {c.seed for c in configs} == {0}
    assert {(c.train_size, c.epochs) for c in configs} == {(None, PROFILES["full"].epochs)}
    assert {dict(c.defense_params)["k"] for c in configs[1:]} == set(lite.k)
    assert study_configs("full", grid="full") == study_configs("full")
    with pytest.raises(ValueError, match=r"grid='huge'; allowed: \['ci', 'demo'"):
        study_configs("full", grid="huge")


def test_ablations_take_seeds_and_a_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`figures --profile full --only ablations --ablations poison_rate --seeds 0`: one seed
    of the chosen sub-ablation is trained, nothing else."""
    by_seed = ablations.poison_rate_configs("full", seeds=(0,))
    grid = ablations.GRIDS["full"]
    assert len(by_seed) == 2 * len(grid.poison_rates) and {c.seed for c in by_seed} == {0}
    assert ablations.poison_rate_configs("full") == ablations.poison_rate_configs(
        "full", seeds=PROFILES["full"].seeds
    )
    trained: list[list[ExperimentConfig]] = []
    monkeypatch.setattr(ablations, "run_configs", lambda c, **kw: trained.append(list(c)) or [])
    result = ablations.run("full", ablations=["poison_rate"], seeds=(0,), progress=False)
    assert trained == [by_seed, by_seed]  # the sweep, then the sub-ablation reads the cache
    assert result.seeds == (0,) and result.notes["ablations"] == ["poison_rate"]


def test_ablations_cached_only_read_the_runs_the_cache_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--cached-only --include-slow`: the rows are the cached runs of the chosen
    sub-ablations (e.g. records copied from a GPU machine); nothing is trained."""
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(runs, "run_grid", lambda *a, **kw: pytest.fail("trained a run"))
    with pytest.raises(ValueError, match="none of the runs of the ablations"):
        ablations.run("full", ablations=["layer"], seeds=(0,), cached_only=True)
    with pytest.raises(ValueError, match="does not apply to the 'eval_mode'"):
        ablations.run("full", ablations=["eval_mode"], seeds=(0,), cached_only=True)
    slow = [
        c
        for c in ablations.layer_configs("full", include_slow=True, seeds=(0,))
        if c.model == "preact-resnet18"
    ]
    for cfg in slow[:3]:
        write_json_atomic(run_dir(cfg) / "record.json", _record_of(cfg))
    result = ablations.run(
        "full",
        ablations=["layer", "architecture"],
        seeds=(0,),
        include_slow=True,
        cached_only=True,
        progress=False,
    )
    layer = [r for r in result.rows if r["ablation"] == "layer"]
    assert [(r["model"], r["at"]) for r in layer] == [
        ("preact-resnet18", describe(c)["at"]) for c in slow[:3]
    ]
    assert [r["model"] for r in result.rows if r["ablation"] == "architecture"] == [
        "preact-resnet18",
        "preact-resnet18",
    ]  # its undefended run and the guard at its default stage, layer1
    assert result.notes["cached_only"] is True
    assert result.seeds == (0,)
    rows = [{**r, "seed": 1} for r in layer[:1]] + result.rows  # a second seed, one point
    title = ablations.ablation_figure("layer", rows, "full").get_suptitle()
    assert "1-2 seeds per point" in title  # it said '2 seed(s)' for every point
    plt.close("all")


def _record_of(cfg: ExperimentConfig) -> dict:
    """A finished run's record as `record_row` reads it (metrics made up)."""
    metrics = {
        "acc": 0.9,
        "asr": 0.5,
        "protocols": {p: {"acc": 0.9, "asr": 0.5} for p in PROTOCOLS},
    }
    timings = {"train_s": 1.0}
    return {"config": cfg.to_dict(), "key": cfg.key(), "metrics": metrics, "timings": timings}


def test_default_jobs_count_the_cpus_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One worker per CPU of os.cpu_count(): 64 workers on a 64-core machine that gives the
    process 3 (a container or `taskset`)."""
    monkeypatch.setenv("EGLIB_DEVICE", "cpu")
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert runs.default_jobs(100) == 3
    assert runs.default_jobs(2) == 2


def test_run_records_labels_its_bar_with_the_cached_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the missing runs reach run_grid, so the bar's label must count the cached ones."""
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path))
    configs = [study_config("ci", seed) for seed in (0, 1, 2)]
    record = {"config": configs[0].to_dict(), "key": configs[0].key()}
    write_json_atomic(run_dir(configs[0]) / "record.json", record)
    seen: dict[str, object] = {}

    def fake_grid(missing: list[ExperimentConfig], **kwargs: object) -> list[dict]:
        seen.update(kwargs, missing=missing)
        for cfg in missing:
            write_json_atomic(run_dir(cfg) / "record.json", {"key": cfg.key()})
        return []

    monkeypatch.setattr(runs, "run_grid", fake_grid)
    records = runs.run_records([*configs, configs[0]], jobs=1)
    assert [r["key"] for r in records] == [c.key() for c in [*configs, configs[0]]]
    assert seen["missing"] == configs[1:]
    assert seen["label"] == "training 2 runs (1 cached)"
    # a record trained under another defence default is not cached: it is trained again
    guarded = study_config("ci", 0, guard_params(4, "kth", 1.0))
    stale = {"config": guarded.to_dict(), "key": guarded.key()}
    stale["defense"] = {"params": {**recorded_params("eigenguard", dict(guarded.defense_params))}}
    stale["defense"]["params"]["momentum"] = 0.5  # not today's default
    write_json_atomic(run_dir(guarded) / "record.json", stale)
    with pytest.warns(UserWarning, match="other defence parameters"):
        runs.run_records([guarded], jobs=1)
    assert seen["missing"] == [guarded]


def _fake_rows() -> list[dict]:
    rows = [_row(UNDEFENDED, 0, None, 0.9, 0.9)]
    rows += [
        _row(v, k, t, 0.88, 0.5 / k)
        for v in ("kth", "remove")
        for t in (1.0, 0.001)
        for k in (1, 4)
    ]
    return rows


def test_forced_dimension_figure_from_rows() -> None:
    result = StudyResult("forced_dimension", "ci", _fake_rows(), seeds=(0,))
    figs = forced_dimension.figures(result)
    assert list(figs) == [""]
    fig = figs[""]
    assert len(fig.axes) == 2 * len(PROTOCOLS)
    assert any(ln.get_linestyle() == "--" for ln in fig.axes[0].get_lines())  # undefended line
    plt.close(fig)


def test_ablation_figures_one_per_sub_ablation() -> None:
    rows = [{"ablation": "rule", "model": "cnn-small", **r} for r in _fake_rows()]
    rows += [{"ablation": "k", "model": "cnn-small", **r} for r in _fake_rows()]
    rows += [
        {
            "ablation": "eval_mode",
            "variant": "kth",
            "seed": 0,
            "eval_mode": m,
            "eval_batch_size": b,
            "acc": None if (m, b) == ("batch", 1) else 0.8,
            "asr": None if (m, b) == ("batch", 1) else 0.1,
        }
        for m in ("running", "batch")
        for b in (1, 16, 256)
    ]
    result = StudyResult("ablations", "ci", rows, seeds=(0,))
    figs = ablations.figures(result)
    assert list(figs) == ["rule", "k", "eval_mode"]
    assert len(figs["eval_mode"].axes) == 2  # ACC and ASR, no protocols (one model pass each)
    undefined = [c for c in figs["eval_mode"].axes[0].collections if c.get_label() == "undefined"]
    assert len(undefined) == 1
    labels = [t.get_text() for t in figs["rule"].axes[-1].get_xticklabels()]
    assert labels[0] == UNDEFENDED and len(labels) == 3
    for fig in figs.values():
        plt.close(fig)
    with pytest.raises(ValueError, match="unknown ablation 'colour'; allowed: "):
        ablations.ablation_figure("colour", rows)


def test_studies_are_registered() -> None:
    assert STUDIES["forced_dimension"] is forced_dimension
    assert STUDIES["ablations"] is ablations
    with pytest.raises(ValueError, match="unknown ablation 'colour'; allowed: "):
        ablations.run("ci", ablations=["colour"])
