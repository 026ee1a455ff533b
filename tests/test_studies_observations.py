"""Tests for the observation studies (rank_vs_asr, spectra), their metrics and make_figures,
on synthetic features and monkeypatched runs: no real training."""

from __future__ import annotations

import csv
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from eglib import studies
from eglib.config import get_profile
from eglib.experiments import ExperimentData
from eglib.models import make_model
from eglib.poison import backdoor_testset, make_attack
from eglib.spectral import top_right_basis
from eglib.studies import StudyResult, centring, make_figures, rank_vs_asr, spectra
from eglib.studies.defence_table import table_config
from eglib.studies.metrics import (
    energy_fraction,
    neighbour_agreement,
    pairwise_distances,
    random_basis,
    silhouette,
)

CNN_STAGES = ("stem", "layer1", "layer2", "layer3")


def _orthonormal(dim: int, k: int, seed: int) -> torch.Tensor:
    return random_basis(dim, k, seed=seed)


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def test_energy_fraction_planted_direction_vs_random_baseline() -> None:
    dim, k = 400, 10
    g = torch.Generator().manual_seed(1)
    u = torch.randn(dim, generator=g, dtype=torch.float64)
    u /= u.norm()
    natural = torch.randn(200, dim, generator=g, dtype=torch.float64)
    mixed = natural.clone()
    mixed[:20] += 30 * u  # 10 % carry a strong trigger direction
    diff = 30 * u.expand(50, dim) + 0.01 * torch.randn(50, dim, generator=g, dtype=torch.float64)
    assert energy_fraction(diff, top_right_basis(mixed, k)) > 0.95
    assert energy_fraction(diff, top_right_basis(natural, k)) < 0.2  # clean top-k: no trigger
    randoms = [energy_fraction(diff, random_basis(dim, k, seed=s)) for s in range(30)]
    assert sum(randoms) / len(randoms) == pytest.approx(k / dim, rel=0.3)
    assert energy_fraction(diff, random_basis(dim, k, seed=0)) == energy_fraction(
        diff, random_basis(dim, k, seed=0)
    )  # seeded
    with pytest.raises(ValueError, match="dimension 400"):
        energy_fraction(diff, random_basis(30, 3, seed=0))
    with pytest.raises(ValueError, match="all zero"):
        energy_fraction(torch.zeros(3, dim), random_basis(dim, k, seed=0))
    with pytest.raises(ValueError, match="k=0"):
        random_basis(dim, 0, seed=0)


