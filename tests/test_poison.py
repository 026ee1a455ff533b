"""Tests for eglib.poison: the attacks, the poisoned training set and the triggered test set."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from eglib.poison import (
    ATTACKS,
    Attack,
    PoisonedSet,
    attack_examples,
    backdoor_testset,
    make_attack,
    poison_dataset,
    refool,
)
from eglib.poison.blend import Blend
from eglib.poison.bpp import floyd_steinberg
from eglib.poison.highrank import HighRank
from eglib.poison.ops import fit_images, gaussian_blur_matrices
from eglib.poison.patterns import cloud_image, dead_leaves, lowpass_pattern
from eglib.poison.refool import Refool
from eglib.poison.wanet import WaNet

EXPECTED = {"badnets", "blend", "sig", "wanet", "lf", "bpp", "refool", "refool-clean", "highrank"}
NAMES = sorted(EXPECTED)
CLEAN_LABEL = {"sig", "refool-clean"}


def random_images(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Random uint8 images (n, channels, size, size)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=generator, dtype=torch.uint8)


def flat_images(n: int, value: int, channels: int = 1, size: int = 28) -> torch.Tensor:
    """Constant uint8 images."""
    return torch.full((n, channels, size, size), value, dtype=torch.uint8)


def class_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ... as int64."""
    return torch.arange(n) % num_classes


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


# ---- registry-wide ----------------------------------------------------------------------


def test_registry_holds_every_attack() -> None:
    assert EXPECTED <= set(ATTACKS)
    for name in EXPECTED:
        assert ATTACKS[name].name == name
        assert ATTACKS[name].clean_label == (name in CLEAN_LABEL)


def test_unknown_attack_lists_allowed() -> None:
    with pytest.raises(ValueError, match="allowed:.*badnets"):
        make_attack("nope")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_apply_keeps_format_and_is_deterministic(name: str, channels: int, size: int) -> None:
    images = random_images(12, channels, size)
    before = images.clone()
    labels = class_labels(12)
    attack = make_attack(name)
    out = attack.apply(images, labels, gen(1))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert out.device == images.device
    assert torch.equal(images, before), "apply must not change its input"
    assert not torch.equal(out, images), "the trigger must change something"
    again = make_attack(name).apply(images, labels, gen(1))
    assert torch.equal(out, again), "same parameters and generator seed -> same bytes"


@pytest.mark.parametrize("name", NAMES)
def test_apply_rejects_bad_images(name: str) -> None:
    attack = make_attack(name)
    with pytest.raises(ValueError, match="uint8"):
        attack.apply(torch.rand(2, 1, 28, 28), class_labels(2), gen())
    with pytest.raises(ValueError, match="N, C, H, W"):
        attack.apply(random_images(2)[:, 0], class_labels(2), gen())


@pytest.mark.parametrize("name", NAMES)
def test_params_are_plain_data(name: str) -> None:
    params = make_attack(name, target=3).params()
    assert params["target"] == 3 and params["label_policy"] == "all-to-one"
    assert all(isinstance(v, (int, float, str, bool, tuple, list)) for v in params.values())


