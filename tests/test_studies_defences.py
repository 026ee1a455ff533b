"""Tests for the defence-table and adaptive studies: configs, aggregation over seeds, the
detection table, the study runs on hand-made cached records (no training beyond a tiny
untrained model for the trigger ranks)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from eglib import studies
from eglib.config import PROFILES, Profile
from eglib.defenses import make_defense
from eglib.experiments import (
    ExperimentConfig,
    ExperimentData,
    ExperimentResult,
    run_dir,
    run_experiment,
    seeded_model,
)
from eglib.io import read_json, write_json_atomic
from eglib.poison import backdoor_testset, make_attack
from eglib.studies import adaptive, defence_table, runs
from eglib.studies.redraw import redraw_folder

PROTOCOLS = ("per_sample", "mixed", "pure")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EGLIB_CACHE", str(tmp_path / "cache"))


def _metrics(acc: float, asr: float, batch_gain: float = 0.0) -> dict[str, Any]:
    """Record metrics; `batch_gain` lowers the ASR of the batch-wise protocols (as a guard)."""
    protocols = {
        "per_sample": {"acc": acc, "asr": asr},
        "mixed": {"acc": acc, "asr": asr - batch_gain / 2},
        "pure": {"acc": acc - 0.01, "asr": asr - batch_gain},
    }
    return {"acc": acc, "asr": asr, "protocols": protocols}


def _record(
    cfg: ExperimentConfig,
    acc: float,
    asr: float,
    *,
    batch_gain: float = 0.0,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A minimal record of `cfg` as run_experiment writes it (the resolved defence params)."""
    params = make_defense(cfg.defense, **dict(cfg.defense_params)).params()
    return {
        "version": 1,
        "key": cfg.key(),
        "config": cfg.to_dict(),
        "metrics": _metrics(acc, asr, batch_gain),
        "history": [],
        "defense": {"name": cfg.defense, "params": params, "info": info or {}},
        "timings": {"train_s": 2.0, "eval_s": 0.5},
    }


def _detection(auroc: float, tpr: float, fpr: float, n_poison: int = 40) -> dict[str, Any]:
    return {
        "auroc": auroc,
        "tpr": tpr,
        "fpr": fpr,
        "precision": 0.5,
        "n_total": 400,
        "n_poison": n_poison,
        "n_removed": 60,
        "n_removed_poison": 30,
    }


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------


def test_badnets_configs_are_the_quickstarts() -> None:
    quick = ExperimentConfig.from_profile("ci", attack="badnets", poison_rate=0.1, defense="none")
    assert defence_table.table_config("ci", "badnets", "none") == quick
    guarded = defence_table.table_config("ci", "badnets", "eigenguard")
    params = dict(guarded.defense_params)
    assert params["at"] == "layer1" and params["k"] >= 1 and "rule" in params  # all explicit
    ci = PROFILES["ci"]
    assert (guarded.epochs, guarded.train_size, guarded.seed) == (ci.epochs, ci.train_size, 0)


def test_clean_label_attacks_poison_half_the_target_class() -> None:
    assert defence_table.table_config("ci", "sig", "none").poison_rate == 0.05
    assert defence_table.table_config("ci", "blend", "none").poison_rate == 0.1
    rates = [c.poison_rate for c in defence_table.table_configs("ci", ("sig", "lf"), ("ss",), (0,))]
    assert rates == [0.05, 0.1]
    full = defence_table.GRIDS["full"]
    for attack in full.detection_attacks:  # every detection run is possible
        assert not defence_table.ATTACKS[attack].clean_label
    # and every dirty-label attack of the table is scored at 1, 5 and 10 %
    dirty_label = {"badnets", "blend", "wanet", "ssba", "lf", "bpp", "inputaware", "refool"}
    assert set(full.detection_attacks) == dirty_label


def test_anp_in_the_table_limits_its_accuracy_drop() -> None:
    assert dict(defence_table.table_config("ci", "badnets", "anp").defense_params) == {
        "max_acc_drop": 0.1
    }
    assert defence_table.table_config("ci", "badnets", "ft").defense_params == ()


