"""Images -> the encoder's pixel views: its checkpoint's own image processor, a plain resize, or LLaVA-HD style views
(a global thumbnail plus a grid of high-resolution tiles).

Where they enter the method: docs/method.md "Token pipeline", step 1. An encoder loaded from a folder with a
``preprocessor_config.json`` is fed by transformers' image processor of that folder (resize, crop, rescale and
normalise exactly as the checkpoint was trained; docs/checkpoints.md "Image processing"), optionally after LLaVA-1.5's
pad-to-square with the image mean; encoders built from a config are fed a bicubic resize to their input size.

The thumbnail is the image resized to the encoder's input size; the tiles cut the image resized to
``rows x cols`` times that size. With the ``prefix`` skip policy the thumbnail's tokens are retained (R) and the
tiles' tokens are the skip candidates, merged to N_s (the paper's LLaVA-HD setting).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2
from transformers import AutoImageProcessor

from skipvision.encoders.base import VisionEncoder
from skipvision.errors import UnsupportedModelError


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


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's padding: the image centred on a square of its longer side, filled with ``fill`` (the mean)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class CheckpointImages:
    """PIL image -> [3, H, W] by the transformers image processor saved in ``folder``; with ``square``, padded to a
    square with the processor's mean colour first (LLaVA-1.5's ``image_aspect_ratio: pad``)."""

    def __init__(self, folder: Path, square: bool) -> None:
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.fill = tuple(int(m * 255) for m in self.processor.image_mean) if square else None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.fill is not None:
            image = pad_to_square(image.convert("RGB"), self.fill)
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]  # [3, H, W]


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
    encoder: VisionEncoder, tiles: tuple[int, int] | None
) -> v2.Compose | ThumbnailTiles | CheckpointImages:
    """The per-image transform of ``encoder``: one view ([3, H, W]) or, with a ``tiles`` grid, thumbnail + tiles
    ([V, 3, H, W], resized and normalised with the encoder's statistics, which come from its processor's config)."""
    folder = encoder.image_processor_folder()
    if encoder.pad_to_square and (folder is None or tiles is not None):
        raise UnsupportedModelError(
            "pad_to_square needs the checkpoint's image processor (a folder with preprocessor_config.json) and no tiles"
        )
    if tiles is not None:
        return ThumbnailTiles(encoder.image_size, encoder.mean, encoder.std, tuple(tiles))
    if folder is not None:
        return CheckpointImages(folder, encoder.pad_to_square)
    return image_transform(encoder.image_size, encoder.mean, encoder.std)
