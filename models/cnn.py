"""Small convolutional network for image-like rows (e.g. digits as 8x8 pixels)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Conv-ReLU(-pool) stages, then a dense head; logits out.

    Takes the same flat [batch, height*width] features as the MLP and reshapes inside, so both
    families share one preprocessing and one exported input signature.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        n_classes: int,
        channels: Sequence[int],
        head_width: int,
        dropout: float,
    ):
        super().__init__()
        height, width = image_shape
        self.image_shape = (int(height), int(width))
        stages: list[nn.Module] = []
        channels_in = 1
        for index, channels_out in enumerate(channels):
            stages += [nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1), nn.ReLU()]
            if index < len(channels) - 1 and min(height, width) >= 4:
                stages.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            channels_in = channels_out
        self.features = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels_in * height * width, head_width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(head_width, n_classes),
        )

    def forward(self, features: Tensor) -> Tensor:
        images = features.reshape(-1, 1, *self.image_shape)
        return self.head(self.features(images))