def test_learned_attacks_are_small_outside_the_full_profile() -> None:
    ci = dict(defence_table.table_config("ci", "lc", "none").attack_params)
    assert ci and ci["fit_size"] == 512
    assert defence_table.table_config("full", "lc", "none").attack_params == ()
    assert defence_table.table_config("ci", "wanet", "none").attack_params == ()
    with pytest.raises(ValueError, match="unknown attack 'nope'; allowed"):
        defence_table.attack_params("nope", "ci")


def test_grids_per_profile() -> None:
    assert set(defence_table.GRIDS) == set(PROFILES) == set(adaptive.GRIDS)
    ci = defence_table.GRIDS["ci"]
    assert (ci.attacks, ci.defenses) == (("badnets",), ("none", "eigenguard", "ss"))
    full = defence_table.GRIDS["full"]
    assert set(full.attacks) == set(defence_table.ALL_ATTACKS) and len(full.attacks) == 10
    assert set(full.defenses) == set(defence_table.ALL_DEFENSES) and len(full.defenses) == 9
    assert full.detection_rates == (0.01, 0.05, 0.1) and set(full.detectors) == {
        "ss",
        "spectre",
        "ac",
        "eigenguard-score",
    }
    assert all(d in defence_table.ALL_DEFENSES or d == "eigenguard-score" for d in full.detectors)
    configs = defence_table.table_configs("ci", ("badnets", "blend"), ("none", "ss"), (0, 1))
    assert [(c.attack, c.defense, c.seed) for c in configs[:3]] == [
        ("badnets", "none", 0),
        ("badnets", "none", 1),
        ("badnets", "ss", 0),
    ]
    # the CI detection run is the table's own SS run: nothing extra to train
    assert set(defence_table.detection_configs("ci", (0,))) <= set(
        defence_table.table_configs("ci", ci.attacks, ci.defenses, (0,))
    )


# ----------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------


def _hand_records() -> list[dict[str, Any]]:
    """badnets x (none, eigenguard) x 3 seeds, blend x none x 1 seed."""
    records = []
    for seed, (acc, asr) in enumerate([(0.90, 0.99), (0.92, 0.97), (0.88, 1.00)]):
        cfg = defence_table.table_config("ci", "badnets", "none", seed)
        records.append(_record(cfg, acc, asr))
    for seed, (acc, asr) in enumerate([(0.89, 0.30), (0.87, 0.50), (0.88, 0.10)]):
        cfg = defence_table.table_config("ci", "badnets", "eigenguard", seed)
        records.append(_record(cfg, acc, asr, batch_gain=0.1))
    records.append(_record(defence_table.table_config("ci", "blend", "none"), 0.91, 0.8))
    return records


def test_summary_rows_mean_std_and_protocol_columns() -> None:
    rows = defence_table.seed_rows(_hand_records())
    assert rows[0]["asr_pure"] == 0.99 and rows[3]["asr_pure"] == pytest.approx(0.2)
    table = defence_table.summary_rows(rows)
    assert [(r["attack"], r["defense"], r["n"]) for r in table] == [
        ("badnets", "none", 3),
        ("badnets", "eigenguard", 3),
        ("blend", "none", 1),
    ]
    guard = table[1]
    assert guard["asr_per_sample"] == pytest.approx(0.3)
    assert guard["asr_per_sample_std"] == pytest.approx(statistics.stdev([0.3, 0.5, 0.1]))
    assert guard["asr_mixed"] == pytest.approx(0.25)  # per-protocol columns kept apart
    assert guard["asr_pure"] == pytest.approx(0.2)
    assert guard["acc_pure"] == pytest.approx(0.87)
    assert guard["acc_pure_std"] == pytest.approx(statistics.stdev([0.89, 0.87, 0.88]))
    assert table[0]["acc"] == pytest.approx(0.9)
    assert math.isnan(table[2]["asr_std"])  # one seed: no std, not a zero one


def _report(
    detector: str, rate: float, seed: int, auroc: float, tpr: float, info: dict | None = None
) -> dict[str, Any]:
    """A detector report as `detector_reports` returns it."""
    extra = {"attack": "badnets", "poison_rate": rate, "seed": seed, "target": 0}
    body = {"detector": detector, "params": {}, **extra, **_detection(auroc, tpr, 0.1)}
    return {**body, "info": info or {}}


