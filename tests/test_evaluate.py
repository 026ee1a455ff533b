"""Tests for eglib.evaluate: ACC, ASR and the per-sample / mixed / pure protocols."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from eglib.evaluate import (
    accuracy,
    attack_success_rate,
    attack_success_rates,
    evaluate_protocols,
    guards_eval_mode,
    mixed_batches,
    predict,
    predict_batches,
)
from eglib.experiments import _epoch_metrics, evaluate_run
from eglib.guard import insert_guard
from eglib.models import make_model
from eglib.models.base import StagedNet, StageInfo
from eglib.train import TrainSettings, train_model

SIZE = 16


@dataclass(frozen=True)
class _Triggered:
    """Shaped like eglib.poison.TriggeredSet (only what evaluation reads)."""

    images: torch.Tensor
    labels: torch.Tensor
    source_labels: torch.Tensor
    idx: torch.Tensor | None = None  # the test images the triggered ones were made from


class _CentreGuard(nn.Module):
    """A batch-wise stand-in guard: subtracts the batch mean ('batch' mode, and training) or a
    fixed running estimate ('running'), so 'batch' predictions depend on the other images."""

    running: torch.Tensor

    def __init__(self, running: float | torch.Tensor = 0.0) -> None:
        super().__init__()
        self.eval_mode = "running"
        self.register_buffer("running", torch.as_tensor(running, dtype=torch.float32))
        self.modes_seen: list[tuple[str, int]] = []
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append((self.eval_mode, x.shape[0]))
        if self.fail:
            raise RuntimeError("guard failed")
        if self.training or self.eval_mode == "batch":
            return x - x.mean(0, keepdim=True)
        return x - self.running


def _brightness_model(
    running: float = 0.3, threshold: float = 0.45
) -> tuple[StagedNet, _CentreGuard]:
    """Class 1 iff the (guarded) mean brightness exceeds `threshold`: an analytic model."""
    linear = nn.Linear(1, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0], [1.0]]))
        linear.bias.copy_(torch.tensor([threshold, 0.0]))
    model = StagedNet(
        OrderedDict(stem=nn.AdaptiveAvgPool2d(1)),
        nn.Sequential(nn.Flatten(1), linear),
        [StageInfo("stem", 1, SIZE)],
        num_classes=2,
        in_channels=1,
    )
    guard = _CentreGuard(running)
    model.guards["stem"] = guard
    return model, guard


def _flat(n: int, value: int) -> torch.Tensor:
    return torch.full((n, 1, SIZE, SIZE), value, dtype=torch.uint8)


def _random_set(n: int, seed: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images of varied brightness and contrast (so predictions vary), random labels."""
    g = torch.Generator().manual_seed(seed)
    low, span = torch.rand(2, n, 1, 1, 1, generator=g)
    noise = torch.rand(n, 1, SIZE, SIZE, generator=g)
    images = ((low * (1 - span) + span * noise) * 255).to(torch.uint8)
    return images, torch.randint(0, classes, (n,), generator=g)


def _cnn(seed: int = 0) -> StagedNet:
    torch.manual_seed(seed)
    model = make_model("cnn-small", 10, in_channels=1)
    # random BatchNorm statistics and a strong head: an untrained model with varied predictions
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=3.0)
    return model.eval()


def test_predict_independent_of_batching_and_keeps_mode() -> None:
    model = _cnn()
    images, _ = _random_set(50, seed=1)
    model.train()
    preds = predict(model, images, batch_size=7, device="cpu")
    assert model.training  # train/eval flag restored
    assert preds.dtype == torch.int64 and preds.shape == (50,)
    assert torch.equal(preds, predict(model, images, batch_size=512))
    assert len(preds.unique()) > 1  # a meaningful comparison: not one constant class
    with pytest.raises(ValueError, match="uint8"):
        predict(model, images.float())
    with pytest.raises(ValueError, match="batch_size=0"):
        predict(model, images, batch_size=0)


