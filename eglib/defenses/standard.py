"""The two reference entries of the defence table: no defence, and EigenGuard."""

from __future__ import annotations

import inspect
from typing import Any

from eglib.defenses.base import Defense, DefenseContext, DefenseOutcome, register_defense, train_on
from eglib.models.base import StagedNet
from eglib.registry import check_keywords


@register_defense
class NoDefense(Defense):
    """Plain end-to-end training on the poisoned data (the undefended baseline)."""

    name = "none"
    stage = "none"

    def run(self, ctx: DefenseContext) -> DefenseOutcome:
        """Train a fresh model on all the data."""
        model = self.build_model(ctx)
        train_on(ctx, model)
        return DefenseOutcome(model)


@register_defense
class EigenGuardDefense(Defense):
    """EigenGuard (the spec's method): a spectral filter layer after a stage, trained end to end.

    Parameters are those of `eglib.guard.EigenGuard` plus `at` (the stage; None: the model's
    `default_guard_stage`).
    """

    name = "eigenguard"
    stage = "architecture"

    def __init__(self, at: str | None = None, **guard_params: Any) -> None:
        from eglib.guard import EigenGuard

        check_keywords(EigenGuard, "defence", self.name, guard_params, also=("at",))
        EigenGuard(**guard_params)  # validates the parameters now, not after training
        self.at = at
        self.guard_params = dict(guard_params)

    def check_model(self, model: StagedNet) -> None:
        """ValueError if `at` is not one of the model's stages."""
        if self.at is not None and self.at not in model.stages:
            raise ValueError(f"at={self.at!r}; the model's stages are {list(model.stages)}")

    def build_model(self, ctx: DefenseContext) -> StagedNet:
        """A fresh model with a guard inserted at `at`."""
        from eglib.guard import insert_guard

        model = ctx.model_factory()
        insert_guard(model, at=self.at, **self.guard_params)
        return model

    def run(self, ctx: DefenseContext) -> DefenseOutcome:
        """Train the guarded model on all the data."""
        model = self.build_model(ctx)
        train_on(ctx, model)
        return DefenseOutcome(
            model, {"guard_stage": self.at or getattr(model, "default_guard_stage", None)}
        )

    def params(self) -> dict[str, Any]:
        """`at` and every guard parameter, defaults filled in (so a cached run trained under
        another guard default is told apart, see `eglib.experiments.stale_defense_params`)."""
        from eglib.guard import EigenGuard

        guard = inspect.signature(EigenGuard).bind(**self.guard_params)
        guard.apply_defaults()
        return {"at": self.at, **guard.arguments}
