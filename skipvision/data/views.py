"""LLaVA-HD style image views: a global thumbnail plus a grid of high-resolution tiles.

Where they enter the method: docs/method.md "Token pipeline", step 1.

The thumbnail is the image resized to the encoder's input size; the tiles cut the image resized to
``rows x cols`` times that size. With the ``prefix`` skip policy the thumbnail's tokens are retained (R) and the
tiles' tokens are the skip candidates, merged to N_s (the paper's LLaVA-HD setting).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from PIL import Image
from torchvision.transforms import v2


def image_transform(image_size: tuple[int, int], mean: Iterable[float], std: Iterable[float]) -> v2.Compose:
    """PIL image -> normalised float tensor [3, H, W] at the encoder's input size."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(list(image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class ThumbnailTiles:
    """PIL image -> [1 + rows * cols, 3, H, W]: the thumbnail, then the tiles in raster order."""

    def __init__(
        self, image_size: tuple[int, int], mean: Iterable[float], std: Iterable[float], grid: tuple[int, int]
    ) -> None:
        self.rows, self.cols = grid
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"the tile grid must be at least 1 x 1, got {self.rows} x {self.cols}")
        self.height, self.width = image_size
        mean, std = list(mean), list(std)
        self.thumbnail = image_transform(image_size, mean, std)
        self.high_res = image_transform((self.rows * self.height, self.cols * self.width), mean, std)

    @property
    def num_views(self) -> int:
        return 1 + self.rows * self.cols

    def __call__(self, image: Image.Image) -> torch.Tensor:
        thumb = self.thumbnail(image)  # [3, H, W]
        big = self.high_res(image)  # [3, rows*H, cols*W]
        tiles = big.view(3, self.rows, self.height, self.cols, self.width)  # [3, rows, H, cols, W]
        tiles = tiles.permute(1, 3, 0, 2, 4).reshape(-1, 3, self.height, self.width)  # [rows*cols, 3, H, W]
        return torch.cat([thumb[None], tiles])  # [V, 3, H, W]


def image_views(
    image_size: tuple[int, int], mean: Iterable[float], std: Iterable[float], tiles: tuple[int, int] | None
) -> v2.Compose | ThumbnailTiles:
    """The per-image transform: one view ([3, H, W]) or, with a ``tiles`` grid, thumbnail + tiles ([V, 3, H, W])."""
    if tiles is None:
        return image_transform(image_size, mean, std)
    return ThumbnailTiles(image_size, mean, std, tuple(tiles))
