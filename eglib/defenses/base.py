"""The interface every defence implements, the context a run hands it, and the registry."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from eglib.models.base import StagedNet
from eglib.registry import add_entry, check_keywords, lookup

DefenseStage = Literal["none", "architecture", "data", "training", "post"]


@dataclass
class DefenseContext:
    """What a defence may use: the poisoned training set, a model factory and a trainer.

    `images`/`labels` are the (poisoned) training set as the defender sees it; `poison_idx`
    is ground truth kept ONLY for reporting detection quality (AUROC, fraction removed) and
    must never steer a defence. `clean_images`/`clean_labels` are the small clean reserve
    (held out of the training split before poisoning) for defences that need clean data
    (FT, NAD, ANP); defences that do not declare `needs_clean_data` never see it.
    `train(model, images, labels, callbacks=())` trains with the run's settings and seed
    and returns the per-epoch history. `undefended()`, when set, returns the run's cached
    undefended model (state dict, history and run key: the same seed, data and settings) or
    None; the defences that repair or score a model trained on the poisoned data start from
    it instead of training it again (`eglib.defenses.loops.poisoned_model`), and record its
    key in `reused`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    poison_idx: torch.Tensor
    clean_images: torch.Tensor | None
    clean_labels: torch.Tensor | None
    num_classes: int
    model_factory: Callable[[], StagedNet]
    train: Callable[..., list[dict[str, Any]]]
    seed: int
    device: torch.device
    progress: bool = True
    history: list[dict[str, Any]] = field(default_factory=list)
    undefended: Callable[[], UndefendedRun | None] | None = None
    reused: str | None = None


UndefendedRun = tuple[dict[str, torch.Tensor], list[dict[str, Any]], str]
"""A cached undefended run: its model's state dict, its training history and its run key."""


@dataclass
class DefenseOutcome:
    """A defended model and plain-data facts about what the defence did (for the record)."""

    model: StagedNet
    info: dict[str, Any] = field(default_factory=dict)


class Defense(ABC):
    """A backdoor defence: turns a context into a defended model.

    Subclasses set `name`, `stage` ('architecture': changes the model, e.g. EigenGuard;
    'data': filters suspected samples and retrains; 'training': a different training
    procedure, e.g. ABL; 'post': repairs a model trained on the poisoned data, e.g. FT, NAD,
    ANP) and `needs_clean_data`. `starts_from_poisoned_model`: the defence begins with a
    model trained on the poisoned data (`eglib.defenses.loops.poisoned_model`), so it can
    take the cached undefended run of the same config, and a sweep runs it after that run.
    Parameters are validated in `__init__`.
    """

    name: ClassVar[str]
    stage: ClassVar[DefenseStage]
    needs_clean_data: ClassVar[bool] = False
    starts_from_poisoned_model: ClassVar[bool] = False

    def build_model(self, ctx: DefenseContext) -> StagedNet:
        """A fresh model with this defence's architecture (the factory's, unless overridden)."""
        return ctx.model_factory()

    def check_model(self, model: StagedNet) -> None:
        """ValueError if the parameters do not fit `model` (a stage it lacks), checked before
        any data is read; `model` may be a weightless copy on the meta device."""
        return None  # nothing to check unless a defence names stages

    @abstractmethod
    def run(self, ctx: DefenseContext) -> DefenseOutcome:
        """Train (and repair) a model on the context's data; return it with what was done."""

    def params(self) -> dict[str, Any]:
        """The defence's parameters as plain JSON data."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


DEFENSES: dict[str, type[Defense]] = {}


def register_defense(cls: type[Defense]) -> type[Defense]:
    """Class decorator: add a defence to the registry under `cls.name`."""
    return add_entry(DEFENSES, "defence", cls.name, cls)


def make_defense(name: str, **params: Any) -> Defense:
    """Build the defence called `name`; an unknown name or parameter lists the allowed ones."""
    builder = lookup(DEFENSES, "defence", name)
    check_keywords(builder, "defence", name, params)
    return builder(**params)


def recorded_params(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved parameters of defence `name` built with `params` (defaults filled in), as
    a JSON record holds them (tuples as lists): what cached results are checked against."""
    return json.loads(json.dumps(make_defense(name, **dict(params or {})).params()))


def train_on(
    ctx: DefenseContext,
    model: StagedNet,
    keep: torch.Tensor | None = None,
    callbacks: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Train `model` on the context's data, restricted to the boolean mask `keep` if given."""
    images, labels = ctx.images, ctx.labels
    if keep is not None:
        images, labels = images[keep], labels[keep]
    history = ctx.train(model, images, labels, callbacks=callbacks)
    ctx.history.extend(history)
    return history
