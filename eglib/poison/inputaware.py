"""Input-aware dynamic backdoor (Nguyen & Tran 2020): a generated trigger and mask per image."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eglib.config import default_device
from eglib.data import iterate_batches, to_float
from eglib.models import MODELS, list_models, make_model
from eglib.params import check_float, check_int
from eglib.poison._fitted import (
    FittedAttack,
    State,
    check_labelled,
    load_module_state,
    module_state,
    seeded,
)
from eglib.poison.base import register_attack
from eglib.poison.ops import check_images, to_uint8

_EPS = 1e-7  # the reference's EPSILON: keeps divisions and the output squashing finite


def _block(c_in: int, c_out: int, relu: bool = True) -> nn.Sequential:
    """3x3 conv + BatchNorm (+ ReLU), the reference's Conv2dBlock."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, 1, 1),
        nn.BatchNorm2d(c_out, momentum=0.05),
    ]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def pyramid_depth(height: int, width: int, max_depth: int = 3) -> int:
    """Down-sampling levels (<= max_depth) that halve both sides exactly: 3 at 32 px, 2 at 28 px."""
    depth = 0
    while depth < max_depth and height % 2 ** (depth + 1) == 0 and width % 2 ** (depth + 1) == 0:
        depth += 1
    return depth


class TriggerNet(nn.Sequential):
    """The reference generator: conv-BN-ReLU encoder/decoder, output squashed into (0, 1).

    Per level down: two blocks and a 2x2 max-pool, widths `width` x 1, 2, 4, ...; a middle
    block; per level up: 2x nearest upsampling and two blocks halving the width, the last
    one (no ReLU) giving `out_channels`. Output tanh(z) / (2 + eps) + 0.5. Input and output
    float (N, C, H, W); H and W must be divisible by 2**depth.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int, depth: int) -> None:
        widths = [width * 2**i for i in range(depth)] or [width]
        layers: list[nn.Module] = []
        current = in_channels
        for w in widths[:depth]:
            layers += [_block(current, w), _block(w, w), nn.MaxPool2d(2)]
            current = w
        layers.append(_block(current, current))
        for level in reversed(range(depth)):
            w = widths[level]
            last = level == 0
            nxt = out_channels if last else widths[level - 1]
            layers += [nn.Upsample(scale_factor=2), _block(w, w), _block(w, nxt, relu=not last)]
        if depth == 0:
            layers.append(_block(current, out_channels, relu=False))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Squashed output in (0, 1)."""
        return torch.tanh(super().forward(x)) / (2 + _EPS) + 0.5


def threshold(mask: torch.Tensor) -> torch.Tensor:
    """The reference's soft step: tanh(20 m - 10) / (2 + eps) + 0.5, near 0 below 0.5, 1 above."""
    return torch.tanh(mask * 20 - 10) / (2 + _EPS) + 0.5


def diversity_loss(
    x1: torch.Tensor, x2: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor
) -> torch.Tensor:
    """mean over pairs of ||x1 - x2|| / ||out1 - out2|| (RMS distances): different inputs must
    get different triggers (the reference's diversity loss)."""
    d_in = (x1 - x2).square().mean(dim=(1, 2, 3)).sqrt()
    d_out = (out1 - out2).square().mean(dim=(1, 2, 3)).sqrt()
    return (d_in / (d_out + _EPS)).mean()