def test_accuracy_and_asr_match_definitions() -> None:
    model = _cnn()
    images, labels = _random_set(60, seed=2)
    preds = predict(model, images)
    labels[:20] = preds[:20]  # 20 certainly right; the rest right by chance only
    expected = (preds == labels).double().mean().item()
    assert accuracy(model, images, labels, batch_size=16) == pytest.approx(expected)

    target = preds.clone()
    target[30:] = (preds[30:] + 1) % 10  # rows 0..29 hit the target, 30..59 miss it
    source = (target + 3) % 10
    source[:10] = target[:10]  # ten hits whose source is the target: they must not count
    asr = attack_success_rate(model, images, target, source, batch_size=16)
    assert asr == pytest.approx(20 / 50)
    with pytest.raises(ValueError, match="source label different"):
        attack_success_rate(model, images, target, target)
    with pytest.raises(ValueError, match="target_labels must be int64"):
        attack_success_rate(model, images, target[:5], source)


class _PixelClass(nn.Module):
    """Predicts the class written in an image's first pixel (as a uint8 value)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot((x[:, 0, 0, 0] * 255).round().long() % 10, 10).float()


def _written(classes: list[int]) -> torch.Tensor:
    """uint8 images whose first pixel holds `classes`."""
    images = torch.zeros(len(classes), 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.uint8)
    return images


def test_correct_asr_counts_only_images_classified_right_without_the_trigger() -> None:
    model = _PixelClass()
    source = torch.tensor([1, 2, 3, 4, 5, 6, 0])
    target = torch.zeros(7, dtype=torch.int64)
    clean = _written([1, 2, 3, 9, 9, 6, 0])  # rows 3, 4 wrong without the trigger
    triggered = _written([0, 0, 7, 0, 0, 8, 0])  # hits: rows 0, 1 (counted), 3, 4 (not), 6
    # counted: rows 0, 1, 2, 5 (right when clean, source != target); hits among them: 0, 1
    asr = attack_success_rate(model, triggered, target, source)
    assert asr == pytest.approx(4 / 6)  # rows 0, 1, 3, 4 of the 6 counted
    assert attack_success_rates(model, clean, triggered, target, source) == (asr, 0.5)
    wrong = _written([9] * 7)
    assert attack_success_rates(model, wrong, triggered, target, source) == (asr, None)
    with pytest.raises(ValueError, match="pair up row by row"):
        attack_success_rates(model, clean[:5], triggered, target, source)
    with pytest.raises(ValueError, match="source label different"):
        attack_success_rates(model, clean, triggered, target, target)


def test_mixed_batches_construction() -> None:
    g = torch.Generator().manual_seed(0)
    batches = mixed_batches(1000, 900, 0.1, 256, g)
    clean = torch.cat([c for c, _ in batches])
    trig = torch.cat([t for _, t in batches])
    assert torch.equal(clean.unique(), torch.arange(1000))  # every clean image takes part
    assert torch.equal(trig.sort().values, torch.arange(900))  # every triggered image, once
    assert len(clean) == 8100  # the clean companions 900 triggered images need at 10 %
    for c, t in batches:
        assert 240 <= len(c) + len(t) <= 256
        assert abs(len(t) / (len(c) + len(t)) - 0.1) < 0.01
    again = mixed_batches(1000, 900, 0.1, 256, torch.Generator().manual_seed(0))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(batches, again, strict=True)
    )
    # few triggered images: they are reused in fresh permutations, all of them
    few = mixed_batches(1000, 30, 0.1, 256, torch.Generator().manual_seed(0))
    trig_few = torch.cat([t for _, t in few])
    assert len(trig_few) > 30 and torch.equal(trig_few.unique(), torch.arange(30))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="poison_rate"):
            mixed_batches(10, 10, bad, 8, g)
    with pytest.raises(ValueError, match="batch_size=1"):
        mixed_batches(10, 10, 0.1, 1, g)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((10, 10, "0.1", 8), "poison_rate='0.1'; must be a finite number in \\(0.0, 1.0\\)"),
        ((10, 10, True, 8), "poison_rate=True"),
        ((10, 10, math.nan, 8), "poison_rate=nan"),
        ((10, 10, 0.1, 2.5), "batch_size=2.5; must be an int >= 2"),
        ((10, 10, 0.1, "8"), "batch_size='8'"),
        (("10", 10, 0.1, 8), "n_clean='10'"),
        ((10, 0, 0.1, 8), "n_triggered=0; must be an int >= 1"),
    ],
)
def test_mixed_batches_refuse_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mixed_batches(*args, torch.Generator().manual_seed(0))


def test_protocols_refuse_a_bad_poison_rate_or_seed() -> None:
    clean_x, clean_y = _random_set(8, seed=3)
    trig_x, source = _random_set(8, seed=4)
    target = torch.full_like(source, 3)
    source[source == 3] = 4
    trig = _Triggered(trig_x, target, source)
    with pytest.raises(ValueError, match="poison_rate='0.1'"):
        evaluate_protocols(_cnn(), clean_x, clean_y, trig, poison_rate="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed='0'; must be an int >= 0"):
        evaluate_protocols(_cnn(), clean_x, clean_y, trig, poison_rate=0.1, seed="0")  # type: ignore[arg-type]


def test_protocols_identical_without_guards() -> None:
    model = _cnn()
    clean_x, clean_y = _random_set(120, seed=3)
    trig_x, source = _random_set(80, seed=4)
    preds = predict(model, clean_x)
    clean_y[:60] = preds[:60]  # accuracy well away from 0
    target = torch.full_like(source, 3)
    target[:40] = predict(model, trig_x)[:40]  # ASR well away from 0 and 1
    source[target == source] = (target[target == source] + 1) % 10
    result = evaluate_protocols(
        model, clean_x, clean_y, _Triggered(trig_x, target, source), poison_rate=0.1, batch_size=32
    )
    assert set(result) == {"per_sample", "mixed", "pure"}
    assert result["per_sample"] == result["mixed"] == result["pure"]
    assert result["pure"]["acc"] == pytest.approx(accuracy(model, clean_x, clean_y))
    assert result["pure"]["asr"] == pytest.approx(
        attack_success_rate(model, trig_x, target, source)
    )
    assert result["pure"]["acc"] >= 0.5 and 0.4 <= result["pure"]["asr"] < 1.0


def test_protocols_skip_the_mixed_batches_without_guards(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guard-free model is batch-independent: the (large) mixed batches are not predicted."""
    import eglib.evaluate as evaluate

    def no_mixed(*args: object, **kwargs: object) -> None:
        raise AssertionError("mixed batches predicted for a model without a guard")

    monkeypatch.setattr(evaluate, "_mixed_predictions", no_mixed)
    clean_x, clean_y = _random_set(40, seed=3)
    trig_x, source = _random_set(30, seed=4)
    target = torch.full_like(source, 3)
    source[source == 3] = 4
    result = evaluate_protocols(
        _cnn(), clean_x, clean_y, _Triggered(trig_x, target, source), poison_rate=0.1
    )
    assert result["per_sample"] == result["mixed"] == result["pure"]


