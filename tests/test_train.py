"""Tests for eglib.train: settings, validation, schedule, batching, determinism, resume."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from eglib.guard import insert_guard
from eglib.io import load_state, save_state_atomic
from eglib.models import make_model
from eglib.models.base import StagedNet, StageInfo
from eglib.train import (
    CheckpointMismatchError,
    TrainSettings,
    default_pad,
    min_train_batch,
    train_model,
)

SIZE = 16  # smallest side the models take: keeps every test to a few seconds on a CPU


def _model(num_classes: int = 2, seed: int = 0, guard_k: int | None = None) -> StagedNet:
    torch.manual_seed(seed)
    model = make_model("cnn-small", num_classes, in_channels=1)
    if guard_k is not None:
        insert_guard(model, k=guard_k)  # an EigenGuard at the default stage
    return model


def _halves(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable toy task: class 0 is bright on the left half, class 1 on the right."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randint(0, 80, (n, 1, SIZE, SIZE), generator=g, dtype=torch.uint8)
    left = labels == 0
    images[left, :, :, : SIZE // 2] += 150
    images[~left, :, :, SIZE // 2 :] += 150
    return images, labels


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_seconds(history: list[dict]) -> list[dict]:
    """The rows (and their probes' rows) without their timings."""
    return [
        {k: _without_seconds(v) if k == "probes" else v for k, v in row.items() if k != "seconds"}
        for row in history
    ]


QUICK = TrainSettings(epochs=2, batch_size=32, hflip=False)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("epochs", 0, "epochs=0"),
        ("batch_size", 0, "batch_size=0"),
        ("epochs", 1.5, "epochs=1.5"),
        ("lr", 0.0, "lr=0.0"),
        ("momentum", 1.0, "momentum=1.0"),
        ("weight_decay", -1e-4, "weight_decay=-0.0001"),
        ("pad", -1, "pad=-1"),
        ("label_smoothing", 1.0, "label_smoothing=1.0"),
        # not finite, or of the wrong type: named, never accepted or a bare TypeError
        ("lr", math.inf, "lr=inf; must be a finite number"),
        ("weight_decay", math.inf, "weight_decay=inf; must be a finite number"),
        ("lr", "0.1", "lr='0.1'"),
        ("momentum", None, "momentum=None"),
        ("label_smoothing", math.nan, "label_smoothing=nan"),
        ("batch_size", True, "batch_size=True"),
        # flags must be real bools: amp="no" is truthy and would turn bf16 autocast on
        ("amp", "no", "amp='no'; must be True or False"),
        ("augment", 0, "augment=0; must be True or False"),
        ("hflip", 1, "hflip=1"),
        ("nesterov", "yes", "nesterov='yes'"),
        ("channels_last", None, "channels_last=None"),
    ],
)
def test_settings_reject_bad_values(field: str, value: object, match: str) -> None:
    kwargs: dict = {"epochs": 1, "batch_size": 8, field: value}
    with pytest.raises(ValueError, match=match):
        TrainSettings(**kwargs)


def test_settings_nesterov_needs_momentum() -> None:
    with pytest.raises(ValueError, match="nesterov"):
        TrainSettings(epochs=1, batch_size=8, momentum=0.0)
    TrainSettings(epochs=1, batch_size=8, momentum=0.0, nesterov=False)  # fine


def test_default_pad() -> None:
    assert default_pad(32) == 4 and default_pad(28) == 2 and default_pad(64) == 8
    assert default_pad(16) == 1


def test_train_rejects_bad_data() -> None:
    images, labels = _halves(16)
    model = _model()
    bad_cases = [
        (images.float(), labels, "uint8"),
        (images[0], labels, "uint8"),
        (images, labels.int(), "int64"),
        (images, labels[:-1], "16 images but 15 labels"),
        (images, torch.where(labels == 1, 2, labels), "label 2 out of range"),
        (images, torch.where(labels == 1, -1, labels), "label -1 out of range"),
        (images.expand(-1, 3, -1, -1), labels, "3 channels"),
    ]
    for x, y, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            train_model(model, x, y, QUICK, seed=0, device="cpu", progress=False)