@register_attack
class InputAware(FittedAttack):
    """Each image gets its own trigger: x + (pattern(x) - x) * mask(x), both generated from x.

    `fit` follows the reference's two phases on the clean data. (1) `mask_epochs` epochs train
    the mask net alone: `lambda_norm` x mean(relu(mask - `mask_density`)) (small masks) +
    `lambda_div` x diversity (different images, different masks); then the mask net is frozen.
    (2) `fit_epochs` epochs train the pattern net jointly with a surrogate classifier
    (`classifier`, default cnn-small): in each batch of `fit_batch_size`, a `fit_rate`
    share gets its own trigger and the poison label, `cross_ratio` times as many get the
    trigger of another image and keep their label (cross-trigger samples: a trigger must not
    work on other images), the rest stay clean; loss = cross-entropy + `lambda_div` x pattern
    diversity. Adam(0.5, 0.9) for the generators (`lr_g`, `lr_m`), SGD(0.9, wd 5e-4, `lr_c`)
    for the classifier. Only the two generators are kept.
    `apply` is deterministic (eval-mode networks); `apply_noise` gives the cross-trigger
    samples (each image gets the trigger of another image of the batch, paired by a
    permutation drawn from the generator) that `poison_dataset` adds with their true labels.

    Threat model: the original trains the victim jointly with the generator (the attacker
    controls training). Here the attacker only poisons data, as in our spec: the generator
    is trained with a surrogate in `fit`, and the victim is then trained from scratch on the
    poisoned set made by `apply` / `apply_noise` (as BackdoorBench does when it exports
    input-aware poisoned data).
    Source defaults (BackdoorBench `config/attack/inputaware/cifar10.yaml`, BackdoorBox
    `core/attacks/IAD.py`): lr_G = lr_C = lr_M = 0.01, lambda_div 1, lambda_norm 100,
    mask_density 0.032, 25 mask epochs (lr_M x 0.1 at 10 and 20) then 100 joint epochs,
    batch 128, rate 0.1, cross samples as many as poisoned ones; generator width 32 with 3
    levels (CIFAR) or 16 with 2 (MNIST); random crop 5 / rotation 10 on classifier inputs.
    Adaptation: 5 mask + 10 joint epochs by default (CPU budget; constant learning rates,
    so the mask milestones never trigger), no augmentation of the surrogate's inputs, no
    input normalisation (patterns live in [0, 1] pixel space), width 16 for grayscale and
    32 for colour (`width` None), levels from the image size (2 at 28 px, 3 at 32 px).
    """

    name = "inputaware"
    fit_param_names: ClassVar[tuple[str, ...]] = (
        "target",
        "label_policy",
        "num_classes",
        "width",
        "classifier",
        "mask_density",
        "lambda_norm",
        "lambda_div",
        "lr_g",
        "lr_m",
        "lr_c",
        "fit_rate",
        "cross_ratio",
        "mask_epochs",
        "fit_epochs",
        "fit_batch_size",
    )
    quick_params: ClassVar[dict[str, Any]] = {
        "fit_size": 512,
        "width": 8,
        "mask_epochs": 1,
        "fit_epochs": 1,
        "fit_batch_size": 64,
    }

    def __init__(
        self,
        *,
        width: int | None = None,
        classifier: str = "cnn-small",
        mask_density: float = 0.032,
        lambda_norm: float = 100.0,
        lambda_div: float = 1.0,
        lr_g: float = 0.01,
        lr_m: float = 0.01,
        lr_c: float = 0.01,
        fit_rate: float = 0.1,
        cross_ratio: float = 1.0,
        mask_epochs: int = 5,
        fit_epochs: int = 10,
        fit_batch_size: int = 128,
        batch_size: int = 512,
        **base: Any,
    ) -> None:
        super().__init__(**base)
        if width is not None and (
            isinstance(width, bool) or not isinstance(width, int) or width < 1
        ):
            raise ValueError(f"width={width!r}; allowed: None (16 gray / 32 colour) or an int >= 1")
        if not isinstance(classifier, str) or classifier not in MODELS:
            raise ValueError(f"classifier={classifier!r}; allowed: {list_models()}")
        check_float("mask_density", mask_density, low=0.0, high=1.0)
        check_float("fit_rate", fit_rate, low=1e-6, high=0.5)
        check_float("cross_ratio", cross_ratio, low=0.0, high=4.0)
        for label, value in (("lambda_norm", lambda_norm), ("lambda_div", lambda_div)):
            check_float(label, value, low=0.0, high=1e6)
        for label, value in (("lr_g", lr_g), ("lr_m", lr_m), ("lr_c", lr_c)):
            check_float(label, value, low=1e-8, high=1.0)
        check_int("mask_epochs", mask_epochs, 0)
        check_int("fit_epochs", fit_epochs, 1)
        check_int("batch_size", batch_size, 1)
        check_int("fit_batch_size", fit_batch_size, 4)
        self.width = width
        self.classifier = classifier
        self.mask_density = float(mask_density)
        self.lambda_norm = float(lambda_norm)
        self.lambda_div = float(lambda_div)
        self.lr_g, self.lr_m, self.lr_c = float(lr_g), float(lr_m), float(lr_c)
        self.fit_rate = float(fit_rate)
        self.cross_ratio = float(cross_ratio)
        self.mask_epochs = mask_epochs
        self.fit_epochs = fit_epochs
        self.fit_batch_size = fit_batch_size
        self.batch_size = batch_size
        self._pattern: TriggerNet | None = None
        self._mask: TriggerNet | None = None

    def _networks(self, shape: tuple[int, ...]) -> tuple[TriggerNet, TriggerNet]:
        """Fresh (pattern net, mask net) for images of `shape` (C, H, W)."""
        channels, height, width_px = shape
        width = self.width if self.width is not None else (16 if channels == 1 else 32)
        depth = pyramid_depth(height, width_px)
        return TriggerNet(channels, channels, width, depth), TriggerNet(channels, 1, width, depth)

    def _pairs(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        """One epoch of (batch, other batch) pairs from two independent shuffles (float images)."""
        first = iterate_batches(
            images, labels, self.fit_batch_size, shuffle=True, generator=generator, drop_last=False
        )
        second = iterate_batches(
            images, labels, self.fit_batch_size, shuffle=True, generator=generator, drop_last=False
        )
        for (x1, y1), (x2, y2) in zip(first, second, strict=True):
            yield (to_float(x1), y1), (to_float(x2), y2)

    def _train(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> State:
        """Phase 1: the mask net alone; phase 2: pattern net + surrogate classifier jointly."""
        generator = torch.Generator().manual_seed(seed)
        device = default_device()
        with seeded(seed):
            pattern, mask = self._networks(tuple(images.shape[1:]))
            classifier = make_model(self.classifier, self.num_classes, images.shape[1])
        pattern, mask, classifier = pattern.to(device), mask.to(device), classifier.to(device)
        data, targets = images.to(device), labels.to(device)
        epochs = tqdm(
            range(self.mask_epochs + self.fit_epochs),
            desc="inputaware fit",
            disable=not self._progress,
        )

        opt_m = torch.optim.Adam(mask.parameters(), lr=self.lr_m, betas=(0.5, 0.9))
        mask.train()
        for _ in range(self.mask_epochs):  # loop over epochs
            for (x1, _), (x2, _) in self._pairs(data, targets, generator):  # loop over batches
                m1, m2 = threshold(mask(x1)), threshold(mask(x2))
                loss = self.lambda_norm * F.relu(m1 - self.mask_density).mean()
                loss = loss + self.lambda_div * diversity_loss(x1, x2, m1, m2)
                opt_m.zero_grad(set_to_none=True)
                loss.backward()
                opt_m.step()
            epochs.update()
        mask.eval().requires_grad_(False)

        opt_g = torch.optim.Adam(pattern.parameters(), lr=self.lr_g, betas=(0.5, 0.9))
        opt_c = torch.optim.SGD(
            classifier.parameters(), lr=self.lr_c, momentum=0.9, weight_decay=5e-4
        )
        pattern.train()
        classifier.train()
        for _ in range(self.fit_epochs):  # loop over epochs
            for (x1, y1), (x2, _) in self._pairs(data, targets, generator):  # loop over batches
                n_bd = max(1, int(self.fit_rate * len(x1)))
                n_cross = int(self.cross_ratio * n_bd)
                p1, p2 = pattern(x1[:n_bd]), pattern(x2[:n_bd])
                bd = x1[:n_bd] + (p1 - x1[:n_bd]) * threshold(mask(x1[:n_bd]))
                x_cross, partner = x1[n_bd : n_bd + n_cross], x2[n_bd : n_bd + n_cross]
                cross = x_cross + (pattern(partner) - x_cross) * threshold(mask(partner))
                inputs = torch.cat([bd, cross, x1[n_bd + n_cross :]])
                wanted = torch.cat([self.poison_labels(y1[:n_bd]), y1[n_bd:]])
                loss = F.cross_entropy(classifier(inputs), wanted)
                loss = loss + self.lambda_div * diversity_loss(x1[:n_bd], x2[:n_bd], p1, p2)
                opt_g.zero_grad(set_to_none=True)
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                opt_g.step()
                opt_c.step()
            epochs.update()
        epochs.close()
        return {**module_state("pattern", pattern), **module_state("mask", mask)}

    def _load(self, state: State) -> None:
        """Rebuild the pattern and mask nets."""
        assert self._shape is not None
        pattern, mask = self._networks(self._shape)
        self._pattern = load_module_state("pattern", pattern, state)
        self._mask = load_module_state("mask", mask, state)

    def _blend(self, images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """uint8 images with the trigger generated from `sources` (same shape): x + (p - x) m."""
        self._require_fit(images)
        assert self._pattern is not None and self._mask is not None
        pattern, mask = self._pattern.to(images.device), self._mask.to(images.device)
        out = []
        with torch.no_grad():
            for lo in range(0, len(images), self.batch_size):  # loop over batches
                x = to_float(images[lo : lo + self.batch_size])
                s = to_float(sources[lo : lo + self.batch_size])
                out.append(x + (pattern(s) - x) * threshold(mask(s)))
        if not out:
            return images.clone()
        return to_uint8(torch.cat(out) * 255)

    def masks(self, images: torch.Tensor) -> torch.Tensor:
        """Float masks (N, 1, H, W) in (0, 1) the mask net gives uint8 `images`."""
        self._require_fit(images)
        assert self._mask is not None
        with torch.no_grad():
            return threshold(self._mask.to(images.device)(to_float(images)))

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Copies of uint8 `images`, each with the trigger generated from itself."""
        check_labelled(images, labels)
        return self._blend(images, images)

    def apply_noise(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cross-trigger copies: image i gets the trigger of image partner(i) != i (if N > 1)."""
        check_images(images)
        order = torch.randperm(len(images), generator=generator).to(images.device)
        partner = torch.empty_like(order)
        partner[order] = order.roll(-1)
        return self._blend(images, images[partner])
