"""Attacks that perturb images with PGD against a surrogate classifier trained on clean data."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from eglib.data import to_float
from eglib.models import MODELS, list_models, make_model
from eglib.models.base import StagedNet
from eglib.params import check_bool, check_float, check_int
from eglib.poison._fitted import FittedAttack, State, load_module_state, module_state
from eglib.poison._pgd import pgd_away
from eglib.poison.ops import to_uint8
from eglib.train import TrainSettings, train_model


class SurrogateAttack(FittedAttack):
    """Base of `lc` and `advnoise`: `fit` trains a surrogate, `adversarial` runs PGD against it.

    `fit` trains `surrogate` (a model name from `eglib.models`) on the clean training data
    with `eglib.train.train_model` for `surrogate_epochs` epochs of `surrogate_batch_size`
    (SGD + cosine, crop augmentation, the library defaults). Every attack of this family
    shares the cached surrogate (cache tag 'surrogate'): lc and advnoise fit it once.
    PGD: L_inf radius `eps` and step `step_size` in uint8 pixel units (8 means 8/255),
    `steps` iterations, uniform random start drawn from the `apply` generator when
    `random_start`.
    """

    cache_tag: ClassVar[str | None] = "surrogate"
    fit_param_names: ClassVar[tuple[str, ...]] = (
        "num_classes",
        "surrogate",
        "surrogate_epochs",
        "surrogate_batch_size",
    )
    quick_params: ClassVar[dict[str, Any]] = {
        "fit_size": 512,
        "surrogate_epochs": 1,
        "surrogate_batch_size": 64,
        "steps": 5,
    }

    def __init__(
        self,
        *,
        eps: float = 8.0,
        step_size: float = 2.0,
        steps: int = 20,
        random_start: bool = True,
        surrogate: str = "cnn-small",
        surrogate_epochs: int = 10,
        surrogate_batch_size: int = 128,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        check_float("eps", eps, low=0.0, high=255.0)
        check_float("step_size", step_size, low=0.0, high=255.0)
        check_int("steps", steps, 1)
        check_bool("random_start", random_start)
        check_int("surrogate_epochs", surrogate_epochs, 1)
        check_int("surrogate_batch_size", surrogate_batch_size, 2)
        if not isinstance(surrogate, str) or surrogate not in MODELS:
            raise ValueError(f"surrogate={surrogate!r}; allowed: {list_models()}")
        self.eps = float(eps)
        self.step_size = float(step_size)
        self.steps = steps
        self.random_start = random_start
        self.surrogate = surrogate
        self.surrogate_epochs = surrogate_epochs
        self.surrogate_batch_size = surrogate_batch_size
        self._model: StagedNet | None = None

    def _train(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> State:
        """Train the surrogate classifier on the clean images; return its weights."""
        model = make_model(self.surrogate, self.num_classes, images.shape[1])
        settings = TrainSettings(epochs=self.surrogate_epochs, batch_size=self.surrogate_batch_size)
        train_model(model, images, labels, settings, seed=seed, progress=self._progress)
        return module_state("surrogate", model)

    def _load(self, state: State) -> None:
        """Rebuild the surrogate from its saved weights."""
        assert self._shape is not None
        model = make_model(self.surrogate, self.num_classes, self._shape[0])
        self._model = load_module_state("surrogate", model, state)

    def adversarial(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """uint8 `images` moved by PGD away from `labels` on the surrogate (|change| <= eps)."""
        self._require_fit(images)
        assert self._model is not None
        model = self._model.to(images.device)
        x = pgd_away(
            model,
            to_float(images),
            labels.to(images.device),
            eps=self.eps / 255,
            step_size=self.step_size / 255,
            steps=self.steps,
            generator=generator if self.random_start else None,
        )
        return to_uint8(x * 255)