def test_detection_table_from_hand_made_reports() -> None:
    reports = [
        _report("ss", rate, seed, auroc, tpr)
        for rate, auroc in ((0.01, 0.9), (0.05, 0.8), (0.1, 0.6))
        for seed, tpr in enumerate((0.7, 0.9))
    ]
    clusters = [
        {"label": 0, "sizes": [35, 45], "smaller_share": 35 / 80, "flagged": False},
        {"label": 1, "sizes": [2, 38], "smaller_share": 0.05, "flagged": True},
    ]
    reports.append(_report("ac", 0.1, 0, 0.5, 0.0, info={"clusters": clusters}))

    flat = defence_table.detection_records(reports)
    assert len(flat) == 7 and "info" not in flat[0] and "params" not in flat[0]
    ac = flat[-1]
    assert (ac["detector"], ac["poison_rate"], ac["target_flagged"]) == ("ac", 0.1, False)
    assert ac["target_poison_share"] == pytest.approx(40 / 80)
    assert ac["target_smaller_share"] == pytest.approx(35 / 80)
    assert "target_flagged" not in flat[0]

    long = defence_table.detection_summary(flat)
    ss_1 = next(r for r in long if r["detector"] == "ss" and r["poison_rate"] == 0.01)
    assert ss_1["n"] == 2 and ss_1["tpr"] == pytest.approx(0.8)
    assert ss_1["tpr_std"] == pytest.approx(statistics.stdev([0.7, 0.9]))

    wide = defence_table.detection_wide(flat)
    ss_row = next(r for r in wide if r["detector"] == "ss")
    assert ss_row["auroc@1%"] == pytest.approx(0.9) and ss_row["tpr@5%"] == pytest.approx(0.8)
    ac_row = next(r for r in wide if r["detector"] == "ac")
    assert math.isnan(ac_row["auroc@1%"]) and ac_row["auroc@10%"] == 0.5


def test_seed_rows_carry_a_filtering_defences_own_detection() -> None:
    ss = defence_table.table_config("ci", "badnets", "ss")
    none = defence_table.table_config("ci", "badnets", "none")
    abl = defence_table.table_config("ci", "badnets", "abl")
    rows = defence_table.seed_rows(
        [
            _record(ss, 0.9, 0.1, info={"detection": _detection(0.9, 0.7, 0.1)}),
            _record(none, 0.9, 1),
            _record(abl, 0.2, 0.3, info={"isolation": _detection(0.8, 0.01, 0.0)}),
        ]
    )
    assert rows[0]["det_auroc"] == 0.9 and "det_auroc" not in rows[1]
    assert rows[2]["det_auroc"] == 0.8  # ABL's isolation, which the README quotes


def test_detector_reports_refuse_a_defended_or_clean_run() -> None:
    with pytest.raises(ValueError, match="defense='ss'"):
        defence_table.detector_reports(defence_table.table_config("ci", "badnets", "ss"), ["ss"])
    with pytest.raises(ValueError, match="attack=None"):
        defence_table.detector_reports(
            defence_table.table_config("ci", "badnets", "none").replace(attack=None), ["ss"]
        )