BAD_PARAMS: list[tuple[str, dict[str, Any], str]] = [
    ("badnets", {"size": 0}, "size"),
    ("badnets", {"location": "middle"}, "location"),
    ("badnets", {"location": (1, -2)}, "location"),
    ("badnets", {"color": 300}, "color"),
    ("badnets", {"color": (1, 2)}, "color"),
    ("blend", {"alpha": 0.0}, "alpha"),
    ("blend", {"alpha": 1.5}, "alpha"),
    ("blend", {"pattern": torch.zeros(3, 8, 8)}, "pattern"),
    ("sig", {"delta": 0.0}, "delta"),
    ("sig", {"delta": 300.0}, "delta"),
    ("sig", {"f": 0.0}, "f="),
    ("sig", {"label_policy": "all-to-all"}, "clean-label"),
    ("wanet", {"k": 1}, "k="),
    ("wanet", {"s": -0.1}, "s="),
    ("wanet", {"grid_rescale": 0.0}, "grid_rescale"),
    ("wanet", {"cross_ratio": -1.0}, "cross_ratio"),
    ("lf", {"amplitude": 0.0}, "amplitude"),
    ("lf", {"max_freq": 0.5}, "max_freq"),
    ("bpp", {"squeeze_num": 1}, "squeeze_num"),
    ("bpp", {"squeeze_num": 256}, "squeeze_num"),
    ("refool", {"alpha": 0.0}, "alpha"),
    ("refool", {"ghost_rate": 1.2}, "ghost_rate"),
    ("refool", {"sigma_range": (3.0, 1.0)}, "sigma_range"),
    ("refool", {"num_reflections": 0}, "num_reflections"),
    ("refool", {"reflections": torch.zeros(2, 8, 8)}, "reflections"),
    ("refool-clean", {"label_policy": "all-to-all"}, "clean-label"),
    ("highrank", {"num_patterns": 0}, "num_patterns"),
    ("highrank", {"size": 0}, "size"),
    ("highrank", {"density": 0.0}, "density"),
    # non-finite or non-integer values passed before and made garbage triggers silently
    ("badnets", {"color": True}, "color"),
    ("sig", {"f": math.nan}, "f=nan"),
    ("lf", {"max_freq": math.nan}, "max_freq=nan"),
    ("wanet", {"s": math.nan}, "s=nan"),
    ("wanet", {"grid_rescale": math.inf}, "grid_rescale=inf"),
    ("bpp", {"squeeze_num": 8.5}, "squeeze_num=8.5"),
    ("refool", {"sigma_range": (1.0, math.inf)}, "sigma_range"),
    # text for a boolean counted as True ("False" from the CLI dithered), and fractional or
    # bool counts passed the checks and failed late with unclear errors (or not at all)
    ("bpp", {"dithering": "False"}, "dithering='False'"),
    ("bpp", {"dithering": 0}, "dithering=0"),
    ("badnets", {"size": 2.5}, "size=2.5"),
    ("badnets", {"size": True}, "size=True"),
    ("badnets", {"location": (1.5, 2)}, r"location=\(1.5, 2\)"),
    ("badnets", {"location": (True, 2)}, "location"),
    ("badnets", {"location": 5}, "location=5"),
    ("badnets", {"color": 2.5}, "color=2.5"),
    ("highrank", {"num_patterns": 2.5}, "num_patterns=2.5"),
    ("highrank", {"size": 3.0}, "size=3.0"),
    ("highrank", {"seed": 1.5}, "seed=1.5"),
    ("refool", {"num_reflections": 2.5}, "num_reflections=2.5"),
    ("refool", {"num_reflections": True}, "num_reflections=True"),
    ("refool", {"sigma_range": 3.0}, "sigma_range=3.0"),
    ("refool", {"sigma_range": (1.0, 2.0, 3.0)}, "sigma_range"),
    ("refool", {"seed": 0.5}, "seed=0.5"),
    ("refool", {"reflections": torch.zeros(0, 3, 8, 8, dtype=torch.uint8)}, "reflections"),
    ("refool", {"reflections": torch.zeros(2, 2, 8, 8, dtype=torch.uint8)}, "reflections"),
]


