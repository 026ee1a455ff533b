"""The experiments layer: configs, records, the three protocols, the on-disk cache, the CLI."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

import eglib.defenses.ft as ft_module
import eglib.experiments as experiments
from eglib.__main__ import _parse_params, main
from eglib.config import PROFILES, Profile
from eglib.defenses.base import recorded_params
from eglib.experiments import (
    TRAIN_LOCK,
    ExperimentConfig,
    ExperimentResult,
    check_config,
    is_cached,
    prepare_data,
    record_row,
    run_dir,
    run_experiment,
    stale_attack_params,
    stale_defense_params,
)
from eglib.guard import EigenGuard
from eglib.io import file_digest, write_json_atomic
from eglib.models import make_model
from eglib.poison import make_attack
from eglib.poison.badnets import BadNets
from eglib.train import TrainSettings, train_model

TINY: dict[str, Any] = dict(epochs=1, batch_size=32, train_size=None, test_size=None, lr=0.05)


def test_config_is_hashable_order_free_and_round_trips() -> None:
    a = ExperimentConfig(defense_params={"k": 4, "rule": "kth"}, **TINY)
    b = ExperimentConfig(defense_params={"rule": "kth", "k": 4}, **TINY)
    assert a == b and a.key() == b.key() and hash(a) == hash(b)
    assert ExperimentConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert a.replace(seed=1).key() != a.key()


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"poison_rate": 0.0}, "poison_rate"),
        ({"clean_reserve": 0.6}, "clean_reserve"),
        ({"batch_size": 1}, "batch_size"),
    ],
)
def test_config_rejects_bad_values(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ExperimentConfig(**{**TINY, **bad})


def test_track_steps_keep_earlier_keys_and_are_checked() -> None:
    """`track_steps` came after runs were cached: at its default it stays out of the key."""
    assert ExperimentConfig(**TINY).key() == "3cc9911764e86fbd"  # the key before the field
    sig = ExperimentConfig.from_profile("full", attack="sig", poison_rate=0.05)
    assert sig.key() == "ff7d5f04337444db"  # as in figures/full/sig_seeds012
    probed = ExperimentConfig(track_steps=[0, 5], **TINY)
    assert probed.track_steps == (0, 5) and probed.key() != ExperimentConfig(**TINY).key()
    assert ExperimentConfig.from_dict(json.loads(json.dumps(probed.to_dict()))) == probed
    for bad in ([5, 0], [1, 1], [-1], [1.0], [True], "12"):
        with pytest.raises(ValueError, match="track_steps="):
            ExperimentConfig(track_steps=bad, **TINY)


def test_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown config keys \\['colour'\\]"):
        ExperimentConfig.from_dict({"colour": "red"})


def test_list_parameters_freeze_and_equal_configs_share_a_key() -> None:
    """A grid file or a record gives tuple parameters as lists: they froze as lists, so the
    config could not be hashed (sweeps died in a set). Equality follows the cache key, so
    two configs are one run exactly when they share a folder."""
    listed = ExperimentConfig(attack_params={"color": [255], "location": [0, 0]}, **TINY)
    tupled = ExperimentConfig(attack_params={"color": (255,), "location": (0, 0)}, **TINY)
    assert hash(listed) == hash(tupled) and listed == tupled and listed.key() == tupled.key()
    assert ExperimentConfig.from_dict(json.loads(json.dumps(tupled.to_dict()))) == tupled
    with pytest.raises(ValueError, match="parameter trigger=.*not hashable"):
        ExperimentConfig(attack_params={"trigger": {"size": 3}}, **TINY)
    assert (
        ExperimentConfig(**{**TINY, "lr": 1}).key() == ExperimentConfig(**{**TINY, "lr": 1.0}).key()
    )
    ints = ExperimentConfig(defense_params={"tail_scale": 1}, **TINY)
    floats = ExperimentConfig(defense_params={"tail_scale": 1.0}, **TINY)
    assert ints.key() != floats.key() and ints != floats and len({ints, floats}) == 2


def test_data_size_errors_name_the_field(tiny_fashion) -> None:
    with pytest.raises(ValueError, match="test_size=20000; must be None or in"):
        prepare_data(ExperimentConfig(**{**TINY, "test_size": 20000}))


def test_from_profile_sizes_and_overrides() -> None:
    cfg = ExperimentConfig.from_profile("ci", attack="blend")
    assert (cfg.train_size, cfg.epochs) == (PROFILES["ci"].train_size, PROFILES["ci"].epochs)
    assert cfg.attack == "blend"


def test_prepare_data_splits_reserve_and_poisons_only_training(tiny_fashion) -> None:
    cfg = ExperimentConfig(clean_reserve=0.1, poison_rate=0.1, **TINY)
    data = prepare_data(cfg)
    assert len(data.reserve_labels) == 40 and len(data.train_labels) == 360
    assert data.poisoned is not None and len(data.poisoned.poison_idx) == 36
    assert torch.all(data.train_labels[data.poisoned.poison_idx] == cfg.target)
    assert data.triggered is not None and torch.all(data.triggered.source_labels != cfg.target)


def test_prepare_data_rejects_a_target_outside_the_classes(tiny_fashion) -> None:
    with pytest.raises(ValueError, match="target=12"):
        prepare_data(ExperimentConfig(target=12, **TINY))


def test_a_record_names_the_device_the_run_used(tiny_fashion, tmp_cache, monkeypatch) -> None:
    """It named the default device (`EGLIB_DEVICE` or cuda when present) whatever `device`
    the run was given; a CUDA default on a machine without it crashed after training."""
    monkeypatch.setattr("eglib.io.default_device", lambda: torch.device("meta"))
    record = run_experiment(ExperimentConfig(**TINY), device="cpu", progress=False).record
    assert record["environment"]["device"] == "cpu"


def test_run_records_protocols_and_is_cached(tiny_fashion, tmp_cache, monkeypatch) -> None:
    cfg = ExperimentConfig(defense="eigenguard", defense_params={"k": 2}, **TINY)
    first = run_experiment(cfg, progress=False)
    record = first.record
    json.dumps(record)
    assert set(record["metrics"]["protocols"]) == {"per_sample", "mixed", "pure"}
    assert record["metrics"]["eval_batch_size"] == 256  # mixed / pure batches, recorded
    assert record["key"] == cfg.key() and (run_dir(cfg) / "record.json").exists()
    assert not (run_dir(cfg) / "checkpoint.pt").exists()
    row = record_row(record)
    assert {"acc_per_sample", "asr_mixed", "asr_pure", "defense.k"} <= set(row)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run must not train again")

    monkeypatch.setattr(experiments, "train_model", no_training)
    again = run_experiment(cfg, progress=False)
    assert again.record == record
    assert "layer1" in again.model.guards
    x = first.data.test_images[:8].float() / 255
    assert torch.allclose(again.model(x), first.model(x), atol=1e-5)


def test_track_steps_record_probes_in_the_history(tiny_fashion, tmp_cache) -> None:
    cfg = ExperimentConfig(**{**TINY, "track_stages": ("layer1",), "track_steps": (0, 1, 2)})
    history = run_experiment(cfg, progress=False).record["history"]
    probes = history[0]["probes"]
    assert [p["step"] for p in probes] == [0, 1, 2]
    for row in [*probes, history[0]]:
        assert {"acc", "asr", "erank_diff/layer1", "erank_centred_clean/layer1"} <= set(row)
    assert probes[0]["epoch"] == 0.0 and 0 < probes[2]["epoch"] < 1 == history[0]["epoch"]


def test_a_run_cached_under_other_defence_defaults_is_retrained(
    tiny_fashion, tmp_cache, monkeypatch
) -> None:
    """A config names only the parameters it sets, so a changed default keeps its key: the
    record's resolved parameters tell the stale run, which is retrained, not served."""
    cfg = ExperimentConfig(defense="eigenguard", defense_params={"k": 2}, **TINY)
    record = run_experiment(cfg, progress=False).record
    assert is_cached(cfg) and stale_defense_params(cfg, record) == {}
    name = next(n for n in record["defense"]["params"] if n != "k")
    current = record["defense"]["params"][name]
    record["defense"]["params"][name] = "an old default"
    write_json_atomic(run_dir(cfg) / "record.json", record)
    assert stale_defense_params(cfg, record) == {name: ("an old default", current)}
    with pytest.warns(UserWarning, match=f"{name}.*an old default"):
        assert not is_cached(cfg)

    trained: list[int] = []
    train = experiments.train_model
    monkeypatch.setattr(
        experiments, "train_model", lambda *a, **kw: trained.append(1) or train(*a, **kw)
    )
    with pytest.warns(UserWarning, match="will be retrained"):
        again = run_experiment(cfg, progress=False)
    assert trained and again.record["defense"]["params"][name] == current
    assert is_cached(cfg)


