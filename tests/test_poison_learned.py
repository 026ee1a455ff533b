"""Tests for the learned attacks (lc, ssba, inputaware, advnoise): fit, cache, apply."""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from eglib.config import cache_dir
from eglib.data import to_float
from eglib.poison import ATTACKS, backdoor_testset, make_attack, poison_dataset
from eglib.poison._fitted import FittedAttack
from eglib.poison.advnoise import AdversarialNoiseBadNets
from eglib.poison.inputaware import InputAware, pyramid_depth
from eglib.poison.lc import LabelConsistent, corner_signs
from eglib.poison.ssba import SSBA

LEARNED = ("lc", "ssba", "inputaware", "advnoise")
CLASSES = 4
TARGET = 1
# the CI sizes, a little adjusted to 128 images: every fit runs in seconds on one CPU thread
TINY: dict[str, dict[str, Any]] = {
    "lc": {**LabelConsistent.quick_params, "surrogate_batch_size": 32, "steps": 3},
    "advnoise": {**AdversarialNoiseBadNets.quick_params, "surrogate_batch_size": 32, "steps": 3},
    "ssba": {**SSBA.quick_params, "fit_steps": 120},
    "inputaware": {**InputAware.quick_params, "fit_batch_size": 32},
}


def toy_data(
    n: int = 128, channels: int = 3, size: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images of CLASSES smooth class prototypes plus pixel noise; labels 0, 1, 2, 3, 0..."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(
        torch.rand(CLASSES, channels, 4, 4, generator=g), size=size, mode="bilinear"
    )
    labels = torch.arange(n) % CLASSES
    noise = torch.rand(n, channels, size, size, generator=g)
    return ((protos[labels] * 0.7 + noise * 0.3) * 255).round().to(torch.uint8), labels


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def build(name: str, **extra: Any) -> FittedAttack:
    """The attack `name` with the tiny fit sizes, TARGET and CLASSES."""
    params = {"target": TARGET, "num_classes": CLASSES, **TINY[name], **extra}
    attack = make_attack(name, **params)
    assert isinstance(attack, FittedAttack)
    return attack


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A private cache folder; one torch thread (the shared 2-core machine thrashes with more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EGLIB_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The shared toy training set."""
    return toy_data()


@pytest.fixture(scope="module")
def fitted(data: tuple[torch.Tensor, torch.Tensor]) -> dict[str, FittedAttack]:
    """Each learned attack fitted once on the toy data (lc first: advnoise reuses its surrogate)."""
    attacks = {}
    for name in LEARNED:
        attack = build(name)
        attack.fit(*data, gen(0))
        attacks[name] = attack
    return attacks


# ---- registry and validation ------------------------------------------------------------


def test_registry_flags_and_quick_params() -> None:
    for name in LEARNED:
        cls = ATTACKS[name]
        assert cls.name == name and cls.needs_fit and cls.clean_label == (name == "lc")
        assert issubclass(cls, FittedAttack)
        quick = make_attack(name, **cls.quick_params).params()
        assert quick["fit_size"] == 512 and all(quick[k] == v for k, v in cls.quick_params.items())
    assert InputAware().cross_ratio == 1.0


BAD_PARAMS: list[tuple[str, dict[str, Any], str]] = [
    ("lc", {"eps": -1.0}, "eps"),
    ("lc", {"steps": 0}, "steps"),
    ("lc", {"layout": "top"}, "layout"),
    ("lc", {"amplitude": 1.5}, "amplitude"),
    ("lc", {"surrogate": "nope"}, "surrogate"),
    ("lc", {"label_policy": "all-to-all"}, "clean-label"),
    ("lc", {"fit_size": 0}, "fit_size"),
    ("advnoise", {"size": 0}, "size"),
    ("advnoise", {"surrogate_epochs": 0}, "surrogate_epochs"),
    ("ssba", {"bits": 0}, "bits"),
    ("ssba", {"max_residual": 0.0}, "max_residual"),
    ("ssba", {"fit_steps": 0}, "fit_steps"),
    ("inputaware", {"mask_density": 2.0}, "mask_density"),
    ("inputaware", {"fit_rate": 0.0}, "fit_rate"),
    ("inputaware", {"classifier": "nope"}, "classifier"),
    ("inputaware", {"width": 0}, "width"),
    # text for booleans counted as True; fractional or bool counts passed the checks
    ("lc", {"random_start": "False"}, "random_start='False'"),
    ("lc", {"progress": "no"}, "progress='no'"),
    ("lc", {"steps": 2.5}, "steps=2.5"),
    ("lc", {"surrogate_epochs": 1.5}, "surrogate_epochs=1.5"),
    ("lc", {"surrogate_batch_size": 64.0}, "surrogate_batch_size=64.0"),
    ("lc", {"fit_size": 100.5}, "fit_size=100.5"),
    ("lc", {"fit_size": True}, "fit_size=True"),
    ("advnoise", {"size": 2.5}, "size=2.5"),
    ("advnoise", {"location": (0.5, 1)}, "location"),
    ("ssba", {"bits": 8.5}, "bits=8.5"),
    ("ssba", {"width": 8.0}, "width=8.0"),
    ("ssba", {"fit_steps": True}, "fit_steps=True"),
    ("ssba", {"fit_batch_size": 16.5}, "fit_batch_size=16.5"),
    ("ssba", {"batch_size": 100.0}, "batch_size=100.0"),
    ("ssba", {"progress": "True"}, "progress='True'"),
    ("inputaware", {"width": 8.5}, "width=8.5"),
    ("inputaware", {"width": True}, "width=True"),
    ("inputaware", {"mask_epochs": 1.5}, "mask_epochs=1.5"),
    ("inputaware", {"fit_epochs": 2.5}, "fit_epochs=2.5"),
    ("inputaware", {"fit_batch_size": 32.0}, "fit_batch_size=32.0"),
    ("inputaware", {"batch_size": 64.5}, "batch_size=64.5"),
]


@pytest.mark.parametrize("name,params,match", BAD_PARAMS)
def test_bad_params_raise(name: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_attack(name, **params)


@pytest.mark.parametrize("name", LEARNED)
def test_apply_before_fit_raises(name: str, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    attack = build(name)
    assert not attack.fitted and attack.fit_from_cache is None
    with pytest.raises(RuntimeError, match="not fitted.*fit"):
        attack.apply(*data, gen())


@pytest.mark.parametrize("name", LEARNED)
def test_params_are_plain_and_record_fit_sizes(name: str) -> None:
    params = build(name).params()
    assert params["target"] == TARGET and "fit_size" in params
    assert all(
        isinstance(v, (int, float, str, bool, tuple, list, type(None))) for v in params.values()
    )
    assert not any(k.startswith("_") for k in params)


@pytest.mark.parametrize("name", LEARNED)
def test_fitting_leaves_the_params_a_record_is_checked_against(
    name: str, fitted: dict[str, FittedAttack]
) -> None:
    """A cached run is stale when its recorded attack parameters differ from a fresh
    attack's (`eglib.experiments.stale_attack_params`): the fit must not add to them."""
    assert fitted[name].fitted and fitted[name].params() == build(name).params()


# ---- apply: format, determinism ---------------------------------------------------------


@pytest.mark.parametrize("name", LEARNED)
def test_apply_keeps_format_and_is_deterministic(
    name: str, fitted: dict[str, FittedAttack], data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, labels = data[0][:24], data[1][:24]
    before = images.clone()
    attack = fitted[name]
    out = attack.apply(images, labels, gen(1))
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.device == images.device
    assert torch.equal(images, before), "apply must not change its input"
    assert not torch.equal(out, images)
    assert torch.equal(out, attack.apply(images, labels, gen(1))), "same generator, same bytes"
    with pytest.raises(ValueError, match="fitted on"):
        attack.apply(toy_data(4, channels=1)[0], labels[:4], gen(1))


# ---- lc and advnoise ---------------------------------------------------------------------


def test_corner_signs_layouts() -> None:
    four = corner_signs(8, 8, "all-corners")
    one = corner_signs(8, 8, "bottom-right")
    assert int((four != 0).sum()) == 36 and int((one != 0).sum()) == 9
    assert torch.equal(four[-3:, -3:], one[-3:, -3:])
    assert torch.equal(four[:3, :3], four[:3, -3:].flip(1)), "right corners mirror the left"


def test_lc_noise_within_eps_on_target_rows_then_corners(
    fitted: dict[str, FittedAttack], data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    attack = fitted["lc"]
    assert isinstance(attack, LabelConsistent)
    images, labels = data
    out = attack.apply(images, labels, gen(2))
    signs = corner_signs(16, 16, "all-corners")
    corner = signs != 0
    diff = out.to(torch.int16) - images.to(torch.int16)
    target = labels == TARGET
    inside = diff[:, :, ~corner]
    assert int(inside[target].abs().max()) <= math.ceil(attack.eps)
    assert int((inside[target] != 0).sum()) > 0.5 * inside[target].numel(), "PGD moved pixels"
    assert int(inside[~target].abs().max()) == 0, "other classes get the trigger only"
    expected = torch.where(signs > 0, 255, 0).to(torch.uint8)
    assert torch.equal(out[:, :, corner], expected[corner].expand_as(out[:, :, corner]))
    # the noise is PGD away from the true label on the surrogate, drawn from the same generator
    adv = attack.adversarial(images[target], labels[target], gen(2))
    assert torch.equal(out[target], attack.stamp(adv))
    model = attack._model
    assert model is not None
    with torch.no_grad():
        loss_clean = F.cross_entropy(model(to_float(images[target])), labels[target])
        loss_adv = F.cross_entropy(model(to_float(adv)), labels[target])
    assert loss_adv > loss_clean


def test_lc_poisons_target_class_only_and_keeps_labels(
    fitted: dict[str, FittedAttack], data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    attack = fitted["lc"]
    assert isinstance(attack, LabelConsistent)
    images, labels = data
    poisoned = poison_dataset(images, labels, attack, rate=0.2, seed=0)
    assert torch.all(labels[poisoned.poison_idx] == TARGET)
    assert torch.equal(poisoned.labels, labels)
    changed = (poisoned.images != images).flatten(1).any(1).nonzero().flatten()
    assert torch.equal(changed, poisoned.poison_idx)
    triggered = backdoor_testset(images, labels, attack, seed=0)
    assert torch.equal(triggered.images, attack.stamp(images[triggered.idx]))
    assert torch.all(triggered.labels == TARGET)


def test_advnoise_noise_on_every_row_then_badnets_and_clean_test_trigger(
    fitted: dict[str, FittedAttack], data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    attack = fitted["advnoise"]
    assert isinstance(attack, AdversarialNoiseBadNets)
    assert attack.fit_from_cache, "advnoise reuses the surrogate lc fitted"
    images, labels = data
    out = attack.apply(images, labels, gen(3))
    square = torch.zeros(16, 16, dtype=torch.bool)
    square[-3:, -3:] = True
    assert torch.all(out[:, :, square] == 255)
    diff = (out.to(torch.int16) - images.to(torch.int16))[:, :, ~square]
    assert int(diff.abs().max()) <= math.ceil(attack.eps)
    assert bool((diff != 0).flatten(1).any(1).all()), "every poisoned row carries noise"
    assert torch.all(attack.poison_labels(labels) == TARGET)
    triggered = backdoor_testset(images, labels, attack, seed=0)
    test_diff = triggered.images != images[triggered.idx]
    assert not test_diff[:, :, ~square].any(), "the test-time trigger is the square alone"


# ---- ssba -------------------------------------------------------------------------------


def test_ssba_residual_bounded_sample_specific_and_decodable(
    fitted: dict[str, FittedAttack], data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    attack = fitted["ssba"]
    assert isinstance(attack, SSBA)
    images, labels = data
    out = attack.apply(images, labels, gen())
    diff = out.to(torch.int16) - images.to(torch.int16)
    assert int(diff.abs().max()) <= math.ceil(255 * attack.max_residual)
    residual = attack.residual(images)
    assert float(residual.abs().max()) <= attack.max_residual
    spread = (residual - residual.mean(0, keepdim=True)).abs().mean()
    assert float(spread) > 0.1 * float(residual.abs().mean()), "residual depends on the image"
    code = attack.code
    triggered_acc = ((attack.decode(out) > 0).float() == code).float().mean()
    clean_acc = ((attack.decode(images) > 0).float() == code).float().mean()
    assert triggered_acc > 0.7 and triggered_acc > clean_acc + 0.15


# ---- inputaware -------------------------------------------------------------------------


def test_pyramid_depth() -> None:
    assert (pyramid_depth(32, 32), pyramid_depth(28, 28), pyramid_depth(16, 16)) == (3, 2, 3)
    assert pyramid_depth(15, 15) == 0


def test_inputaware_trigger_differs_per_input_and_noise_mode(
    fitted: dict[str, FittedAttack], data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    attack = fitted["inputaware"]
    assert isinstance(attack, InputAware)
    images, labels = data[0][:32], data[1][:32]
    out = attack.apply(images, labels, gen())
    change = to_float(out) - to_float(images)
    assert float((change[1:] - change[:1]).abs().mean()) > 1e-3, "triggers differ across inputs"
    masks = attack.masks(images)
    assert masks.shape == (32, 1, 16, 16) and float(masks.std(0).mean()) > 0
    noise = attack.apply_noise(images, gen(4))
    assert noise.dtype == torch.uint8 and not torch.equal(noise, out)
    assert torch.equal(noise, attack.apply_noise(images, gen(4)))
    poisoned = poison_dataset(data[0], data[1], attack, rate=0.1, seed=0)
    assert len(poisoned.noise_idx) == len(poisoned.poison_idx)
    assert torch.equal(poisoned.labels[poisoned.noise_idx], data[1][poisoned.noise_idx])


# ---- cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LEARNED)
def test_second_fit_loads_from_disk(
    name: str,
    fitted: dict[str, FittedAttack],
    data: tuple[torch.Tensor, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_training(*args: Any) -> None:
        raise AssertionError("fit trained again instead of loading the cache")

    again = build(name)
    monkeypatch.setattr(type(again), "_train", no_training)
    g = gen(0)
    again.fit(*data, g)
    assert again.fitted and again.fit_from_cache
    assert torch.equal(
        torch.randint(0, 2**30, (4,), generator=g),
        torch.randint(0, 2**30, (4,), generator=_after_one_draw(gen(0))),
    )
    images, labels = data
    assert torch.equal(
        again.apply(images, labels, gen(5)), fitted[name].apply(images, labels, gen(5))
    )
    files = list(Path(cache_dir(), "attacks").glob("*.pt"))
    tag = "surrogate" if name in ("lc", "advnoise") else name
    assert any(f.name.startswith(tag + "-") for f in files)
    assert not any(f.name.endswith(".tmp") for f in files)


def _after_one_draw(g: torch.Generator) -> torch.Generator:
    """`g` after the one draw `fit` makes (its training seed)."""
    torch.randint(0, 2**62, (1,), generator=g)
    return g


def test_cache_key_depends_on_data_seed_and_fit_params(
    data: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, labels = data
    attack = build("ssba")
    path = attack.cache_path(images, labels, 0)
    assert path == build("ssba").cache_path(images, labels, 0)
    assert path == build("ssba", batch_size=7).cache_path(images, labels, 0), "apply-only param"
    assert path != attack.cache_path(images, labels, 1)
    assert path != build("ssba", fit_steps=5).cache_path(images, labels, 0)
    flipped = images.clone()
    flipped[0, 0, 0, 0] ^= 1
    assert path != attack.cache_path(flipped, labels, 0)
    lc_path = build("lc").cache_path(images, labels, 0)
    assert lc_path == build("lc", eps=4.0, target=2).cache_path(images, labels, 0)
    assert lc_path == build("advnoise").cache_path(images, labels, 0), "shared surrogate"


def _fit_after_barrier(barrier: Any, results: Any) -> None:
    """In a spawned process: wait for the sibling, fit ssba on new toy data, report a cache hit."""
    torch.set_num_threads(1)
    attack = build("ssba")
    images, labels = toy_data(seed=7)
    barrier.wait(timeout=120)
    attack.fit(images, labels, gen(7))
    results.put(attack.fit_from_cache)


def test_two_processes_fit_once_and_the_other_loads_it() -> None:
    """Two sweep workers needing one fit at once: one trains it, the other waits and loads."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_fit_after_barrier, args=(barrier, results)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert sorted(results.get(timeout=5) for _ in workers) == [False, True]