def test_training_learns_and_history_rows() -> None:
    images, labels = _halves(256)
    model = _model()
    settings = TrainSettings(epochs=3, batch_size=32, hflip=False)
    history = train_model(model, images, labels, settings, seed=0, device="cpu", progress=False)
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert set(history[0]) == {"epoch", "step", "loss", "train_acc", "lr", "seconds", "threads"}
    assert [row["step"] for row in history] == [8, 16, 24]
    assert history[0]["lr"] == pytest.approx(settings.lr)  # cosine starts at the peak
    assert history[2]["lr"] < history[1]["lr"] < history[0]["lr"]
    # 8 steps per epoch, 24 in all: epoch 2 starts at step 8 -> lr * (1 + cos(pi / 3)) / 2
    assert history[1]["lr"] == pytest.approx(settings.lr * 0.75)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["train_acc"] > 0.9
    assert not model.training  # ends in eval mode


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_seed_same_weights_and_global_rng_untouched(channels_last: bool) -> None:
    images, labels = _halves(96)
    settings = replace(QUICK, channels_last=channels_last)
    runs = []
    for _ in range(2):
        model = _model(seed=1)
        state = torch.get_rng_state()
        history = train_model(model, images, labels, settings, seed=7, device="cpu", progress=False)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append((_weights(model), _without_seconds(history)))
    assert _same_weights(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    other = _model(seed=1)
    train_model(other, images, labels, settings, seed=8, device="cpu", progress=False)
    assert not _same_weights(runs[0][0], _weights(other))


def test_progress_bar_shows_the_epoch_row(capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = _halves(64)
    settings = TrainSettings(epochs=1, batch_size=32)
    train_model(_model(), images, labels, settings, seed=0, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "2/2" in err and "train_acc=" in err and "loss=" in err


class _BatchRecorder(nn.Module):
    """A stand-in guard: identity that records its batch sizes (has `min_batch`)."""

    def __init__(self, min_batch: int) -> None:
        super().__init__()
        self.min_batch = min_batch
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.sizes.append(x.shape[0])
        return x


def test_last_batch_dropped_below_guard_min_batch() -> None:
    images, labels = _halves(20)
    model = _model()
    recorder = _BatchRecorder(min_batch=5)
    model.guards["layer1"] = recorder
    assert min_train_batch(model) == 5
    settings = TrainSettings(epochs=1, batch_size=8, augment=False)
    train_model(model, images, labels, settings, seed=0, device="cpu", progress=False)
    assert recorder.sizes == [8, 8]  # the last batch (4 < 5) is dropped
    recorder.min_batch = 4
    recorder.sizes.clear()
    train_model(model, images, labels, settings, seed=0, device="cpu", progress=False)
    assert recorder.sizes == [8, 8, 4]  # 4 >= 4: kept
    with pytest.raises(ValueError, match="batch_size=3"):
        train_model(
            model, images, labels, TrainSettings(epochs=1, batch_size=3), seed=0, progress=False
        )


def test_batch_of_one_dropped_only_with_batchnorm() -> None:
    images, labels = _halves(17)
    model = _model()
    recorder = _BatchRecorder(min_batch=1)
    model.guards["layer1"] = recorder
    assert min_train_batch(model) == 2  # cnn-small has BatchNorm
    settings = TrainSettings(epochs=1, batch_size=8, augment=False)
    train_model(model, images, labels, settings, seed=0, device="cpu", progress=False)
    assert recorder.sizes == [8, 8]
    plain = StagedNet(  # no BatchNorm anywhere
        OrderedDict(stem=nn.Conv2d(1, 4, 3, padding=1), layer1=nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4, 2)),
        [StageInfo("stem", 4, 1), StageInfo("layer1", 4, 1)],
        num_classes=2,
        in_channels=1,
    )
    plain.guards["layer1"] = recorder
    recorder.sizes.clear()
    train_model(plain, images, labels, settings, seed=0, device="cpu", progress=False)
    assert recorder.sizes == [8, 8, 1]


class _Probe:
    """A callback recording what it sees and adding a key."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, bool]] = []
        self.fail_at = fail_at

    def on_epoch_end(self, model: StagedNet, epoch: int, row: dict[str, float]) -> None:
        if epoch == self.fail_at:
            raise KeyboardInterrupt(f"interrupted at epoch {epoch}")
        self.calls.append((epoch, model.training))
        row["probe"] = float(epoch) * 10


def test_eval_fn_and_callbacks_add_keys() -> None:
    images, labels = _halves(64)
    probe = _Probe()
    history = train_model(
        _model(),
        images,
        labels,
        QUICK,
        seed=0,
        device="cpu",
        progress=False,
        callbacks=[probe],
        eval_fn=lambda m: {"val_acc": 0.5 if not m.training else -1.0},
    )
    assert probe.calls == [(1, False), (2, False)]  # 1-based epochs, model in eval mode
    assert [row["probe"] for row in history] == [10.0, 20.0]
    assert [row["val_acc"] for row in history] == [0.5, 0.5]


@pytest.mark.parametrize("guard_k", [None, 4])
def test_probes_evaluate_mid_epoch_without_changing_the_training(guard_k: int | None) -> None:
    images, labels = _halves(96)  # 3 steps per epoch, 6 in all
    settings = TrainSettings(epochs=2, batch_size=32, hflip=True)

    def run(probe_steps: tuple[int, ...]) -> tuple[dict[str, torch.Tensor], list[dict], _Probe]:
        model, probe = _model(seed=3, guard_k=guard_k), _Probe()
        steps_seen: list[int] = []

        def eval_fn(m: StagedNet) -> dict[str, float]:
            steps_seen.append(len(steps_seen))
            return {"val_acc": 0.5 if not m.training else -1.0}

        history = train_model(
            model,
            images,
            labels,
            settings,
            seed=5,
            device="cpu",
            progress=False,
            callbacks=[probe],
            eval_fn=eval_fn,
            probe_steps=probe_steps,
        )
        return _weights(model), history, probe

    plain_weights, plain, _ = run(())
    weights, history, probe = run((0, 1, 4))
    assert _same_weights(plain_weights, weights)  # probing leaves the training as it was
    assert "probes" not in plain[0] and "probes" not in plain[1]
    first, second = history[0]["probes"], history[1]["probes"]
    assert [p["step"] for p in first] == [0, 1] and [p["step"] for p in second] == [4]
    assert [p["epoch"] for p in first + second] == pytest.approx([0.0, 1 / 3, 4 / 3])
    assert all(p["val_acc"] == 0.5 and p["seconds"] >= 0 for p in first + second)
    assert [p["probe"] for p in first + second] == pytest.approx([0.0, 10 / 3, 40 / 3])
    # callbacks see the model in eval mode at probes and epoch ends, in order
    assert [c[0] for c in probe.calls] == pytest.approx([0.0, 1 / 3, 1, 4 / 3, 2])
    assert not any(training for _, training in probe.calls)
    without = [{k: v for k, v in row.items() if k != "probes"} for row in history]
    assert _without_seconds(without) == _without_seconds(plain)


@pytest.mark.parametrize(
    ("steps", "match"),
    [
        ((6,), "probe step 6 is past the run's last step; allowed: 0 to 5"),
        ((3,), "probe step 3 is the end of epoch 1"),
        ((2, 1), r"probe_steps=\(2, 1\); must be strictly increasing"),
        ((1, 1), "strictly increasing"),
        ((-1,), r"probe_steps=\(-1,\); must be"),
        ((1.5,), r"probe_steps=\(1.5,\); must be"),
        ("12", "probe_steps='12'; must be"),
    ],
)
def test_bad_probe_steps_are_refused(steps: object, match: str) -> None:
    images, labels = _halves(96)
    with pytest.raises(ValueError, match=match):
        train_model(
            _model(),
            images,
            labels,
            QUICK,
            seed=0,
            device="cpu",
            progress=False,
            probe_steps=steps,  # type: ignore[arg-type]
        )


TWO_EPOCHS = TrainSettings(epochs=2, batch_size=32)


def _stopped_after_epoch_1(
    ckpt: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    model: StagedNet | None = None,
    settings: TrainSettings = TWO_EPOCHS,
    probe_steps: tuple[int, ...] = (),
) -> None:
    """Leave at `ckpt` the checkpoint of a run (seed 5; default: a fresh `_model()` for
    `TWO_EPOCHS`) interrupted after its first epoch."""
    with pytest.raises(KeyboardInterrupt):
        train_model(
            _model() if model is None else model,
            images,
            labels,
            settings,
            seed=5,
            device="cpu",
            progress=False,
            checkpoint_path=ckpt,
            callbacks=[_Probe(fail_at=2)],
            probe_steps=probe_steps,
        )


@pytest.mark.parametrize(("guard_k", "probe_steps"), [(None, ()), (4, ()), (None, (0, 2, 4))])
def test_checkpoint_resume_matches_uninterrupted_run(
    tmp_path: Path, guard_k: int | None, probe_steps: tuple[int, ...]
) -> None:
    images, labels = _halves(96)
    settings = TrainSettings(epochs=3, batch_size=32, hflip=True)
    straight = _model(seed=3, guard_k=guard_k)
    full = train_model(
        straight,
        images,
        labels,
        settings,
        seed=5,
        device="cpu",
        progress=False,
        callbacks=[_Probe()],
        probe_steps=probe_steps,
    )
    assert [p["step"] for row in full for p in row.get("probes", [])] == list(probe_steps)

    ckpt = tmp_path / "run" / "ckpt.pt"
    _stopped_after_epoch_1(
        ckpt, images, labels, _model(seed=3, guard_k=guard_k), settings, probe_steps
    )
    state = load_state(ckpt)  # weights-only load works: nothing but tensors and plain data
    assert state["epoch"] == 1 and len(json.loads(state["history"])) == 1
    assert [p.name for p in ckpt.parent.iterdir()] == ["ckpt.pt"]  # no temp files left

    torch.manual_seed(1234)  # the resumed run must not depend on the caller's RNG
    resumed = _model(
        seed=99, guard_k=guard_k
    )  # fresh weights: everything comes from the checkpoint
    history = train_model(
        resumed,
        images,
        labels,
        settings,
        seed=5,
        device="cpu",
        progress=False,
        checkpoint_path=ckpt,
        callbacks=[_Probe()],
        probe_steps=probe_steps,
    )
    assert _without_seconds(history) == _without_seconds(full)
    assert _same_weights(_weights(resumed), _weights(straight))

    # a finished checkpoint returns its history without training again
    again = _model(seed=42, guard_k=guard_k)
    assert _without_seconds(
        train_model(
            again,
            images,
            labels,
            settings,
            seed=5,
            device="cpu",
            progress=False,
            checkpoint_path=ckpt,
        )
    ) == _without_seconds(full)
    assert _same_weights(_weights(again), _weights(straight))

    with pytest.raises(ValueError, match="another run"):
        train_model(
            _model(guard_k=guard_k),
            images,
            labels,
            settings,
            seed=6,
            device="cpu",
            progress=False,
            checkpoint_path=ckpt,
        )


def _resumed(ckpt: Path, images: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """The history of the same 2-epoch run, resumed from `ckpt`."""
    return train_model(
        _model(),
        images,
        labels,
        TWO_EPOCHS,
        seed=5,
        device="cpu",
        progress=False,
        checkpoint_path=ckpt,
    )


def test_checkpoint_of_other_data_of_the_same_size_is_refused(tmp_path: Path) -> None:
    images, labels = _halves(64)
    ckpt = tmp_path / "ckpt.pt"
    _stopped_after_epoch_1(ckpt, images, labels)
    other_images, _ = _halves(64, seed=1)  # same N, other samples
    with pytest.raises(CheckpointMismatchError, match="other images or labels"):
        _resumed(ckpt, other_images, labels)
    with pytest.raises(CheckpointMismatchError, match="other images or labels"):
        _resumed(ckpt, images, 1 - labels)
    assert len(_resumed(ckpt, images, labels)) == 2  # its own data still resumes


def test_checkpoint_without_a_data_record_resumes_with_a_warning(tmp_path: Path) -> None:
    images, labels = _halves(64)
    ckpt = tmp_path / "ckpt.pt"
    _stopped_after_epoch_1(ckpt, images, labels)
    state = load_state(ckpt)
    del state["data"]  # as the checkpoints written before data digests
    save_state_atomic(ckpt, state)
    with pytest.warns(UserWarning, match="does not record its training data"):
        history = _resumed(ckpt, images, labels)
    assert [row["epoch"] for row in history] == [1, 2]


@pytest.mark.slow
def test_fashion_mnist_small_run_beats_chance_quickly() -> None:
    from eglib.data import dataset_info, load_dataset, take_subset
    from eglib.evaluate import accuracy

    info = dataset_info("fashion-mnist")
    try:
        train_x, train_y = load_dataset("fashion-mnist", "train", progress=False)
        test_x, test_y = load_dataset("fashion-mnist", "test", progress=False)
    except FileNotFoundError as error:
        pytest.skip(f"Fashion-MNIST not available: {error}")
    train_x, train_y = take_subset(train_x, train_y, 4000, seed=0)
    test_x, test_y = take_subset(test_x, test_y, 2000, seed=0)
    torch.manual_seed(0)
    model = make_model("cnn-small", info.num_classes, info.in_channels)
    settings = TrainSettings(epochs=2, batch_size=32, lr=0.1, hflip=info.hflip)
    train_model(model, train_x, train_y, settings, seed=0, device="cpu", progress=False)
    acc = accuracy(model, test_x, test_y, device="cpu")
    assert acc > 0.70, f"test accuracy {acc:.3f} after 2 epochs on 4000 images"


def test_resume_trains_at_the_checkpoints_thread_count(tmp_path: Path) -> None:
    images, labels = _halves(256)
    settings = TrainSettings(epochs=2, batch_size=64, hflip=True)

    def train(threads: int, **kwargs: object) -> tuple[StagedNet, list[dict]]:
        model = _model(seed=3)
        torch.set_num_threads(threads)
        history = train_model(
            model, images, labels, settings, seed=5, device="cpu", progress=False, **kwargs
        )
        return model, history

    previous = torch.get_num_threads()
    try:
        one, one_history = train(1)
        two, _ = train(2)
        # the premise: the thread count changes the bits (else this test could not fail)
        assert not _same_weights(_weights(one), _weights(two))
        assert [row["threads"] for row in one_history] == [1, 1]

        ckpt = tmp_path / "ckpt.pt"
        with pytest.raises(KeyboardInterrupt):
            train(1, checkpoint_path=ckpt, callbacks=[_Probe(fail_at=2)])
        resumed, history = train(2, checkpoint_path=ckpt)  # a process with another count
        assert torch.get_num_threads() == 2  # the caller's count is restored
    finally:
        torch.set_num_threads(previous)
    assert [row["threads"] for row in history] == [1, 1]
    assert _same_weights(_weights(resumed), _weights(one))