def test_neighbour_agreement_and_silhouette() -> None:
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(100) % 2
    apart = torch.randn(100, 5, generator=g) + 20 * labels.unsqueeze(1)
    query = labels == 1
    dist = pairwise_distances(apart)
    assert dist.shape == (100, 100) and float(dist.diagonal().abs().max()) == 0.0
    assert float(dist[0, 1]) == pytest.approx(float((apart[0] - apart[1]).norm()), rel=1e-5)
    assert neighbour_agreement(dist, labels, query, n_neighbors=5) == 1.0
    assert silhouette(dist, labels) > 0.9
    # self is excluded: a lone labelled row among 3 others has no same-label neighbour
    line = pairwise_distances(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    lone = torch.tensor([1, 0, 0, 0])
    assert neighbour_agreement(line, lone, lone == 1, n_neighbors=1) == 0.0
    blob = pairwise_distances(torch.randn(400, 5, generator=g))
    rand = (torch.rand(400, generator=g) < 0.25).long()  # chance level about 0.25
    purity = neighbour_agreement(blob, rand, rand == 1, n_neighbors=10)
    assert 0.1 < purity < 0.4
    assert abs(silhouette(blob, rand)) < 0.1
    with pytest.raises(ValueError, match="n_neighbors=100"):
        neighbour_agreement(dist, labels, query, n_neighbors=100)
    with pytest.raises(ValueError, match="expected"):
        neighbour_agreement(dist[:5], labels, query)
    with pytest.raises(ValueError, match="two distinct"):
        silhouette(dist, torch.zeros(100, dtype=torch.long))


def _planted_features(n: int = 200, dim: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """5 classes on orthogonal directions; the trigger adds a strong direction orthogonal to all."""
    g = torch.Generator().manual_seed(seed)
    basis = _orthonormal(dim, 6, seed)
    classes = torch.arange(n) % 5
    clean = 2.0 * basis[:, classes].T + 0.2 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    triggered = clean + 8.0 * basis[:, 5]
    return {
        "clean": clean.float(),
        "triggered": triggered.float(),
        "classes": classes,
        "trigger": basis[:, 5],
    }


def test_stage_measures_on_planted_trigger() -> None:
    f = _planted_features()
    mask = spectra.mixed_mask(200, 0.1, seed=0)
    measures = spectra.stage_measures(f["clean"], f["triggered"], mask, f["classes"], k=1, seed=0)
    row, spec = measures.row, measures.spectra
    assert measures.top.shape == (200, 1) and measures.tail.shape == (200, 64)
    assert (row["rows"], row["poisoned_rows"], row["k"], row["dim"]) == (200, 20, 1, 64)
    assert set(spec) == {"clean", "triggered", "mixed", "diff"}
    assert all(len(s) == 64 for s in spec.values())  # min(rows, dim) values per group
    assert row["erank_diff"] < 1.01  # the difference is rank one
    assert row["erank_diff"] < row["erank_clean"]
    assert row["energy_top_mixed"] > 0.95  # the trigger is the top direction of the mixed batch
    assert row["energy_top_clean"] < 0.05  # but not of the clean one
    assert row["energy_chance"] == pytest.approx(1 / 64)
    assert row["energy_random"] < 0.2
    # top-k: triggered rows are each other's neighbours; tail: they sit among their classes
    assert row["knn_poison_top"] == 1.0
    assert row["knn_poison_tail"] < 0.4
    assert row["knn_poison_chance"] == pytest.approx(19 / 199)
    assert row["knn_source_tail"] > 0.9
    assert row["knn_source_top"] < 0.5
    assert row["silhouette_top"] > 0.8 > row["silhouette_tail"]


def test_mixed_mask_is_seeded_with_the_rate() -> None:
    mask = spectra.mixed_mask(200, 0.1, seed=3)
    assert mask.dtype == torch.bool and int(mask.sum()) == 20
    assert torch.equal(mask, spectra.mixed_mask(200, 0.1, seed=3))
    assert not torch.equal(mask, spectra.mixed_mask(200, 0.1, seed=4))
    assert int(spectra.mixed_mask(10, 0.01, seed=0).sum()) == 2  # at least two triggered rows
    with pytest.raises(ValueError, match="no clean row"):
        spectra.mixed_mask(2, 0.9, seed=0)


# ----------------------------------------------------------------------------------------------
# rank_vs_asr rows and configs
# ----------------------------------------------------------------------------------------------


def _history(epochs: int = 2, stages: tuple[str, ...] = CNN_STAGES) -> list[dict[str, Any]]:
    rows = []
    for epoch in range(1, epochs + 1):
        row: dict[str, Any] = {
            "epoch": epoch,
            "loss": 1.0 / epoch,
            "train_acc": 0.5,
            "lr": 0.1,
            "seconds": 1.0,
            "acc": 0.6 + 0.1 * epoch,
            "asr": 0.4 * epoch,
            "rank_samples": 256.0,
        }
        for stage in stages:
            for group in ("clean", "triggered", "diff"):
                row[f"erank_{group}/{stage}"] = 50.0 - epoch
                row[f"srank_{group}/{stage}"] = 3.0
        rows.append(row)
    return rows


def test_history_rows_keep_rank_columns_only() -> None:
    rows = rank_vs_asr.history_rows("badnets", _history())
    assert len(rows) == 2
    first = rows[0]
    assert (first["attack"], first["epoch"], first["acc"], first["asr"]) == ("badnets", 1, 0.7, 0.4)
    assert first["rank_samples"] == 256.0
    assert first["erank_diff/layer2"] == 49.0 and first["srank_clean/stem"] == 3.0
    assert "train_acc" not in first and "lr" not in first
    assert sum(k.startswith(("erank_", "srank_")) for k in first) == 2 * 3 * len(CNN_STAGES)
    with pytest.raises(ValueError, match=r"lacks \['asr'\]"):
        rank_vs_asr.history_rows("badnets", [{"epoch": 1, "acc": 0.5}])


def test_history_rows_put_each_epochs_probes_before_it() -> None:
    history = _history(2)
    for row, steps in zip(history, ([0, 4], [12]), strict=True):
        row["step"] = 10 * row["epoch"]
        row["probes"] = [
            {"step": s, "epoch": s / 10, "acc": 0.1, "asr": 0.2, "erank_diff/stem": 7.0}
            for s in steps
        ]
    rows = rank_vs_asr.history_rows("blend", history)
    assert [(r["step"], r["epoch"]) for r in rows] == [
        (0, 0),
        (4, 0.4),
        (10, 1),
        (12, 1.2),
        (20, 2),
    ]
    assert rows[1]["loss"] is None and rows[1]["erank_diff/stem"] == 7.0
    assert "probes" not in rows[2]
    assert all(r["step"] is None for r in rank_vs_asr.history_rows("blend", _history(2)))


def test_config_tracks_every_stage_and_is_shared_with_spectra() -> None:
    cfg = rank_vs_asr.config_for("blend", "ci")
    assert cfg.track_stages == CNN_STAGES
    # 3800 images after the reserve, 64 a batch: 59 steps; probes at eighths of it, from 0
    assert cfg.track_steps == (0, 3, 7, 14, 22, 29, 36, 44, 51)
    assert rank_vs_asr.probe_steps("full") == (0, 27, 55, 111, 166, 222, 278, 333, 389)
    assert (cfg.model, cfg.attack, cfg.poison_rate) == ("cnn-small", "blend", 0.1)
    assert (cfg.epochs, cfg.train_size) == (get_profile("ci").epochs, get_profile("ci").train_size)
    assert rank_vs_asr.ATTACKS["full"][:2] == spectra.ATTACKS  # spectra reuses those models


def test_a_clean_label_attack_poisons_at_the_clean_label_rate() -> None:
    """SIG poisons only target-class images: at 10 % of the set it poisoned nearly all of them
    (and failed on seeds whose clean reserve left the class short), so it runs at 5 %, the
    defence table's rate."""
    for attack in rank_vs_asr.ATTACKS["full"]:
        cfg = rank_vs_asr.config_for(attack, "full")
        assert cfg.poison_rate == table_config("full", attack, "none", 0).poison_rate
    assert rank_vs_asr.config_for("sig", "full").poison_rate == 0.05


def test_rank_vs_asr_run_and_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def fake_run(cfg: Any, progress: bool = True) -> Any:
        seen.append(cfg)
        return SimpleNamespace(record={"history": _history(3)})

    monkeypatch.setattr(rank_vs_asr, "run_experiment", fake_run)
    result = rank_vs_asr.run("ci", progress=False)
    assert [c.attack for c in seen] == ["badnets", "blend"]
    assert len(result.rows) == 2 * 3
    assert result.notes["rank_samples_per_group"] == [256]
    figs = rank_vs_asr.figures(result)
    assert set(figs) == {"", "stable"}
    assert len(figs[""].axes) == 2 * 2 * len(CNN_STAGES)  # panels + twins

    seen.clear()
    seeded = rank_vs_asr.run("ci", progress=False, attacks=["blend"], seeds=[1, 2])
    assert [(c.attack, c.seed) for c in seen] == [("blend", 1), ("blend", 2)]
    assert seeded.seeds == (1, 2) and [r["seed"] for r in seeded.rows] == [1, 1, 1, 2, 2, 2]
    assert set(seeded.data["records"]) == {"blend/seed1", "blend/seed2"}
    with pytest.raises(ValueError, match="seeds=\\[\\]"):
        rank_vs_asr.run("ci", progress=False, seeds=[])


# ----------------------------------------------------------------------------------------------
# spectra run on a tiny untrained model + make_figures writing PNG, CSV and JSON
# ----------------------------------------------------------------------------------------------


def _fake_spectra_result(cfg: Any, progress: bool = True) -> Any:
    """An untrained cnn-small and 70 synthetic 16 px test images with a BadNets test set."""
    torch.manual_seed(0)
    model = make_model("cnn-small", 10, 1).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (70, 1, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.arange(70) % 10
    triggered = backdoor_testset(images, labels, make_attack(cfg.attack, target=0), seed=0)
    empty = torch.empty(0)
    data = ExperimentData(None, empty, empty, empty, empty, images, labels, triggered)
    record = {"metrics": {"acc": 0.1, "asr": 0.2}, "history": _history(1)}
    return SimpleNamespace(model=model, data=data, record=record)


def test_spectra_run_rows_and_records(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spectra, "run_experiment", _fake_spectra_result)
    result = spectra.run("ci", progress=False, attacks=("badnets",), k=4)
    assert [r["stage"] for r in result.rows] == list(CNN_STAGES)
    row = result.rows[0]
    assert row["rows"] == 63 and row["poisoned_rows"] == 6  # the 63 non-target images, 10 %
    for column in ("energy_top_mixed", "energy_random", "knn_poison_top", "silhouette_tail"):
        assert 0.0 <= abs(row[column]) <= 1.0
    assert len(result.data["spectra"]) == 4 * len(CNN_STAGES)
    assert {rec["rows"] for rec in result.data["spectra"]} == {63}  # equal counts
    tsne = result.data["tsne"]  # ci: the guard stage and the last one, top and tail
    assert [(r["stage"], r["space"]) for r in tsne] == [
        ("layer1", "top-4"),
        ("layer1", "tail"),
        ("layer3", "top-4"),
        ("layer3", "tail"),
    ]
    assert tsne[0]["xy"].shape == (63, 2) and int(tsne[0]["poisoned"].sum()) == 6


def test_spectra_run_measures_every_seed_and_draws_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[Any] = []

    def fake(cfg: Any, progress: bool = True) -> Any:
        seen.append(cfg)
        return _fake_spectra_result(cfg, progress)

    monkeypatch.setattr(spectra, "run_experiment", fake)
    result = spectra.run("ci", progress=False, attacks=("badnets",), seeds=[2, 1], k=4)
    assert [(c.attack, c.seed) for c in seen] == [("badnets", 2), ("badnets", 1)]
    assert seen[0].key() == rank_vs_asr.config_for("badnets", "ci", 2).key()
    assert result.seeds == (2, 1)
    assert [r["seed"] for r in result.rows] == [2] * len(CNN_STAGES) + [1] * len(CNN_STAGES)
    # the same model, other rows and mask: the seed picks the test images measured
    assert result.rows[0]["energy_top_mixed"] != result.rows[len(CNN_STAGES)]["energy_top_mixed"]
    assert len(result.data["spectra"]) == 4 * len(CNN_STAGES)  # the first seed's only
    assert result.notes["spectra_and_tsne_seed"] == 2
    assert [c["seed"] for c in result.notes["configs"]] == [2, 1]
    with pytest.raises(ValueError, match="seeds=\\[\\]"):
        spectra.run("ci", progress=False, seeds=[])


def test_make_figures_writes_png_csv_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(spectra, "run_experiment", _fake_spectra_result)
    monkeypatch.setattr(spectra, "ATTACKS", ("badnets",))
    monkeypatch.setitem(spectra.SETTINGS, "ci", spectra.SpectraSettings(40, ("layer1",)))
    written = make_figures("ci", tmp_path, only=["spectra"], progress=False)
    names = sorted(p.name for p in written["spectra"])
    assert names == [
        "spectra.csv",
        "spectra.json",
        "spectra.png",
        "spectra_separation.png",
        "spectra_tsne.png",
    ]
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
    with open(tmp_path / "spectra.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == list(CNN_STAGES) and rows[0]["rows"] == "40"
    meta = json.loads((tmp_path / "spectra.json").read_text())
    assert (
        meta["command"] == f"python -m eglib figures --profile ci --only spectra --out {tmp_path}"
    )
    assert meta["profile"] == "ci" and meta["seeds"] == [0]
    assert meta["notes"]["rows_per_group"] == 40
    with pytest.raises(ValueError, match="unknown study 'nope'; allowed: "):
        make_figures("ci", tmp_path, only=["nope"])
    assert {"rank_vs_asr", "spectra"} <= set(studies.STUDIES)


def test_every_profile_has_observation_settings() -> None:
    from eglib.config import PROFILES
    from eglib.studies import rank_vs_asr, spectra

    assert set(rank_vs_asr.ATTACKS) == set(PROFILES)
    assert set(spectra.SETTINGS) == set(PROFILES)


def _fake_subset_study() -> SimpleNamespace:
    """A study whose `run` takes a subset option, as the defence table does."""

    def run(
        profile: str | None = None,
        *,
        progress: bool = True,
        jobs: int | None = None,
        attacks: Sequence[str] | None = None,
        grid: str | None = None,
        detection: bool = True,
        cached_only: bool = False,
    ) -> StudyResult:
        rows = [{"attack": a, "detection": detection} for a in attacks or ("badnets",)]
        return StudyResult(name="subset", profile=str(profile), rows=rows, seeds=(0,))

    return SimpleNamespace(run=run, figures=lambda result: {})


def test_make_figures_passes_jobs_to_the_studies_that_train_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`figures --jobs 3` (3 workers sharing a GPU): the studies that take `jobs` get it and
    their command records it; a study without it runs as before."""
    seen: list[Any] = []
    study = _fake_subset_study()
    fake_run = study.run
    study.run = lambda profile=None, *, progress=True, jobs=None, **kw: (
        seen.append(jobs) or fake_run(profile, progress=progress, **kw)
    )
    monkeypatch.setitem(studies.STUDIES, "subset", study)
    make_figures("ci", tmp_path, only=["subset"], progress=False, jobs=3)
    assert seen == [3]
    assert json.loads((tmp_path / "subset.json").read_text())["command"].endswith("--jobs 3")
    with pytest.raises(ValueError, match="jobs=0; must be >= 1"):
        make_figures("ci", tmp_path, only=["subset"], jobs=0)


def test_make_figures_passes_subset_options_and_records_the_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(studies.STUDIES, "subset", _fake_subset_study())
    options = {
        "attacks": ("badnets", "blend"),
        "grid": "lite",
        "detection": False,
        "cached_only": True,
    }
    make_figures("ci", tmp_path, only=["subset"], progress=False, options=options)
    with open(tmp_path / "subset.csv") as f:
        assert [r["attack"] for r in csv.DictReader(f)] == ["badnets", "blend"]
    meta = json.loads((tmp_path / "subset.json").read_text())
    assert meta["command"] == (
        f"python -m eglib figures --profile ci --only subset --out {tmp_path} "
        "--attacks badnets,blend --grid lite --no-detection --cached-only"  # a string stays whole
    )
    with pytest.raises(ValueError, match=r"options \['seeds'\] need exactly one study"):
        make_figures("ci", tmp_path, only=["subset"], options={"seeds": (0,)})
    with pytest.raises(ValueError, match="need exactly one study"):
        make_figures("ci", tmp_path, only=["subset", "spectra"], options={"attacks": ("a",)})


def test_make_figures_says_which_option_is_wrong(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--only defence_table --only ablations --seeds 0` said "'defence_table' takes []",
    though it takes seeds: the trouble was the second study."""
    with pytest.raises(ValueError, match="got 2 studies: defence_table, ablations$"):
        make_figures("ci", tmp_path, only=["defence_table", "ablations"], options={"seeds": (0,)})
    with pytest.raises(ValueError, match=f"got {len(studies.STUDIES)} studies: "):  # every one
        make_figures("ci", tmp_path, options={"seeds": (0,)})
    monkeypatch.setitem(studies.STUDIES, "subset", _fake_subset_study())
    with pytest.raises(
        ValueError,
        match=r"'subset' does not take \['seeds'\] \(it takes \['attacks', 'cached_only', "
        r"'detection', 'grid'\]\)$",
    ):
        make_figures("ci", tmp_path, only=["subset"], options={"seeds": (0,), "grid": "lite"})
    with pytest.raises(
        ValueError,
        match=r"'spectra' does not take \['defenses'\] \(it takes \['attacks', 'seeds'\]",
    ):
        make_figures("ci", tmp_path, only=["spectra"], options={"defenses": ("none",)})
    bare = SimpleNamespace(run=lambda profile=None, *, progress=True: None, figures=dict)
    monkeypatch.setitem(studies.STUDIES, "bare", bare)
    with pytest.raises(ValueError, match=r"'bare' does not take \['seeds'\] \(it takes none\)"):
        make_figures("ci", tmp_path, only=["bare"], options={"seeds": (0,)})


def test_cli_figures_parses_the_subset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(studies, "make_figures", lambda **kwargs: seen.update(kwargs))
    from eglib.__main__ import main

    main(
        [
            "figures",
            "--profile",
            "ci",
            "--only",
            "defence_table",
            "--out",
            str(tmp_path),
            "--attacks",
            "badnets, blend",
            "--seeds",
            "0,1",
            "--no-detection",
        ]
    )
    assert seen["out_dir"] == tmp_path and seen["only"] == ["defence_table"]
    assert seen["options"] == {"attacks": ("badnets", "blend"), "seeds": (0, 1), "detection": False}
    main(
        ["figures", "--profile", "full", "--only", "forced_dimension", "--seeds", "0"]
        + ["--grid", "lite"]
    )
    assert seen["options"] == {"seeds": (0,), "grid": "lite"}
    main(["figures", "--profile", "full", "--only", "defence_table", "--cached-only"])
    assert seen["options"] == {"cached_only": True}
    main(["figures", "--only", "ablations", "--ablations", "eval_mode,poison_rate"])
    assert seen["options"] == {"ablations": ("eval_mode", "poison_rate")}
    main(["figures", "--only", "ablations", "--ablations", "layer", "--include-slow"])
    assert seen["options"] == {"ablations": ("layer",), "include_slow": True}
    assert seen["jobs"] is None
    main(["figures", "--only", "ablations", "--jobs", "3"])
    assert seen["jobs"] == 3
    with pytest.raises(SystemExit):
        main(["figures", "--seeds", "0,x"])


def test_recorded_commands_parse_and_options_are_the_clis(tmp_path: Path) -> None:
    """spectra.run's `k` got through make_figures and crashed the command's writing after the
    run (no files); --no-include-slow and --detection were written, which the CLI lacks."""
    from eglib.__main__ import build_parser
    from eglib.studies import FIGURES_OPTIONS, figures_command

    with pytest.raises(ValueError, match=r"options \['k'\] need exactly one study"):
        make_figures("ci", tmp_path, only=["spectra"], options={"k": 5})
    for name, options in (
        ("ablations", {"include_slow": False, "ablations": ("layer",), "seeds": (0, 1)}),
        ("ablations", {"include_slow": True, "cached_only": True}),
        ("defence_table", {"detection": True, "attacks": ("badnets",)}),
        ("defence_table", {"detection": False, "cached_only": False}),
        ("forced_dimension", {"grid": "lite"}),
    ):
        command = figures_command("full", name, tmp_path / "out", options)
        args = build_parser().parse_args(shlex.split(command)[3:])  # after 'python -m eglib'
        assert args.only == [name], command
        assert "--no-include-slow" not in command and "--detection" not in command
    flags = {
        a.dest for a in build_parser()._subparsers._group_actions[0].choices["figures"]._actions
    }
    assert {o if o != "detection" else "no_detection" for o in FIGURES_OPTIONS} <= flags


def test_rank_vs_asr_keeps_the_centred_ranks_and_draws_them_when_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tracker records centred ranks beside the uncentred ones (a trigger that only
    shifts the mean lowers the uncentred rank): the study's rows keep them and, when the
    runs carry them, a 'centred' figure shows them; runs cached before carry none."""
    history = _history(3)
    for row in history:
        for stage in CNN_STAGES:
            for group in ("clean", "triggered", "diff"):
                row[f"erank_centred_{group}/{stage}"] = 60.0 + row["epoch"]
                row[f"srank_centred_{group}/{stage}"] = 30.0
    rows = rank_vs_asr.history_rows("badnets", history)
    assert rows[0]["erank_centred_diff/layer2"] == 61.0
    assert rows[0]["srank_centred_clean/stem"] == 30.0
    assert sum("_centred_" in k for k in rows[0]) == 2 * 3 * len(CNN_STAGES)

    for hist, want in ((history, {"", "stable", "centred"}), (_history(3), {"", "stable"})):
        monkeypatch.setattr(
            rank_vs_asr,
            "run_experiment",
            lambda cfg, progress=True, hist=hist: SimpleNamespace(record={"history": hist}),
        )
        result = rank_vs_asr.run("ci", progress=False)
        assert result.notes["centred_ranks"] is (want == {"", "stable", "centred"})
        assert "uncentred" in result.notes["centring"]
        figs = rank_vs_asr.figures(result)
        assert set(figs) == want
    result.rows[:] = rows
    centred = rank_vs_asr.figures(result)["centred"]
    line = centred.axes[0].get_lines()[0]  # clean f(x) of the first stage
    assert list(line.get_ydata()) == [61.0, 62.0, 63.0]
    assert "centred" in centred.axes[0].get_ylabel()


# ----------------------------------------------------------------------------------------------
# centring: observation 1 on trained models, both conventions
# ----------------------------------------------------------------------------------------------


def test_group_ranks_tell_a_mean_shift_from_a_low_rank_trigger() -> None:
    """A trigger that adds one vector to every row lowers the uncentred effective rank only;
    one that collapses the rows onto few directions lowers both."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(200, 300, generator=g, dtype=torch.float64)
    shifted = clean + 20 * torch.randn(300, generator=g, dtype=torch.float64)
    shift = centring.group_ranks(clean, shifted)
    assert shift["ratio_uncentred"] < 0.6 and shift["ratio_centred"] == pytest.approx(1.0)
    assert shift["erank_centred_diff"] == 0.0  # f(x+t) - f(x): one vector, no spread
    assert shift["diff_ratio_uncentred"] < 0.01 and shift["diff_ratio_centred"] == 0.0
    basis = random_basis(300, 3, seed=1)
    collapsed = clean @ basis @ basis.T  # the rows keep 3 of their 300 directions
    low = centring.group_ranks(clean, collapsed)
    assert low["ratio_uncentred"] < 0.1 and low["ratio_centred"] < 0.1
    with pytest.raises(ValueError, match="features of other shapes"):
        centring.group_ranks(clean, clean[:10])


def test_centring_run_measures_every_stage_and_draws(
    monkeypatch: pytest.MonkeyPatch, tmp_cache: Path
) -> None:
    monkeypatch.setattr(centring, "run_experiment", _fake_spectra_result)
    result = centring.run("ci", progress=False, attacks=("badnets", "blend"))
    assert [(r["attack"], r["stage"]) for r in result.rows] == [
        (a, s) for a in ("badnets", "blend") for s in CNN_STAGES
    ]
    assert {r["rows"] for r in result.rows} == {63}  # the non-target images, equal counts
    assert {"erank_clean", "erank_centred_triggered", "srank_centred_diff"} <= set(result.rows[0])
    figs = centring.figures(result)
    assert len(figs[""].axes) == 4  # (triggered, diff) / clean x (uncentred, centred)
    with pytest.raises(ValueError, match="no undefended .ci. table model is cached"):  # empty cache
        centring.run("ci", progress=False, cached_only=True)
