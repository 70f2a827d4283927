"""Decoding with a size bound, filtering, resize, crop, flip and normalize without torchvision; records SDXL's
original size and crop."""

from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

MAX_PIXELS = 64 * 1024 * 1024
"""Images above this many pixels are skipped before decoding (a decompression bomb cannot exhaust memory)."""


class ImageTooLarge(ValueError):
    pass


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded bytes; the size in the header is checked before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLarge(str(e)) from None
    if image.width * image.height > max_pixels:
        raise ImageTooLarge(f"{image.width}x{image.height} is more than {max_pixels} pixels")
    image.load()
    return image


@dataclass(frozen=True)
class ImageTransform:
    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    min_size: int = 0
    """Skip images whose shorter side is below this (0: keep all)."""
    max_aspect: float = 0.0
    """Skip images whose long/short side ratio is above this (0: keep all)."""

    def reject(self, image: Image.Image) -> str | None:
        """Why this image is filtered out, or None."""
        short, long = sorted(image.size)
        if short < max(1, self.min_size):
            return "below minimum size"
        if self.max_aspect and long / short > self.max_aspect:
            return "aspect ratio above maximum"
        return None

    def __call__(self, image: Image.Image, rng: random.Random) -> dict[str, torch.Tensor]:
        """-> pixel_values in [-1, 1] (3, R, R), original_size (h, w), crop_top_left (top, left)."""
        image = image.convert("RGB")
        original_size = (image.height, image.width)
        r = self.resolution
        scale = r / min(image.width, image.height)
        size = (max(r, round(image.width * scale)), max(r, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        if self.center_crop:
            top, left = (image.height - r) // 2, (image.width - r) // 2
        else:
            top, left = rng.randint(0, image.height - r), rng.randint(0, image.width - r)
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = size[0] - left - r  # the crop as seen in the flipped original (SDXL's crop conditioning)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        return {
            "pixel_values": pixels,
            "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor((top, left)),
        }
