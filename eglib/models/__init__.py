"""Model zoo: CIFAR-style networks made of named stages, built by name with `make_model`."""

from __future__ import annotations

from eglib.models import mobilenet, resnet, vgg  # importing registers the models
from eglib.models.base import StagedNet, StageInfo
from eglib.models.registry import MODELS, list_models, make_model, register_model

__all__ = [
    "MODELS",
    "StageInfo",
    "StagedNet",
    "list_models",
    "make_model",
    "mobilenet",
    "register_model",
    "resnet",
    "vgg",
]