def test_scoring_the_undefended_run_is_the_filtering_defences_detection(
    tiny_fashion: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The detection table scores the undefended model; SS as a defence trains that same model
    first, so its own report must be the same (the shortcut changes no number)."""
    tiny = Profile("tiny", 300, 100, 1, 32, (0,))
    monkeypatch.setitem(PROFILES, "tiny", tiny)
    none = defence_table.table_config("tiny", "badnets", "none")
    ss = defence_table.table_config("tiny", "badnets", "ss")
    (scored,) = defence_table.detector_reports(none, ["ss"])
    assert (run_dir(none) / defence_table.DETECTION_FILE).exists()
    own = run_experiment(ss, progress=False).record["defense"]["info"]["detection"]
    for key in ("auroc", "tpr", "fpr", "n_removed", "n_poison"):
        assert scored[key] == pytest.approx(own[key]), key
    assert defence_table.detector_reports(none, ["ss"])[0]["auroc"] == scored["auroc"]  # cached
    path = run_dir(none) / defence_table.DETECTION_FILE
    stale = read_json(path)
    assert stale["detectors"]["ss"]["rate_guess"] == 0.1  # the parameters are the cache key
    stale["detectors"]["ss"]["rate_guess"] = 0.5
    stale["records"][0]["auroc"] = -1.0
    write_json_atomic(path, stale)
    assert defence_table.detector_reports(none, ["ss"])[0]["auroc"] == scored["auroc"]  # redone


def test_detection_reports_of_a_since_retrained_run_are_scored_again(
    tiny_fashion: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reports live in the run's folder: a retrained run (a new model digest) must not be
    served its predecessor's scores; reports and records from before digests still match."""
    monkeypatch.setitem(PROFILES, "tiny", Profile("tiny", 300, 100, 1, 32, (0,)))
    none = defence_table.table_config("tiny", "badnets", "none")
    (scored,) = defence_table.detector_reports(none, ["ss"])
    path, record_path = run_dir(none) / defence_table.DETECTION_FILE, run_dir(none) / "record.json"
    assert read_json(path)["model_digest"] == read_json(record_path)["model_digest"]
    old = read_json(path)
    old["records"][0]["auroc"] = -1.0
    write_json_atomic(path, old)
    assert defence_table.detector_reports(none, ["ss"])[0]["auroc"] == -1.0  # current: served
    record = read_json(record_path)
    record["model_digest"] = "0123456789abcdef"  # as a retraining would leave it
    write_json_atomic(record_path, record)
    assert defence_table.detector_reports(none, ["ss"], cached_only=True) == []
    assert defence_table.detector_reports(none, ["ss"])[0]["auroc"] == scored["auroc"]
    assert read_json(path)["model_digest"] == "0123456789abcdef"
    legacy = {k: v for k, v in read_json(path).items() if k != "model_digest"}
    legacy["records"][0]["auroc"] = -1.0
    write_json_atomic(path, legacy)
    del record["model_digest"]
    write_json_atomic(record_path, record)
    assert defence_table.detector_reports(none, ["ss"], cached_only=True)[0]["auroc"] == -1.0


# ----------------------------------------------------------------------------------------------
# the study runs, on hand-made cached records
# ----------------------------------------------------------------------------------------------


def _fake_grid(calls: list[int]) -> Any:
    """A run_grid that writes a plausible record for each config instead of training."""

    def run_grid(
        configs: list[ExperimentConfig], *, jobs: int, progress: bool, label: str
    ) -> list[dict]:
        calls.append(len(configs))
        assert jobs >= 1
        assert label == f"training {len(configs)} runs (0 cached)"
        for cfg in configs:
            info = {}
            if cfg.defense in ("ss", "spectre", "ac", "eigenguard-score"):
                info = {"detection": _detection(0.7, 0.6, 0.1)}
            gain = 0.3 if cfg.defense == "eigenguard" else 0.0
            record = _record(
                cfg, 0.85, 0.9 if cfg.defense == "none" else 0.4, batch_gain=gain, info=info
            )
            write_json_atomic(run_dir(cfg) / "record.json", record)
        return []

    return run_grid


def _fake_reports(scored: list[ExperimentConfig]) -> Any:
    """A detector_reports that records which runs it scored and reports a fixed AUROC."""

    def detector_reports(
        cfg: ExperimentConfig, detectors: Any, *, cached_only: bool = False
    ) -> list[dict[str, Any]]:
        scored.append(cfg)
        return [_report(d, cfg.poison_rate, cfg.seed, 0.7, 0.6) for d in detectors]

    return detector_reports


def test_defence_table_run_tables_and_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    scored: list[ExperimentConfig] = []
    monkeypatch.setattr(runs, "run_grid", _fake_grid(calls))
    monkeypatch.setattr(defence_table, "detector_reports", _fake_reports(scored))
    result = defence_table.run("ci", progress=False, jobs=2)
    assert calls == [3]  # badnets x (none, eigenguard, ss); detection scores the none run
    assert scored == [defence_table.table_config("ci", "badnets", "none")]
    assert [(r["attack"], r["defense"]) for r in result.rows] == [
        ("badnets", "none"),
        ("badnets", "eigenguard"),
        ("badnets", "ss"),
    ]
    assert result.rows[1]["asr_pure"] == pytest.approx(0.1)
    assert result.notes["runs"] == 3 and result.seeds == (0,)
    extra = defence_table.tables(result)
    assert len(extra["seeds"]) == 3 and len(extra["detection_seeds"]) == 4  # one per detector
    assert extra["detection"][0]["auroc@10%"] == pytest.approx(0.7)
    figs = defence_table.figures(result)
    assert set(figs) == {"", "protocols", "detection"}
    for fig in figs.values():
        plt.close(fig)
    again = defence_table.run("ci", progress=False)
    assert calls == [3] and again.rows == result.rows  # all cached: nothing rerun


def test_defence_table_redrawn_from_its_tables_is_byte_for_byte_the_same(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(runs, "run_grid", _fake_grid([]))
    monkeypatch.setattr(defence_table, "detector_reports", _fake_reports([]))
    options = {"attacks": ["blend"], "seeds": [0, 1]}  # detection at 1, 5 and 10 %, 2 seeds
    paths = studies.make_figures(
        "lite", tmp_path, ["defence_table"], progress=False, options=options
    )
    before = {p: p.read_bytes() for p in paths["defence_table"]}
    pngs = [p for p in before if p.suffix == ".png"]
    assert [p.name for p in pngs] == [
        "defence_table.png",
        "defence_table_protocols.png",
        "defence_table_detection.png",
    ]
    for png in pngs:
        png.unlink()
    written, skipped = redraw_folder(tmp_path, studies.STUDIES)
    assert written == {"defence_table": pngs} and skipped == {}
    assert {p: p.read_bytes() for p in before} == before


def test_defence_table_detection_runs_follow_the_chosen_attacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    scored: list[ExperimentConfig] = []
    monkeypatch.setattr(runs, "run_grid", _fake_grid(calls))
    monkeypatch.setattr(defence_table, "detector_reports", _fake_reports(scored))
    # lite scores BadNets and Blend at 1, 5 and 10 %; SIG is no detection attack
    defence_table.run("lite", progress=False, attacks=["sig"], defenses=["none"], seeds=[0])
    assert calls == [1] and [(c.attack, c.poison_rate) for c in scored] == [("sig", 0.05)]
    scored.clear()
    defence_table.run("lite", progress=False, attacks=["blend"], defenses=["none"], seeds=[0])
    assert calls == [1, 3]  # blend at 10 %, then its 1 and 5 % runs; no BadNets
    assert sorted((c.attack, c.poison_rate) for c in scored) == [
        ("blend", 0.01),
        ("blend", 0.05),
        ("blend", 0.1),
    ]
    assert len(defence_table.detection_configs("lite", (0,))) == 6  # all detection attacks


def test_defence_table_cached_only_trains_nothing_and_counts_seeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(runs, "run_grid", _fake_grid(calls))
    monkeypatch.setattr(defence_table, "detector_reports", _fake_reports([]))
    with pytest.raises(ValueError, match="none of the 6 runs of this 'ci' grid is cached"):
        defence_table.run("ci", progress=False, seeds=[0, 1], cached_only=True)
    defence_table.run("ci", progress=False, seeds=[0, 1], defenses=["none", "eigenguard"])
    defence_table.run("ci", progress=False, seeds=[2], defenses=["none"])
    assert calls == [4, 1]

    result = defence_table.run("ci", progress=False, seeds=[0, 1, 2, 3], cached_only=True)
    assert calls == [4, 1]  # trained nothing; the uncached SS runs and seed 3 are left out
    assert [(r["defense"], r["n"]) for r in result.rows] == [("none", 3), ("eigenguard", 2)]
    assert result.seeds == (0, 1, 2) and result.notes["cached_only"] is True
    assert result.notes["runs"] == 5
    fig = defence_table.figures(result)[""]
    assert "over 2-3 seeds per cell (column n)" in fig.get_suptitle()
    plt.close("all")


@pytest.mark.parametrize("with_model", [False, True])
def test_cached_only_never_trains_or_scores_for_detection(
    with_model: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cached_only reads cached detection reports only: scoring a record copied without its
    model (model.pt) would retrain it, and scoring a full-profile model takes minutes; the
    unscored runs are listed."""
    monkeypatch.setattr(runs, "run_grid", _fake_grid([]))
    real_reports = defence_table.detector_reports
    monkeypatch.setattr(defence_table, "detector_reports", _fake_reports([]))
    defence_table.run("ci", progress=False, seeds=[0], defenses=["none"], detection=False)
    monkeypatch.setattr(defence_table, "detector_reports", real_reports)
    if with_model:
        (run_dir(defence_table.table_config("ci", "badnets", "none", 0)) / "model.pt").touch()

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("cached_only trained a run")

    monkeypatch.setattr(defence_table, "run_experiment", no_training)
    result = defence_table.run(
        "ci", progress=False, seeds=[0], defenses=["none"], detection=False, cached_only=True
    )
    none_run = defence_table.table_config("ci", "badnets", "none", 0)
    assert result.notes["detection_not_scored"] == [none_run.key()]
    assert result.data["detection_records"] == [] and len(result.rows) == 1


def test_trigger_ranks_on_a_tiny_untrained_model() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(48) % 10
    attack = make_attack("badnets", target=0, num_classes=10)
    triggered = backdoor_testset(images, labels, attack, seed=0)
    data = ExperimentData(None, images, labels, images[:0], labels[:0], images, labels, triggered)
    # seeded: on some initialisations the difference is not lower rank (17.7 vs 17.2 after
    # the tests that ran before it had drawn from the global generator)
    model = seeded_model("cnn-small", 10, 1, seed=0).eval()
    cfg = defence_table.table_config("ci", "badnets", "none")
    result = ExperimentResult(cfg, {}, model, data)
    ranks = adaptive.trigger_ranks(result, count=32, seed=0)
    assert ranks["rank_stage"] == "layer1" and ranks["rank_samples"] == 32
    assert set(adaptive.RANK_COLUMNS) <= set(ranks)
    assert all(0 < ranks[f"erank_{g}"] <= 32 for g in adaptive.RANK_GROUPS)
    # a 3x3 patch changes few positions: its feature difference is lower rank than the images
    assert ranks["erank_diff"] < ranks["erank_clean"]
    assert ranks == adaptive.trigger_ranks(result, count=32, seed=0)  # seeded
    assert adaptive.trigger_ranks(result, count=500, seed=0)["rank_samples"] == len(triggered.idx)


def test_adaptive_run_ranks_the_undefended_and_guarded_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(runs, "run_grid", _fake_grid(calls))
    measured: list[tuple[str | None, str]] = []

    def fake_ranks(cfg: ExperimentConfig, progress: bool = False) -> Any:
        measured.append((cfg.attack, cfg.defense))
        return SimpleNamespace(attack=cfg.attack, record={})  # what ranks_of reads

    def ranks_of(cfg: Any, *, count: int, seed: int) -> dict[str, Any]:
        diff = {"badnets": 2.0, "highrank": 25.0, "advnoise": 3.0}[cfg.attack]
        values = {"erank_clean": 50.0, "erank_triggered": 40.0, "erank_diff": diff}
        values.update({f"srank_{g}": 2.0 for g in adaptive.RANK_GROUPS})
        return {"rank_stage": "layer1", "rank_samples": count, **values}

    monkeypatch.setattr(adaptive, "run_experiment", fake_ranks)
    monkeypatch.setattr(adaptive, "trigger_ranks", ranks_of)
    result = adaptive.run("ci", progress=False)
    assert calls == [6]  # 3 attacks x (none, eigenguard)
    assert sorted(measured) == sorted(
        (a, d) for a in adaptive.ATTACKS for d in adaptive.RANK_DEFENSES
    )
    again = adaptive.run("ci", progress=False)
    assert calls == [6] and len(measured) == 6  # runs and ranks both come from the cache
    assert again.rows == result.rows
    (first,) = adaptive.table_configs("ci", ("badnets",), ("none",), result.seeds)
    path = run_dir(first) / "record.json"
    write_json_atomic(path, {**read_json(path), "model_digest": "f" * 16})  # retrained since
    adaptive.run("ci", progress=False)
    assert len(measured) == 7 and measured[-1] == ("badnets", "none")  # its ranks redone
    row = next(r for r in result.rows if (r["attack"], r["defense"]) == ("highrank", "none"))
    assert row["erank_diff"] == 25.0 and row["asr_per_sample"] == 0.9
    assert result.notes["rank_samples_per_group"] == [256]
    assert result.notes["rank_stage"] == "layer1"
    figs = adaptive.figures(result)
    assert set(figs) == {"", "protocols"}
    for fig in figs.values():
        plt.close(fig)


def test_studies_are_registered() -> None:
    assert studies.STUDIES["defence_table"] is defence_table
    assert studies.STUDIES["adaptive"] is adaptive


def _summary_row(attack: str, defense: str, acc: float, asr: float, n: int = 3) -> dict[str, Any]:
    """A `summary_rows` row: the same ACC and ASR under every protocol but 'pure' (ASR / 2)."""
    out: dict[str, Any] = {"attack": attack, "defense": defense, "n": n}
    for protocol in PROTOCOLS:
        out[f"acc_{protocol}"], out[f"asr_{protocol}"] = acc, asr
    out["asr_pure"] = asr / 2
    return out


def test_compare_to_undefended_ranks_within_the_acc_budget() -> None:
    table = [
        _summary_row("badnets", "none", 0.90, 0.99),
        _summary_row("badnets", "eigenguard", 0.89, 0.40, n=1),  # one seed cached so far
        _summary_row("badnets", "ft", 0.80, 0.05),  # lowest ASR, but 10 ACC points lost
        _summary_row("badnets", "ss", 0.895, 0.60),
        _summary_row("blend", "eigenguard", 0.9, 0.1),  # no undefended blend row: left out
    ]
    out = defence_table.compare_to_undefended(table)
    assert [(e["defense"], e["rank"], e["within_budget"]) for e in out] == [
        ("eigenguard", 1, True),
        ("ft", None, False),
        ("ss", 2, True),
    ]
    assert out[0]["d_asr"] == pytest.approx(-0.59) and out[0]["d_acc"] == pytest.approx(-0.01)
    assert (out[0]["n"], out[0]["n_undefended"]) == (1, 3)  # the difference is not paired
    assert defence_table.compare_to_undefended(table, protocol="pure")[0]["asr"] == 0.2
    assert defence_table.compare_to_undefended(table, max_acc_drop=0.2)[1]["rank"] == 1
    with pytest.raises(ValueError, match="unknown protocol 'batch'"):
        defence_table.compare_to_undefended(table, protocol="batch")


def test_compare_to_undefended_breaks_an_asr_tie_by_the_higher_acc() -> None:
    table = [
        _summary_row("badnets", "none", 0.90, 0.99),
        _summary_row("badnets", "ft", 0.88, 0.10),  # listed first, but less accurate
        _summary_row("badnets", "nad", 0.89, 0.10),  # the same ASR, one ACC point more: first
        _summary_row("badnets", "ss", 0.90, 0.20),
    ]
    out = defence_table.compare_to_undefended(table)
    assert [(e["defense"], e["rank"]) for e in out] == [("ft", 2), ("nad", 1), ("ss", 3)]


def test_defence_table_refuses_a_repeated_seed_or_defence(monkeypatch: pytest.MonkeyPatch) -> None:
    # it counted seed 0 twice: n = 2 and a std of 0 from one run
    monkeypatch.setattr(runs, "run_grid", _fake_grid([]))
    monkeypatch.setattr(defence_table, "detector_reports", _fake_reports([]))
    with pytest.raises(ValueError, match=r"seeds=\[0, 1, 0\] repeat \[0\]; give each once"):
        defence_table.run("ci", progress=False, seeds=[0, 1, 0])
    with pytest.raises(ValueError, match=r"defenses=\['none', 'none'\] repeat \['none'\]"):
        defence_table.run("ci", progress=False, defenses=["none", "none"])