@pytest.mark.parametrize("name,params,word", BAD_PARAMS)
def test_bad_parameters_raise(name: str, params: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        make_attack(name, **params)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "params,word",
    [
        ({"target": 10}, "target"),
        ({"label_policy": "some"}, "label_policy"),
        ({"num_classes": 1}, "num_classes"),
        ({"target": 2.5}, "target=2.5"),  # was truncated to 2 for labels, not for the test set
        ({"target": True}, "target=True"),
    ],
)
def test_bad_base_parameters_raise(name: str, params: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        make_attack(name, **params)


def test_size_dependent_parameters_checked_at_apply() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        make_attack("badnets", location=(26, 0)).apply(random_images(1), class_labels(1), gen())
    with pytest.raises(ValueError, match="channels"):
        make_attack("badnets", color=(1, 2, 3)).apply(random_images(1), class_labels(1), gen())
    with pytest.raises(ValueError, match="does not fit"):
        make_attack("highrank", size=9).apply(random_images(1, size=8), class_labels(1), gen())


# ---- poison_dataset / backdoor_testset ---------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_poison_dataset_changes_only_chosen_rows(name: str) -> None:
    images, labels = random_images(100), class_labels(100)
    images_before, labels_before = images.clone(), labels.clone()
    attack = make_attack(name, target=2)
    ps = poison_dataset(images, labels, attack, rate=0.08, seed=5)
    assert isinstance(ps, PoisonedSet)
    assert torch.equal(images, images_before) and torch.equal(labels, labels_before)
    idx = ps.poison_idx
    assert idx.dtype == torch.int64 and len(idx) == 8
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == len(idx)
    changed = torch.zeros(100, dtype=torch.bool)
    changed[idx] = True
    changed[ps.noise_idx] = True
    assert torch.equal(ps.images[~changed], images[~changed])
    assert not torch.equal(ps.images[idx], images[idx])
    assert torch.equal(ps.true_labels, labels)
    assert ps.images.dtype == torch.uint8 and ps.images.shape == images.shape
    assert ps.attack_name == name and ps.attack_params["target"] == 2
    if name in CLEAN_LABEL:
        assert torch.all(labels[idx] == 2), "clean-label attacks poison the target class only"
        assert torch.equal(ps.labels, labels), "clean-label attacks never change labels"
    else:
        assert torch.all(labels[idx] != 2), "all-to-one attacks poison non-target samples"
        assert torch.all(ps.labels[idx] == 2)
        assert torch.equal(ps.labels[~changed], labels[~changed])


@pytest.mark.parametrize("name", ["badnets", "wanet", "refool", "highrank"])
def test_poison_dataset_same_seed_same_bytes(name: str) -> None:
    images, labels = random_images(60), class_labels(60)
    a = poison_dataset(images, labels, make_attack(name), rate=0.1, seed=3)
    b = poison_dataset(images, labels, make_attack(name), rate=0.1, seed=3)
    c = poison_dataset(images, labels, make_attack(name), rate=0.1, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.poison_idx, b.poison_idx) and torch.equal(a.noise_idx, b.noise_idx)
    assert not torch.equal(a.poison_idx, c.poison_idx)


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, True, math.nan])
def test_poison_dataset_bad_rate(rate: float) -> None:
    attack = make_attack("badnets", label_policy="all-to-all")  # rate=True passed as 1 here
    with pytest.raises(ValueError, match=f"rate={rate}"):
        poison_dataset(random_images(20), class_labels(20), attack, rate, 0)


@pytest.mark.parametrize("seed", [1.5, True, -1, "3"])
def test_poison_and_trigger_bad_seed(seed: Any) -> None:
    images, labels = random_images(20), class_labels(20)
    with pytest.raises(ValueError, match=f"seed={seed!r}"):
        poison_dataset(images, labels, make_attack("badnets"), 0.1, seed)
    with pytest.raises(ValueError, match=f"seed={seed!r}"):
        backdoor_testset(images, labels, make_attack("badnets"), seed)


def test_poison_dataset_bad_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        poison_dataset(random_images(20), class_labels(19), make_attack("badnets"), 0.1, 0)
    labels = class_labels(20) * 4  # up to 36: not classes of a 10-class attack
    with pytest.raises(ValueError, match=r"labels span \[0, 36\].*num_classes=10"):
        poison_dataset(
            random_images(20), labels, make_attack("badnets", label_policy="all-to-all"), 0.1, 0
        )
    with pytest.raises(ValueError, match="labels span"):
        backdoor_testset(random_images(20), labels - 5, make_attack("badnets"), 0)


