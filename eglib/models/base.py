"""StagedNet: a network made of named stages, so a guard or a hook can be placed by name."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

PENULTIMATE = "penultimate"  # a feature name beside the stages': what the classifier pools


@dataclass(frozen=True)
class StageInfo:
    """One stage: its name, output channels and total stride (input pixels per output pixel)."""

    name: str
    channels: int
    reduction: int


class StagedNet(nn.Module):
    """Stages run in order (`body`), optional guards after named stages, then `head`.

    Input: float (B, C, H, W) in [0, 1]. `forward_features` returns the last stage's output;
    `forward` returns logits (B, num_classes). `guards` maps a stage name to a module applied
    to that stage's output (see `eglib.guard.insert_guard`); the body's parameter names do
    not change when a guard is added, so plain weights load into a guarded model.
    `default_guard_stage` names the stage a guard goes after when none is named.
    """

    def __init__(
        self,
        stages: OrderedDict[str, nn.Module],
        head: nn.Module,
        stage_info: list[StageInfo],
        num_classes: int,
        in_channels: int,
        default_guard_stage: str | None = None,
    ) -> None:
        super().__init__()
        if [s.name for s in stage_info] != list(stages):
            raise ValueError("stage_info names must match the stages, in order")
        if PENULTIMATE in stages:
            raise ValueError(f"no stage may be called {PENULTIMATE!r}: it names a feature")
        self.body = nn.ModuleDict(stages)
        self.head = head
        self.guards = nn.ModuleDict()
        self.feature_info: tuple[StageInfo, ...] = tuple(stage_info)
        self.num_classes = num_classes
        self.in_channels = in_channels
        chosen = self.stages[0] if default_guard_stage is None else default_guard_stage
        if chosen not in self.body:
            raise ValueError(
                f"unknown default_guard_stage {chosen!r}; valid stages: {list(self.body)}"
            )
        # where EigenGuard goes when no stage is named (None: the first stage)
        self.default_guard_stage: str = chosen

    @property
    def stages(self) -> tuple[str, ...]:
        """Names of the stages, input to output."""
        return tuple(self.body.keys())

    def stage(self, name: str) -> nn.Module:
        """The stage module called `name`; an unknown name lists the valid ones."""
        if name not in self.body:
            raise KeyError(f"unknown stage {name!r}; valid stages: {list(self.body)}")
        return self.body[name]

    def stage_output_module(self, name: str) -> nn.Module:
        """The module whose output the next stage sees: the guard after `name`, else the stage."""
        stage = self.stage(name)
        return self.guards[name] if name in self.guards else stage

    def feature_module(self, name: str) -> nn.Module:
        """The module whose output is feature `name`: a stage's output as the next stage sees
        it (`stage_output_module`), or 'penultimate', the map the classifier pools: the head's
        own last layer before its pooling when it has any (a pre-activation ResNet's BN-ReLU,
        MobileNetV2's 1x1 conv), else the last stage's output. Unknown name -> KeyError."""
        if name != PENULTIMATE:
            if name not in self.body:
                raise KeyError(f"unknown feature {name!r}; valid: {[*self.stages, PENULTIMATE]}")
            return self.stage_output_module(name)
        layers = list(self.head.children())
        pool = next((i for i, m in enumerate(layers) if isinstance(m, nn.AdaptiveAvgPool2d)), 0)
        return layers[pool - 1] if pool > 0 else self.stage_output_module(self.stages[-1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Run every stage (and guard) in order; return the last stage's output."""
        for name, stage in self.body.items():
            x = stage(x)
            if name in self.guards:
                x = self.guards[name](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a float batch (B, C, H, W)."""
        return self.head(self.forward_features(x))