def test_a_changed_guard_default_makes_an_eigenguard_record_stale(monkeypatch) -> None:
    """A config naming only k records every guard parameter, so a changed guard default (here
    tail_scale) tells the cached run apart; recording only the named ones could not."""
    cfg = ExperimentConfig(defense="eigenguard", defense_params={"k": 4}, **TINY)
    record = {"defense": {"params": recorded_params("eigenguard", {"k": 4})}}
    guard = EigenGuard(k=4)
    assert record["defense"]["params"] == {
        "at": None,
        "k": 4,
        **{
            name: getattr(guard, name)
            for name in ("rule", "top_scale", "tail_scale", "eval_mode", "momentum", "eps")
        },
    }
    assert stale_defense_params(cfg, record) == {}
    defaults = list(EigenGuard.__init__.__defaults__)
    defaults[2] = 0.001  # tail_scale
    monkeypatch.setattr(EigenGuard.__init__, "__defaults__", tuple(defaults))
    assert stale_defense_params(cfg, record) == {"tail_scale": (1.0, 0.001)}


def test_a_changed_attack_default_makes_a_record_stale(monkeypatch) -> None:
    """The table's configs name no attack parameters, so the key cannot tell a run poisoned
    under an old default (here BadNets' patch size); the record's poison parameters do."""
    cfg = ExperimentConfig(**TINY)  # BadNets with its defaults
    attack = make_attack("badnets", target=cfg.target, num_classes=10)
    record = {"poison": {"params": json.loads(json.dumps(attack.params()))}}
    assert stale_attack_params(cfg, record) == {}
    monkeypatch.setitem(BadNets.__init__.__kwdefaults__, "size", attack.size + 1)
    monkeypatch.setattr(experiments, "_RESOLVED_ATTACKS", {})
    assert stale_attack_params(cfg, record) == {"size": (attack.size, attack.size + 1)}