def test_clean_label_rate_beyond_target_class_is_an_error() -> None:
    images, labels = random_images(100), class_labels(100)  # 10 samples per class
    ps = poison_dataset(images, labels, make_attack("sig"), rate=0.1, seed=0)
    assert torch.equal(ps.poison_idx, (labels == 0).nonzero().flatten())
    with pytest.raises(ValueError, match="target-class"):
        poison_dataset(images, labels, make_attack("sig"), rate=0.11, seed=0)


def test_all_to_all_poisons_any_class_with_next_label() -> None:
    images, labels = random_images(50), class_labels(50, num_classes=5)
    attack = make_attack("badnets", label_policy="all-to-all", num_classes=5)
    ps = poison_dataset(images, labels, attack, rate=0.4, seed=0)
    assert torch.equal(ps.labels[ps.poison_idx], (labels[ps.poison_idx] + 1) % 5)
    assert len(labels[ps.poison_idx].unique()) > 1
    ts = backdoor_testset(images, labels, attack, seed=0)
    assert torch.equal(ts.idx, torch.arange(50))
    assert torch.equal(ts.labels, (labels + 1) % 5)


def test_wanet_noise_mode_keeps_labels() -> None:
    images, labels = random_images(100), class_labels(100)
    ps = poison_dataset(images, labels, make_attack("wanet"), rate=0.1, seed=0)
    assert len(ps.poison_idx) == 10 and len(ps.noise_idx) == 20
    assert not set(ps.poison_idx.tolist()) & set(ps.noise_idx.tolist())
    assert torch.equal(ps.labels[ps.noise_idx], labels[ps.noise_idx])
    assert not torch.equal(ps.images[ps.noise_idx], images[ps.noise_idx])
    assert len(poison_dataset(images, labels, WaNet(cross_ratio=0), 0.1, 0).noise_idx) == 0
    with pytest.raises(ValueError, match="cross_ratio"):
        poison_dataset(images, labels, make_attack("wanet"), rate=0.5, seed=0)


@pytest.mark.parametrize("name", ["badnets", "sig", "highrank"])
def test_backdoor_testset_excludes_target(name: str) -> None:
    images, labels = random_images(40), class_labels(40)
    ts = backdoor_testset(images, labels, make_attack(name, target=3), seed=0)
    assert torch.equal(ts.idx, (labels != 3).nonzero().flatten())
    assert torch.all(ts.labels == 3), "the attacker wants the target, clean-label or not"
    assert torch.equal(ts.source_labels, labels[ts.idx])
    assert torch.all(ts.source_labels != 3)
    assert torch.equal(
        ts.images, make_attack(name, target=3).apply(images[ts.idx], ts.labels, gen(0))
    )


def test_backdoor_testset_draws_its_triggers_from_its_seed() -> None:
    """HighRank stamps a random pattern of its family on each image: drawn from `seed`."""
    images, labels = random_images(40), class_labels(40)
    attack = make_attack("highrank", target=3)
    first, again, other = (backdoor_testset(images, labels, attack, seed=s) for s in (1, 1, 2))
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)
    assert torch.equal(first.images, attack.apply(images[first.idx], first.labels, gen(1)))


@pytest.mark.parametrize(("n", "count"), [(37, 4), (33, 3)])
def test_poison_count_is_the_rounded_rate(n: int, count: int) -> None:
    # 10 % of 37 is 3.7 and of 33 is 3.3: round gives 4 and 3 (floor 3 and 3, ceil 4 and 4)
    ps = poison_dataset(random_images(n), class_labels(n), make_attack("badnets"), 0.1, seed=0)
    assert len(ps.poison_idx) == count


