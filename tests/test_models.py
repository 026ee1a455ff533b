"""One parametrised suite over every registered model (shapes, stages, hooks, guards, grads)."""

from __future__ import annotations

import copy
import functools
import math
from collections import OrderedDict
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from eglib.models import MODELS, StagedNet, list_models, make_model

RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
EXPECTED_STAGES = {
    "cnn-small": ("stem", "layer1", "layer2", "layer3"),
    "resnet18": RESNET_STAGES,
    "resnet34": RESNET_STAGES,
    "preact-resnet18": RESNET_STAGES,
    "vgg16": ("block1", "block2", "block3", "block4", "block5"),
    "mobilenetv2": ("stem", *(f"layer{i}" for i in range(1, 8))),
}
EXPECTED_GUARD_STAGE = {
    "cnn-small": "layer1",
    "resnet18": "layer1",
    "resnet34": "layer1",
    "preact-resnet18": "layer1",
    "vgg16": "block2",
    "mobilenetv2": "layer2",
}
# parameters for 3 input channels and 10 classes: resnet18/34 as kuangliu/pytorch-cifar,
# mobilenetv2 as torchvision's with a 10-way head; preact-resnet18 has the paper's final
# BN (+1024 over kuangliu's), vgg16 no conv biases (-4224: BN follows every conv)
EXPECTED_PARAMS = {
    "cnn-small": 78_042,
    "resnet18": 11_173_962,
    "resnet34": 21_282_122,
    "preact-resnet18": 11_172_170,
    "vgg16": 14_724_042,
    "mobilenetv2": 2_236_682,
}
INPUTS = [(1, 28), (3, 32), (3, 16)]  # (channels, size): Fashion-MNIST, CIFAR, the smallest
BATCH = 2

all_models = pytest.mark.parametrize("name", list_models())
all_inputs = pytest.mark.parametrize(("channels", "size"), INPUTS, ids=lambda v: str(v))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Batch-2 passes on shared cores: one thread avoids OpenMP spin-waits (~4x less CPU time)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class CountingGuard(nn.Identity):
    """A stand-in for EigenGuard: multiplies by `scale`, counts its calls in a buffer."""

    calls: torch.Tensor

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * self.scale


def _batch(channels: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(BATCH, channels, size, size, generator=generator)


@functools.cache
def _built(name: str, channels: int) -> StagedNet:
    torch.manual_seed(0)
    return make_model(name, 10, in_channels=channels)


def _model(name: str, channels: int = 3) -> StagedNet:
    """A fresh copy of a built model (building the large ones is the slow part), in eval mode."""
    return copy.deepcopy(_built(name, channels)).eval()


def test_registry_names() -> None:
    assert list_models() == sorted(EXPECTED_STAGES)
    assert set(MODELS) == set(EXPECTED_STAGES)


@all_models
@all_inputs
def test_output_and_feature_info_match_stage_outputs(name: str, channels: int, size: int) -> None:
    model = _model(name, channels)
    seen: dict[str, tuple[int, ...]] = {}
    for stage in model.stages:
        model.stage(stage).register_forward_hook(
            lambda _m, _i, out, stage=stage: seen.__setitem__(stage, tuple(out.shape))
        )
    with torch.no_grad():
        logits = model(_batch(channels, size))
    assert logits.shape == (BATCH, 10)
    assert torch.isfinite(logits).all()
    assert list(seen) == list(model.stages)  # every hook fired, in stage order
    for info in model.feature_info:
        side = math.ceil(size / info.reduction)
        assert seen[info.name] == (BATCH, info.channels, side, side), info


@all_models
def test_architecture(name: str) -> None:
    model = _built(name, 3)
    assert model.stages == EXPECTED_STAGES[name]
    assert tuple(info.name for info in model.feature_info) == model.stages
    reductions = [info.reduction for info in model.feature_info]
    assert reductions == sorted(reductions) and reductions[0] == 1
    assert model.default_guard_stage == EXPECTED_GUARD_STAGE[name]
    assert len(model.guards) == 0
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize(("num_classes", "channels"), [(2, 1), (43, 3)])
def test_sizes_follow_arguments(num_classes: int, channels: int) -> None:
    model = make_model("cnn-small", num_classes, in_channels=channels)
    assert (model.num_classes, model.in_channels) == (num_classes, channels)
    assert model(torch.rand(BATCH, channels, 20, 20)).shape == (BATCH, num_classes)


@all_models
def test_guard_is_applied_and_body_keys_unchanged(name: str) -> None:
    model = _model(name)
    at = model.default_guard_stage
    x = _batch(3, 16)  # small: three forward passes
    keys = set(model.state_dict())
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(x)

    guard = CountingGuard()
    model.guards[at] = guard
    assert model.stage_output_module(at) is guard
    seen: list[torch.Size] = []
    model.stage_output_module(at).register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        guarded = model(x)
    assert int(guard.calls) == 1 and len(seen) == 1
    torch.testing.assert_close(guarded, plain)  # an identity guard changes nothing

    assert set(model.state_dict()) == keys | {f"guards.{at}.calls"}
    result = model.load_state_dict(plain_state, strict=False)  # plain weights load
    assert result.missing_keys == [f"guards.{at}.calls"] and result.unexpected_keys == []

    guard.scale = 0.0  # the guard's output is what the next stage sees
    after = model.stages[model.stages.index(at) + 1]
    inputs: list[torch.Tensor] = []
    model.stage(after).register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        model(x)
    assert int(guard.calls) == 2
    assert len(inputs) == 1 and not inputs[0].any()


@all_models
def test_backward_gives_finite_grads(name: str) -> None:
    model = _model(name, 1).train()
    loss = nn.functional.cross_entropy(model(_batch(1, 16)), torch.tensor([0, 3]))
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name
    first = model.stage(model.stages[0])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first.parameters())


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("resnet-9000", 10, 3), r"unknown model 'resnet-9000'; allowed: \['cnn-small'"),
        (("cnn-small", 1, 3), r"num_classes=1; must be an int >= 2"),
        (("cnn-small", 10, 0), r"in_channels=0; must be an int >= 1"),
        (("cnn-small", 10.0, 3), r"num_classes=10\.0; must be an int >= 2"),
        (("cnn-small", True, 3), r"num_classes=True; must be an int \(not a bool\) >= 2"),
    ],
)
def test_bad_arguments_raise(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_model(*args)


def test_staged_net_default_guard_stage() -> None:
    model = make_model("cnn-small", 10)
    parts = (OrderedDict(model.body.items()), model.head, list(model.feature_info), 10, 3)
    assert StagedNet(*parts).default_guard_stage == "stem"  # None: the first stage
    assert StagedNet(*parts, default_guard_stage="layer2").default_guard_stage == "layer2"
    with pytest.raises(ValueError, match=r"'nowhere'; valid stages: \['stem'"):
        StagedNet(*parts, default_guard_stage="nowhere")
