"""Small models that several chapters share. Technique-specific models live with their technique.

Introduced in Chapter 0.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvNet", "MLP", "SmallCNN"]


class SmallCNN(nn.Module):
    """A two-block CNN classifier for small images (digits 8×8 up to CIFAR 32×32).

    ``conv(3×3) → BN → ReLU → maxpool`` twice, global average pooling, then a linear head.
    ``features(x)`` returns the pooled features ``(B, 2·width)`` that the diffusion chapters use
    as a feature space for their Fréchet distance. Introduced in Chapter 0.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or width < 1:
            raise ValueError(
                f"SmallCNN needs in_channels >= 1, num_classes >= 2, width >= 1; got {in_channels}, {num_classes}, {width}."
            )
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: ``(B, C, H, W) -> (B, 2·width)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: ``(B, C, H, W) -> (B, num_classes)``."""
        return self.head(self.features(x))


class MLP(nn.Module):
    """A one-hidden-layer perceptron for small images: flatten, ``Linear → ReLU``, a linear head.

    The same ``features``/``head`` split as :class:`SmallCNN`, so code that needs penultimate
    features (a gradient embedding, a probe) takes either. Introduced in Chapter 3.
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        if in_features < 1 or num_classes < 2 or hidden < 1:
            raise ValueError(
                f"MLP needs in_features >= 1, num_classes >= 2, hidden >= 1; got {in_features}, {num_classes}, {hidden}."
            )
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden features: ``(B, ...) -> (B, hidden)``; the input is flattened."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: ``(B, ...) -> (B, num_classes)``."""
        return self.head(self.features(x))


class ConvNet(nn.Module):
    r"""The ConvNet of dataset distillation (MTT, DATM, LAD): ``depth`` blocks, then one linear classifier.

    Each block is ``conv 3×3 (padding 1) → instance norm → ReLU → average-pool 2×2``; instance norm
    is ``GroupNorm(width, width)`` with an affine scale and shift (one group per channel, so it has
    no running statistics and a network is exactly its parameters). With image side :math:`S` the
    classifier sees :math:`\text{width} \cdot (S / 2^{\text{depth}})^2` features. The same
    ``body``/``head`` split as :class:`SmallCNN`. Introduced in Chapter 4.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 128, depth: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        if min(in_channels, width, depth, image_size) < 1 or num_classes < 2:
            raise ValueError(f"ConvNet needs in_channels, width, depth, image_size >= 1 and num_classes >= 2; got "
                             f"{in_channels}, {width}, {depth}, {image_size} and {num_classes}.")
        if image_size % 2**depth:
            raise ValueError(f"image_size={image_size} must be divisible by 2**depth = {2**depth}; "
                             f"use depth <= {(image_size & -image_size).bit_length() - 1} or another image size.")
        blocks: list[nn.Module] = []
        for d in range(depth):
            blocks += [nn.Conv2d(in_channels if d == 0 else width, width, 3, padding=1),
                       nn.GroupNorm(width, width, affine=True), nn.ReLU(), nn.AvgPool2d(2)]
        self.body = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(width * (image_size // 2**depth) ** 2, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features of the last block: ``(B, C, S, S) -> (B, width·(S/2^depth)²)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: ``(B, C, S, S) -> (B, num_classes)``."""
        return self.head(self.features(x))
