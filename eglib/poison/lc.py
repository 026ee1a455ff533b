"""Label-consistent backdoor (Turner, Tsipras & Madry 2019): adversarial target images + corners."""

from __future__ import annotations

from typing import Any

import torch

from eglib.params import check_float
from eglib.poison._fitted import check_labelled
from eglib.poison._surrogate import SurrogateAttack
from eglib.poison.base import register_attack
from eglib.poison.ops import check_images

LAYOUTS = ("all-corners", "bottom-right")

# the 3x3 sign pattern of the left corners (+1 = brighten, -1 = darken); right corners use it
# mirrored left-right (Turner et al.'s released trigger, as in BackdoorBench
# utils/bd_img_transform/lc.py)
_LEFT_PATTERN = ((1, -1, -1), (-1, 1, -1), (1, -1, 1))


def corner_signs(height: int, width: int, layout: str) -> torch.Tensor:
    """int16 (height, width) map: the 3x3 sign patterns at the corners of `layout`, 0 elsewhere."""
    left = torch.tensor(_LEFT_PATTERN, dtype=torch.int16)
    signs = torch.zeros(height, width, dtype=torch.int16)
    signs[-3:, -3:] = left.flip(1)
    if layout == "all-corners":
        signs[:3, :3] = left
        signs[-3:, :3] = left
        signs[:3, -3:] = left.flip(1)
    return signs


@register_attack
class LabelConsistent(SurrogateAttack):
    """Clean-label: target-class images made hard by PGD on a surrogate, then a corner trigger.

    `apply` moves every row whose label is the target by untargeted L_inf PGD away from that
    label on the surrogate (so its natural features no longer explain the label and the
    network has to lean on the trigger), then adds the trigger to every row: a 3x3 +-1 sign
    pattern at the corners of `layout`, times `amplitude` x 255, clipped to [0, 255]. Rows of
    other classes get the trigger only; `apply_test` (the backdoor test set) stamps the
    trigger alone on every row, as in the paper, where test images carry no perturbation.
    `poison_dataset` poisons only target-class rows (clean_label); labels stay unchanged.

    Source defaults: BackdoorBox `core/attacks/LabelConsistent.py` (PGD eps 8/255, step
    1.5/255, 100 steps, no random start, against a benign model); BackdoorBench
    `config/attack/lc/cifar10.yaml` (reduced_amplitude 1, "all-corners" trigger, target 0,
    all-to-one, rate 0.1; its perturbed images come precomputed at eps 16/255 from Turner
    et al.'s adversarially trained model).
    Adaptation: the surrogate is our `cnn-small` trained on the clean data in `fit` (cached);
    PGD takes 20 steps of 2/255 (it reaches the eps ball's surface in 4 steps; 100 steps
    cost 5x on CPU for little change) from a random start drawn from the `apply` generator,
    so `apply` is deterministic for a given generator state. The trigger stays 3x3 pixels at
    28 px and 32 px (BackdoorBench resizes its 32 px mask nearest-neighbour instead).
    Parameters: `layout` in `LAYOUTS`; `amplitude` in [0, 1]; PGD and surrogate parameters
    as in `SurrogateAttack`; `fit_size`, `progress` as in `FittedAttack`.
    """

    name = "lc"
    clean_label = True

    def __init__(self, *, layout: str = "all-corners", amplitude: float = 1.0, **rest: Any) -> None:
        super().__init__(**rest)
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}; allowed: {LAYOUTS}")
        check_float("amplitude", amplitude, low=0.0, high=1.0)
        self.layout = layout
        self.amplitude = float(amplitude)

    def stamp(self, images: torch.Tensor) -> torch.Tensor:
        """Copies of uint8 `images` (N, C, H, W) with the corner trigger added and clipped."""
        signs = corner_signs(images.shape[2], images.shape[3], self.layout).to(images.device)
        delta = signs * round(self.amplitude * 255)
        return (images.to(torch.int16) + delta).clamp(0, 255).to(torch.uint8)

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """PGD on the target-class rows (random start from `generator`), then the trigger on all."""
        self._require_fit(images)
        check_labelled(images, labels)
        out = images.clone()
        rows = labels.to(images.device) == self.target
        if bool(rows.any()):
            out[rows] = self.adversarial(images[rows], labels[rows.to(labels.device)], generator)
        return self.stamp(out)

    def apply_test(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The test-time trigger: the corner pattern alone, whatever the labels (needs no fit)."""
        check_images(images)
        return self.stamp(images)