def _write_record_only(cfg: ExperimentConfig) -> BadNets:
    """Cache a record of `cfg` (a BadNets run under the current defaults) without its model, as
    records copied from another machine without the weights are; returns the attack."""
    attack = BadNets(target=cfg.target, num_classes=10)
    record = {
        "key": cfg.key(),
        "config": cfg.to_dict(),
        "poison": {"params": json.loads(json.dumps(attack.params()))},
    }
    write_json_atomic(run_dir(cfg) / "record.json", record)
    return attack


def test_a_stale_cached_run_is_not_served_and_a_dropped_parameter_counts(
    tmp_cache, monkeypatch
) -> None:
    """is_cached (what a run or sweep asks) must apply the attack check, not only the
    defence's; and a parameter the defence no longer has makes its record stale too."""
    cfg = ExperimentConfig(**TINY)
    attack = _write_record_only(cfg)
    assert is_cached(cfg)
    monkeypatch.setitem(BadNets.__init__.__kwdefaults__, "size", attack.size + 1)
    monkeypatch.setattr(experiments, "_RESOLVED_ATTACKS", {})
    with pytest.warns(UserWarning, match="other attack parameters"):
        assert not is_cached(cfg)
    ft = cfg.replace(defense="ft")
    params = {**recorded_params("ft"), "dropped": 1}
    assert stale_defense_params(ft, {"defense": {"params": params}}) == {"dropped": (1, None)}
    # FT must not repair an undefended model poisoned under the old default either
    (run_dir(cfg) / "model.pt").write_bytes(b"not a state dict: must never be loaded")
    with pytest.warns(UserWarning, match="other attack parameters"):
        assert experiments.cached_undefended(ft) is None