class _PassGuard(_CentreGuard):
    """A guard that changes nothing: every image's prediction is independent of its batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append((self.eval_mode, x.shape[0]))
        return x


def _stack(values: list[int]) -> torch.Tensor:
    """One flat image per brightness value."""
    return torch.cat([_flat(1, v) for v in values])


@pytest.mark.parametrize(
    ("clean", "triggered", "poison_rate", "repeated", "acc", "asr"),
    [
        # 2 triggered images at 25 % need 6 clean companions: 2 of the 4 clean images twice
        ([51, 51, 51, 230], [204, 20], 0.25, 0, 3 / 4, 1 / 2),
        # 2 triggered images beside 3 clean at 50 %: 3 slots, so 1 triggered image twice
        ([51, 230, 51], [204, 20], 0.5, 1, 2 / 3, 1 / 2),
    ],
)
def test_mixed_protocol_weighs_each_image_once(
    clean: list[int],
    triggered: list[int],
    poison_rate: float,
    repeated: int,
    acc: float,
    asr: float,
) -> None:
    """The guard here changes nothing, so an image's hit is the same in each of its repeats
    and the per-image means are the per-sample ACC and ASR exactly (class 1 iff brightness
    > 0.45: 51 and 20 give class 0, 204 and 230 class 1); a mean over the repeated rows or
    over the batches would weigh the repeated images more."""
    batches = mixed_batches(
        len(clean), len(triggered), poison_rate, 3, torch.Generator().manual_seed(0)
    )
    rows = torch.cat([batch[repeated] for batch in batches])
    assert len(rows.bincount().unique()) > 1  # repeated unevenly: the weighting matters
    model, _ = _brightness_model(threshold=0.45)
    model.guards["stem"] = _PassGuard()
    n = len(triggered)
    trig = _Triggered(_stack(triggered), torch.ones(n).long(), torch.zeros(n).long())
    clean_y = torch.zeros(len(clean), dtype=torch.int64)
    result = evaluate_protocols(
        model, _stack(clean), clean_y, trig, poison_rate=poison_rate, batch_size=3
    )
    assert result["mixed"] == pytest.approx({"acc": acc, "asr": asr})
    assert result["per_sample"] == pytest.approx({"acc": acc, "asr": asr})


def test_mixed_batches_follow_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same seed gives the same mixed batches, another seed others; a run's own seed
    is the one its evaluation uses."""
    import eglib.evaluate as evaluate

    drawn: list[list[tuple[torch.Tensor, torch.Tensor]]] = []

    def spy(*args: Any, **kwargs: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        drawn.append(mixed_batches(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(evaluate, "mixed_batches", spy)
    model, _ = _brightness_model()
    clean_x, clean_y = _random_set(40, seed=3, classes=2)
    trig = _Triggered(_random_set(20, seed=4)[0], torch.ones(20).long(), torch.zeros(20).long())
    for seed in (0, 0, 1):
        evaluate_protocols(model, clean_x, clean_y, trig, poison_rate=0.2, seed=seed)
    data = SimpleNamespace(test_images=clean_x, test_labels=clean_y, triggered=trig)
    evaluate_run(model, SimpleNamespace(poison_rate=0.2, seed=1), data)  # type: ignore[arg-type]
    # (clean rows, triggered rows) in batch order
    same, again, other, run = ([torch.cat(part) for part in zip(*b, strict=True)] for b in drawn)
    assert all(torch.equal(a, b) for a, b in zip(same, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(same, other, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(other, run, strict=True))


def test_protocols_apply_the_guard_modes_and_the_poison_rate() -> None:
    # clean images of brightness 0.2 (class 0), triggered of 0.8 wanting class 1
    model, guard = _brightness_model(running=0.3, threshold=0.45)
    clean_x, clean_y = _flat(300, 51), torch.zeros(300, dtype=torch.int64)
    trig = _Triggered(_flat(200, 204), torch.ones(200, dtype=torch.int64), torch.zeros(200).long())
    low = evaluate_protocols(model, clean_x, clean_y, trig, poison_rate=0.1, batch_size=50)
    # per-sample: 0.8 - 0.3 > 0.45 -> the trigger works; each image on its own
    assert low["per_sample"] == {"acc": 1.0, "asr": 1.0}
    # mixed at 10 %: the batch mean ~0.26 keeps 0.8 - 0.26 > 0.45 -> still class 1
    assert low["mixed"] == {"acc": 1.0, "asr": 1.0}
    # pure: a batch of identical triggered images is centred to 0 -> class 0
    assert low["pure"] == {"acc": 1.0, "asr": 0.0}
    # at 40 % poison the batch mean ~0.44: 0.8 - 0.44 < 0.45 -> the trigger fails
    high = evaluate_protocols(model, clean_x, clean_y, trig, poison_rate=0.4, batch_size=50)
    assert high["mixed"]["asr"] == 0.0 and high["mixed"]["acc"] == 1.0
    modes = {mode for mode, _ in guard.modes_seen}
    assert modes == {"running", "batch"} and guard.eval_mode == "running"  # restored


def test_a_runs_headline_metrics_are_per_sample_whatever_the_guards_mode() -> None:
    """A guard left in 'batch' mode (EigenGuard(eval_mode='batch') is allowed) must not make a
    run's ACC transductive while its ASR is per sample: ACC was measured in batches of 512."""
    model, guard = _brightness_model(running=0.3, threshold=0.45)
    guard.eval_mode = "batch"
    # half dark (class 0), half bright (class 1): a batch mean of 0.55 sinks the bright ones
    images = torch.cat([_flat(100, 51), _flat(100, 230)])
    labels = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    # made from the dark (class 0) test images
    trig = _Triggered(
        _flat(50, 204), torch.ones(50).long(), torch.zeros(50).long(), torch.arange(50)
    )
    data = SimpleNamespace(test_images=images, test_labels=labels, triggered=trig)
    cfg = SimpleNamespace(poison_rate=0.1, seed=0)
    metrics = evaluate_run(model, cfg, data)  # type: ignore[arg-type]
    assert metrics["acc"] == metrics["protocols"]["per_sample"]["acc"] == 1.0
    assert metrics["protocols"]["pure"]["acc"] < 1.0  # the batch mode does differ here
    assert metrics["asr"] == metrics["protocols"]["per_sample"]["asr"]
    assert metrics["asr"] not in (metrics["protocols"][p]["asr"] for p in ("mixed", "pure"))
    epoch = _epoch_metrics(data)(model)  # type: ignore[arg-type]
    assert epoch == {"acc": 1.0, "asr": 1.0, "asr_correct": 1.0}
    no_attack = evaluate_run(model, cfg, SimpleNamespace(**{**vars(data), "triggered": None}))
    assert no_attack == {"acc": 1.0} and guard.eval_mode == "batch"  # and restored


def test_per_sample_protocol_independent_of_batching() -> None:
    model, _ = _brightness_model(running=0.5, threshold=0.15)
    clean_x = _random_set(90, seed=5)[0]
    clean_y = torch.zeros(90, dtype=torch.int64)
    trig_x = _random_set(70, seed=6)[0]
    trig = _Triggered(trig_x, torch.ones(70, dtype=torch.int64), torch.zeros(70).long())
    small = evaluate_protocols(model, clean_x, clean_y, trig, poison_rate=0.1, batch_size=3)
    large = evaluate_protocols(model, clean_x, clean_y, trig, poison_rate=0.1, batch_size=64)
    assert small["per_sample"] == large["per_sample"]
    # the batch-wise protocols do depend on the batches (else this test would prove nothing)
    assert small["pure"] != large["pure"] or small["mixed"] != large["mixed"]


def test_real_eigenguard_per_sample_independent_of_batching() -> None:
    model = _cnn()
    guard = insert_guard(model, k=3)
    clean_x, clean_y = _random_set(90, seed=7)
    train_model(
        model,
        clean_x,
        clean_y,
        TrainSettings(epochs=1, batch_size=30, augment=False),
        seed=0,
        device="cpu",
        progress=False,
    )
    trig_x, source = _random_set(40, seed=8)
    trig = _Triggered(trig_x, torch.full_like(source, 2), source)
    small = evaluate_protocols(model, clean_x, clean_y, trig, poison_rate=0.1, batch_size=8)
    large = evaluate_protocols(model, clean_x, clean_y, trig, poison_rate=0.1, batch_size=64)
    assert small["per_sample"] == large["per_sample"]
    assert guard.eval_mode == "running"


def test_guard_modes_restored_on_error() -> None:
    model, guard = _brightness_model()
    guard.eval_mode = "custom"
    with guards_eval_mode(model, "batch"):
        assert guard.eval_mode == "batch"
    assert guard.eval_mode == "custom"
    guard.fail = True
    clean_x, clean_y = _flat(10, 51), torch.zeros(10, dtype=torch.int64)
    trig = _Triggered(_flat(10, 204), torch.ones(10, dtype=torch.int64), torch.zeros(10).long())
    with pytest.raises(RuntimeError, match="guard failed"):
        evaluate_protocols(model, clean_x, clean_y, trig, poison_rate=0.1, batch_size=8)
    assert guard.eval_mode == "custom"


def test_protocols_reject_bad_input() -> None:
    model, _ = _brightness_model()
    clean_x, clean_y = _flat(10, 51), torch.zeros(10, dtype=torch.int64)
    trig = _Triggered(_flat(10, 204), torch.ones(10, dtype=torch.int64), torch.zeros(10).long())
    with pytest.raises(ValueError, match="poison_rate"):
        evaluate_protocols(model, clean_x, clean_y, trig, poison_rate=0.0)
    with pytest.raises(ValueError, match="clean_labels must be int64"):
        evaluate_protocols(model, clean_x, clean_y[:3], trig, poison_rate=0.1)
    odd = _Triggered(torch.zeros(10, 1, 8, 8, dtype=torch.uint8), trig.labels, trig.source_labels)
    with pytest.raises(ValueError, match="differ in shape"):
        evaluate_protocols(model, clean_x, clean_y, odd, poison_rate=0.1)


def test_prediction_restores_each_submodules_own_mode() -> None:
    """A train-mode wrapper around an eval-mode network: after predicting, the network's
    BatchNorm must still be in eval mode (restoring the wrapper's flag recursively put it
    in train mode)."""
    inner = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    inner(torch.zeros(2, 1, 8, 8))
    wrapper = nn.Sequential(inner).train()
    inner.eval()
    predict_batches(wrapper, [torch.zeros(3, 1, 8, 8, dtype=torch.uint8)], torch.device("cpu"))
    assert wrapper.training and not inner.training and not inner[1].training