class _CountingFit(Attack):
    """A learned attack stand-in: counts `fit` calls; its trigger is a black first row."""

    name = "counting-fit"
    needs_fit = True

    def __init__(self, **base: Any) -> None:
        super().__init__(**base)
        self.fit_calls = 0

    def fit(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> None:
        self.fit_calls += 1
        self._fitted = True

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        assert self.fitted, "apply before fit"
        out = images.clone()
        out[:, :, 0] = 0
        return out


def test_learned_attacks_are_fitted_once() -> None:
    images, labels = random_images(30), class_labels(30)
    attack = _CountingFit()
    assert not attack.fitted
    poison_dataset(images, labels, attack, rate=0.1, seed=0)
    backdoor_testset(images, labels, attack, seed=0)
    assert attack.fit_calls == 1 and attack.fitted


def test_backdoor_testset_refuses_an_unfitted_attack() -> None:
    images, labels = random_images(30), class_labels(30)
    with pytest.raises(ValueError, match="not fitted"):
        backdoor_testset(images, labels, _CountingFit(), seed=0)


def test_noise_mode_missing_is_explicit() -> None:
    with pytest.raises(NotImplementedError, match="noise mode"):
        make_attack("badnets").apply_noise(random_images(1), gen())


# ---- formulas on hand-made images -------------------------------------------------------


def test_badnets_patch_pixels() -> None:
    images = flat_images(3, 7)
    out = make_attack("badnets").apply(images, class_labels(3), gen())
    assert torch.all(out[:, :, 25:, 25:] == 255)
    mask = torch.ones(28, 28, dtype=torch.bool)
    mask[25:, 25:] = False
    assert torch.all(out[:, :, mask] == 7)
    colour = make_attack("badnets", size=2, location=(1, 4), color=(10, 20, 30))
    out = colour.apply(flat_images(2, 0, channels=3, size=32), class_labels(2), gen())
    assert out[0, :, 1:3, 4:6].tolist() == [[[10, 10]] * 2, [[20, 20]] * 2, [[30, 30]] * 2]
    assert int(out.sum()) == 2 * 4 * 60
    top_left = make_attack("badnets", location="top-left").apply(images, class_labels(3), gen())
    assert torch.all(top_left[:, :, :3, :3] == 255) and int((top_left == 255).sum()) == 27


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_blend_formula(channels: int, size: int) -> None:
    attack = Blend(alpha=0.2)
    images = torch.stack([flat_images(1, v, channels, size)[0] for v in (0, 100, 255)])
    out = attack.apply(images, class_labels(3), gen()).to(torch.float32)
    trigger = attack.trigger(channels, size, size)
    expected = 0.8 * images.to(torch.float32) + 0.2 * trigger
    assert (out - expected).abs().max() <= 1.0
    assert trigger.std() > 10, "the procedural trigger image has structure"
    hand = make_attack("blend", alpha=0.5, pattern=torch.full((3, 8, 8), 200, dtype=torch.uint8))
    out = hand.apply(flat_images(2, 100, channels, size), class_labels(2), gen())
    assert torch.all(out == 150)


def test_sig_formula() -> None:
    out = make_attack("sig").apply(flat_images(2, 100), class_labels(2), gen())
    j = torch.arange(28, dtype=torch.float64)
    expected = (100 + 20 * torch.sin(2 * math.pi * j * 6 / 28)).round().to(torch.uint8)
    assert torch.equal(out, expected.expand(2, 1, 28, 28))
    clipped = make_attack("sig", delta=40).apply(flat_images(1, 250), class_labels(1), gen())
    expected = (250 + 40 * torch.sin(2 * math.pi * j * 6 / 28)).round().clamp(0, 255)
    assert torch.equal(clipped[0, 0, 5], expected.to(torch.uint8)) and clipped.max() == 255


@pytest.mark.parametrize("dithering", [True, False])
@pytest.mark.parametrize("squeeze_num", [2, 8])
def test_bpp_levels(dithering: bool, squeeze_num: int) -> None:
    attack = make_attack("bpp", squeeze_num=squeeze_num, dithering=dithering)
    out = attack.apply(random_images(6, channels=3, size=32), class_labels(6), gen())
    step = 255 / (squeeze_num - 1)
    allowed = {round(k * step) for k in range(squeeze_num)}
    for c in range(3):
        values = set(out[:, c].unique().tolist())
        assert len(values) <= squeeze_num and values <= allowed


def test_bpp_dithering_keeps_local_mean() -> None:
    images = flat_images(2, 100)
    plain = make_attack("bpp", dithering=False).apply(images, class_labels(2), gen())
    assert torch.all(plain == 109)  # round(100 / 255 * 7) = 3 -> round(3 * 255 / 7)
    dithered = make_attack("bpp").apply(images, class_labels(2), gen()).to(torch.float32)
    assert set(dithered.unique().tolist()) == {73.0, 109.0}
    assert abs(dithered.mean().item() - 100) < 1.5
    level = flat_images(1, 73)
    assert torch.equal(make_attack("bpp").apply(level, class_labels(1), gen()), level)


def test_floyd_steinberg_matches_a_reference_loop() -> None:
    images = random_images(2, channels=1, size=5).to(torch.float32)
    step = 255 / 3
    ref = images.clone().to(torch.float64)
    out = torch.empty_like(ref)
    for i in range(5):
        for j in range(5):
            old = ref[:, :, i, j]
            new = (old / step).round().clamp(0, 3) * step
            out[:, :, i, j] = new
            err = old - new
            if j + 1 < 5:
                ref[:, :, i, j + 1] += err * 7 / 16
            if i + 1 < 5:
                if j > 0:
                    ref[:, :, i + 1, j - 1] += err * 3 / 16
                ref[:, :, i + 1, j] += err * 5 / 16
                if j + 1 < 5:
                    ref[:, :, i + 1, j + 1] += err * 1 / 16
    assert torch.allclose(floyd_steinberg(images, 4).to(torch.float64), out, atol=1e-3)


def test_lf_amplitude_and_low_frequency() -> None:
    attack = make_attack("lf", amplitude=20.0, max_freq=3.0)
    out = attack.apply(flat_images(2, 128, 3, 32), class_labels(2), gen())
    diff = out.to(torch.float32) - 128
    assert diff.abs().max() <= 20.5 and diff.abs().max() >= 19.5
    spectrum = torch.fft.fft2(diff).abs() ** 2
    fy = torch.fft.fftfreq(32)[:, None] * 32
    fx = torch.fft.fftfreq(32)[None, :] * 32
    high = (fy**2 + fx**2).sqrt() > 3
    assert spectrum[..., high].sum() / spectrum.sum() < 0.02
    assert torch.equal(out[0], out[1]), "the trigger is fixed"


def test_wanet_identity_when_s_is_zero() -> None:
    images = random_images(4, 3, 32)
    out = make_attack("wanet", s=0.0).apply(images, class_labels(4), gen())
    assert torch.equal(out, images)
    warped = make_attack("wanet").apply(images, class_labels(4), gen())
    noisy = make_attack("wanet").apply_noise(images, gen())
    assert not torch.equal(warped, images) and not torch.equal(noisy, warped)
    smooth = flat_images(1, 90)
    assert torch.equal(make_attack("wanet").apply(smooth, class_labels(1), gen()), smooth)


@pytest.mark.parametrize("ghost_rate", [0.0, 1.0])
def test_refool_formula_with_flat_reflections(ghost_rate: float) -> None:
    reflections = flat_images(3, 200, channels=3, size=16)
    attack = make_attack("refool", alpha=0.3, ghost_rate=ghost_rate, reflections=reflections)
    images = torch.stack([flat_images(1, v)[0] for v in (0, 60, 255)])
    out = attack.apply(images, class_labels(3), gen()).to(torch.float64)
    x, r = images.to(torch.float64) / 255, torch.tensor(200 / 255, dtype=torch.float64)
    expected = (0.7 * x**2.2 + 0.3 * r**2.2) ** (1 / 2.2) * 255
    assert (out - expected).abs().max() <= 1.0


def test_refool_ghost_and_blur_of_a_point() -> None:
    point = flat_images(1, 0)
    point[0, 0, 14, 14] = 255
    ghost = make_attack("refool", alpha=1.0, ghost_rate=1.0, reflections=point)
    out = ghost.apply(flat_images(20, 0), class_labels(20), gen())[:, 0]
    for image in out:
        lit = image.nonzero().tolist()
        assert len(lit) == 2 and lit[0] == [14, 14]
        dy, dx = lit[1][0] - 14, lit[1][1] - 14
        assert 1 <= dy <= 3 and 1 <= dx <= 3, "the ghost is shifted down-right by 1..3 px"
    blur = make_attack("refool", alpha=1.0, ghost_rate=0.0, reflections=point)
    spot = blur.apply(flat_images(4, 0), class_labels(4), gen())[:, 0].to(torch.float32)
    centre = spot[:, 4:25, 4:25]  # 10 px either side of the point (borders renormalise: +-1)
    assert (centre - centre.flip(-1)).abs().max() <= 1
    assert torch.equal(centre, centre.transpose(-1, -2)), "the blur is isotropic"
    assert torch.all(spot[:, 14, 14] == spot.amax(dim=(1, 2))) and int((spot > 0).sum()) > 4 * 9
    assert torch.all(spot[:, 14, 14] < 255), "the point is spread out"


def test_refool_reflections_vary_per_image() -> None:
    out = make_attack("refool").apply(flat_images(8, 50), class_labels(8), gen())
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8


def refool_reference(
    attack: Refool, images: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Refool's apply as first written: every blur and shift of the whole bank precomputed
    ((R, 33, C, H, W) and (R, S * S, C, H, W)), then each image picks its layer."""
    n, channels, height, width = images.shape
    bank = (fit_images(attack._bank, channels, height, width) / 255) ** 2.2
    sigmas = torch.linspace(*attack.sigma_range, 33)
    rows = gaussian_blur_matrices(sigmas, height)[None, :, None]
    cols = gaussian_blur_matrices(sigmas, width)[None, :, None].transpose(-1, -2)
    blurred = rows @ bank[:, None] @ cols
    steps = torch.arange(1, attack.max_shift(height, width) + 1)
    dy, dx = (t.flatten() for t in torch.meshgrid(steps, steps, indexing="ij"))
    row_index = (torch.arange(height)[None] - dy[:, None]).clamp(0, height - 1)
    col_index = (torch.arange(width)[None] - dx[:, None]).clamp(0, width - 1)
    shifted = bank[:, :, row_index[:, :, None], col_index[:, None, :]].transpose(1, 2)
    pick = torch.randint(bank.shape[0], (n,), generator=generator)
    level = torch.randint(33, (n,), generator=generator)
    ghost = (torch.rand(n, generator=generator) < attack.ghost_rate).nonzero().flatten()
    shift = torch.randint(shifted.shape[1], (len(ghost),), generator=generator)
    w = (
        torch.randint(0, 2, (len(ghost),), generator=generator)
        - 0.15
        - 0.35 * torch.rand(len(ghost), generator=generator)
    ).abs()[:, None, None, None]
    layer = blurred[pick, level]
    layer[ghost] = w * bank[pick[ghost]] + (1 - w) * shifted[pick[ghost], shift]
    mixed = images.to(torch.float32).div_(255).pow_(2.2).mul_(1 - attack.alpha)
    mixed.add_(layer, alpha=attack.alpha).clamp_(0, 1).pow_(1 / 2.2).mul_(255)
    return mixed.round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"ghost_rate": 0.7, "sigma_range": (0.5, 3.0), "ghost_shift": 0.2},
        {"reflections": random_images(5, channels=3, size=20, seed=9)},
        {"reflections": random_images(3, channels=1, size=40, seed=9), "ghost_rate": 1.0},
    ],
)
def test_refool_matches_the_whole_bank_reference(
    params: dict[str, Any], channels: int, size: int
) -> None:
    attack = make_attack("refool", **params)
    assert isinstance(attack, Refool)
    images = random_images(40, channels=channels, size=size, seed=2)
    out = attack.apply(images, class_labels(40), gen(3))
    assert torch.equal(out, refool_reference(attack, images, gen(3)))


def test_refool_works_only_on_the_drawn_reflections(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large bank (e.g. 50 000 CIFAR images) must not be blurred and shifted as a whole
    (that took R x 42 float images, ~25 GB): only the reflections a batch draws are."""
    sizes: list[int] = []

    def spy(images: torch.Tensor, *shape: int) -> torch.Tensor:
        sizes.append(len(images))
        return fit_images(images, *shape)

    monkeypatch.setattr(refool, "fit_images", spy)
    bank = random_images(500, channels=3, size=8, seed=1)
    attack = make_attack("refool", reflections=bank, ghost_rate=0.5)
    out = attack.apply(random_images(6, channels=3, size=32), class_labels(6), gen())
    assert out.shape == (6, 3, 32, 32) and sizes and max(sizes) <= 6


def test_highrank_uses_many_family_patterns() -> None:
    attack = HighRank(num_patterns=16, size=3)
    family = attack.family(28, 28)[:, 0]
    assert family.shape == (16, 28, 28) and bool(family.flatten(1).any(1).all())
    assert len({tuple(m.flatten().tolist()) for m in family}) == 16
    images = flat_images(200, 0)
    out = attack.apply(images, class_labels(200), gen())[:, 0]
    stamped = out == 255
    assert torch.all(out[~stamped] == 0)
    matches = (stamped[:, None] == family[None]).flatten(2).all(-1)  # (images, patterns)
    assert torch.all(matches.sum(1) == 1), "each image carries exactly one family pattern"
    assert int(matches.any(0).sum()) >= 12, "the draws cover most of the family"


# ---- patterns and gallery ----------------------------------------------------------------


def test_procedural_patterns_are_seeded() -> None:
    assert torch.equal(cloud_image(3), cloud_image(3))
    assert not torch.equal(cloud_image(3), cloud_image(4))
    cloud = cloud_image(0, size=32, channels=3)
    assert cloud.dtype == torch.uint8 and cloud.shape == (3, 32, 32)
    assert cloud.min() == 0 and cloud.max() == 255
    leaves = dead_leaves(2, gen(0), size=24, channels=1)
    assert leaves.shape == (2, 1, 24, 24) and torch.equal(leaves, dead_leaves(2, gen(0), 24, 1))
    pattern = lowpass_pattern(1, 20, 20, 2.0, gen(0))
    assert pattern.abs().max() == pytest.approx(1.0) and abs(pattern.mean()) < 1e-5


def test_attack_examples() -> None:
    images, labels = random_images(3), class_labels(3)
    clean, poisoned, diff = attack_examples("badnets", images, labels, seed=0)
    assert torch.equal(clean, images) and clean.data_ptr() != images.data_ptr()
    assert torch.equal(poisoned, make_attack("badnets").apply(images, labels, gen()))
    assert diff.dtype == torch.uint8 and int(diff.max()) == 255
    unchanged = poisoned == images
    assert torch.all(diff[unchanged] == 0) and torch.all(diff[~unchanged] > 0)
    _, small, small_diff = attack_examples("sig", images, labels, seed=0, delta=2.0)
    assert int(small_diff.max()) == 255 and int((small.int() - images.int()).abs().max()) <= 2