def test_a_record_without_its_model_is_tabulated_but_never_loaded(
    tiny_fashion, tmp_cache, monkeypatch
) -> None:
    """A record copied without model.pt counts as cached (its metrics are tabulated), but a
    run or a defence needing the model retrains it instead of failing to load the weights."""
    cfg = ExperimentConfig(**TINY)
    _write_record_only(cfg)
    assert is_cached(cfg) and not (run_dir(cfg) / "model.pt").exists()
    assert experiments.cached_undefended(cfg.replace(defense="ft")) is None
    retrained: list[ExperimentConfig] = []

    def fake_train_run(cfg: ExperimentConfig, *args: Any, **kwargs: Any) -> str:
        retrained.append(cfg)
        return "trained"

    monkeypatch.setattr(experiments, "_train_run", fake_train_run)
    assert run_experiment(cfg, progress=False) == "trained" and retrained == [cfg]


def test_cli_parameters_read_json_and_python_constants() -> None:
    """dithering=False was the text 'False' (truthy, refused now): Python's spellings of the
    constants parse as JSON's do."""
    parsed = _parse_params(["a=False", "b=true", "c=None", "d=2.5", "e=[1, 2]", "f=corner"])
    assert parsed == {"a": False, "b": True, "c": None, "d": 2.5, "e": [1, 2], "f": "corner"}
    assert parsed["a"] is False and parsed["c"] is None


def test_cli_train_prints_a_row(tiny_fashion, tmp_cache, capsys, monkeypatch) -> None:
    tiny = Profile("tiny", train_size=300, test_size=100, epochs=1, batch_size=32, seeds=(0,))
    monkeypatch.setitem(PROFILES, "tiny", tiny)
    main(
        [
            "train",
            "--profile",
            "tiny",
            "--defense",
            "eigenguard",
            "--defense-param",
            "k=2",
            "--attack-param",
            "size=4",
            "--augment",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    row = json.loads(out[-1])
    assert row["defense"] == "eigenguard" and row["defense.k"] == 2 and row["attack.size"] == 4
    assert row["augment"] is True
    assert 0.0 <= row["asr_pure"] <= 1.0


def test_runs_do_not_depend_on_the_global_random_state(tiny_fashion, tmp_cache) -> None:
    cfg = ExperimentConfig(**TINY)
    torch.manual_seed(123)
    first = run_experiment(cfg, cache=False, progress=False)
    torch.manual_seed(456)
    torch.rand(17)
    second = run_experiment(cfg, cache=False, progress=False)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    assert first.record["metrics"] == second.record["metrics"]


def test_post_training_defence_repairs_the_cached_undefended_model(
    tiny_fashion, tmp_cache, monkeypatch
) -> None:
    """FT after a cached 'none' run fine-tunes that very model (no second poisoned training);
    without one it trains the poisoned model itself, the same way."""
    base = ExperimentConfig(clean_reserve=0.1, **TINY)
    ft = base.replace(defense="ft", defense_params={"epochs": 1})
    alone = run_experiment(ft, cache=False, progress=False)  # no cache: trains, reuses nothing
    assert alone.record["poisoned_model_from"] is None
    undefended = run_experiment(base, progress=False)
    assert undefended.record["poisoned_model_from"] is None

    starts: list[dict[str, torch.Tensor]] = []
    real_fine_tune = ft_module.fine_tune

    def spy(ctx, model, settings, defense):  # the model FT is about to fine-tune
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_fine_tune(ctx, model, settings, defense)

    def no_training(*args, **kwargs):
        raise AssertionError("the poisoned model is cached; it must not be trained again")

    monkeypatch.setattr(ft_module, "fine_tune", spy)
    monkeypatch.setattr(experiments, "train_model", no_training)
    record = run_experiment(ft, progress=False).record
    assert record["poisoned_model_from"] == base.key()
    for name, tensor in undefended.model.state_dict().items():
        assert torch.equal(starts[0][name], tensor), name
    poisoned_rows = [r for r in record["history"] if r.get("phase") == "poisoned"]
    assert [r["loss"] for r in poisoned_rows] == [r["loss"] for r in undefended.record["history"]]
    # the same training either way: FT without the cache started from an identical model
    assert [r["loss"] for r in alone.record["history"] if r.get("phase") == "poisoned"] == [
        r["loss"] for r in poisoned_rows
    ]


def _while_trained_elsewhere(cfg: ExperimentConfig, finished: Path, call: Callable[[], Any]) -> Any:
    """`call()` in a thread while this test holds `cfg`'s run lock, as a process training
    `cfg` would; once the thread says it waits, 'finish' that training (copy the run files of
    `finished` in), release the lock and return what `call` returned."""
    folder = run_dir(cfg)
    folder.mkdir(parents=True)
    lock = FileLock(folder / TRAIN_LOCK)
    lock.acquire()
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(result=call()), daemon=True)
    with pytest.warns(UserWarning, match="being loaded or trained by another process") as caught:
        thread.start()
        deadline = time.monotonic() + 30
        while not any("another process" in str(w.message) for w in caught):
            assert thread.is_alive() and time.monotonic() < deadline, "did not wait for the lock"
            time.sleep(0.05)
        for path in finished.iterdir():
            shutil.copy(path, folder / path.name)
        lock.release()
        thread.join(timeout=60)
    return out["result"]


def _trained_then_moved_aside(cfg: ExperimentConfig, aside: Path) -> ExperimentResult:
    """Train `cfg`, then move its run folder to `aside`: the run another process will finish."""
    result = run_experiment(cfg, progress=False)
    shutil.move(run_dir(cfg), aside)
    return result


def test_a_run_being_trained_by_another_process_is_waited_for_then_loaded(
    tiny_fashion, tmp_cache, tmp_path, monkeypatch
) -> None:
    """Two processes asked for one uncached run: the second waits on the run's lock and loads
    what the first trained, instead of training it again and overwriting its record."""
    cfg = ExperimentConfig(**TINY)
    first = _trained_then_moved_aside(cfg, tmp_path / "finished")

    def no_training(*args, **kwargs):
        raise AssertionError("the run was being trained elsewhere; it must be loaded")

    monkeypatch.setattr(experiments, "train_model", no_training)
    second = _while_trained_elsewhere(
        cfg, tmp_path / "finished", lambda: run_experiment(cfg, progress=False)
    )
    assert second.record == first.record


def test_a_defence_waits_for_its_undefended_run_being_trained_elsewhere(
    tiny_fashion, tmp_cache, tmp_path
) -> None:
    """FT asked for while another process trains its undefended run starts from that run,
    once finished, instead of training a poisoned model of its own."""
    base = ExperimentConfig(clean_reserve=0.1, **TINY)
    _trained_then_moved_aside(base, tmp_path / "finished")
    ft = base.replace(defense="ft", defense_params={"epochs": 1})
    record = _while_trained_elsewhere(
        base, tmp_path / "finished", lambda: run_experiment(ft, progress=False)
    ).record
    assert record["poisoned_model_from"] == base.key()


def test_a_repair_of_an_undefended_run_retrained_since_is_not_served(
    tiny_fashion, tmp_cache
) -> None:
    """FT's record names the undefended model it repaired by digest: once that run is
    retrained (another digest), the repair is stale. Records from before digests still load."""
    base = ExperimentConfig(clean_reserve=0.1, **TINY)
    ft = base.replace(defense="ft", defense_params={"epochs": 1})
    undefended = run_experiment(base, progress=False).record
    repaired = run_experiment(ft, progress=False).record
    assert undefended["model_digest"] == file_digest(run_dir(base) / "model.pt")
    assert repaired["poisoned_model_digest"] == undefended["model_digest"]
    assert is_cached(ft)
    write_json_atomic(run_dir(base) / "record.json", {**undefended, "model_digest": "f" * 16})
    with pytest.warns(UserWarning, match=f"undefended run {base.key()}, which was retrained"):
        assert not is_cached(ft)
    legacy = {k: v for k, v in undefended.items() if k != "model_digest"}
    write_json_atomic(run_dir(base) / "record.json", legacy)
    old_ft = {k: v for k, v in repaired.items() if k != "poisoned_model_digest"}
    write_json_atomic(run_dir(ft) / "record.json", old_ft)
    assert is_cached(ft)


def test_a_checkpoint_left_by_another_phase_is_discarded_not_fatal(tiny_fashion, tmp_cache) -> None:
    """A data filter's first attempt checkpointed its poisoned-model training; once the
    undefended run is cached, the first training of the retry is the retrain on the kept
    data, which must not die on (or resume) the other phase's checkpoint."""
    base = ExperimentConfig(**TINY)
    ss = base.replace(defense="ss")
    folder = run_dir(ss)
    folder.mkdir(parents=True)

    class Stop:
        def on_epoch_end(self, model, epoch, row) -> None:
            if epoch == 2:  # after epoch 1 was checkpointed
                raise KeyboardInterrupt

    data = prepare_data(base)
    with pytest.raises(KeyboardInterrupt):
        train_model(
            make_model("cnn-small", 10, 1),
            data.train_images,
            data.train_labels,
            TrainSettings(epochs=3, batch_size=32),
            seed=0,
            progress=False,
            checkpoint_path=folder / "checkpoint.pt",
            callbacks=[Stop()],
        )
    run_experiment(base, progress=False)
    with pytest.warns(UserWarning, match="discarding it and training from the start"):
        record = run_experiment(ss, progress=False).record
    assert record["poisoned_model_from"] == base.key()
    assert not (folder / "checkpoint.pt").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"defense": "eigenguard", "defense_params": {"at": "layer9", "k": 4}}, "at=.layer9."),
        ({"track_stages": ("layer9",)}, r"track_stages \['layer9'\]"),
        ({"defense": "ss", "defense_params": {"layer": "layer9"}}, "layer='layer9'"),
        ({"defense": "nad", "defense_params": {"layers": ["stem", "x", "y"]}}, "layers="),
        ({"defense": "ft", "clean_reserve": 0.0}, "clean_reserve=0 with defense='ft'"),
        ({"attack": None, "poison_rate": 0.05}, "poison_rate=0.05 with attack=None"),
        ({"attack": None, "target": 3}, "target=3 with attack=None"),
    ],
)
def test_check_config_refuses_what_would_fail_after_loading_or_training(
    change: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        check_config(ExperimentConfig(**{**TINY, **change}))


def test_check_config_tells_a_bool_from_an_int_after_seeing_the_int() -> None:
    """The memo of checked attack parameters keyed True and 1 alike (a Python dict does), so
    size=True passed once size=1 had been checked."""
    check_config(ExperimentConfig(attack_params={"size": 1}, **TINY))
    with pytest.raises(ValueError, match="size=True"):
        check_config(ExperimentConfig(attack_params={"size": True}, **TINY))
