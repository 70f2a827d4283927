"""Resize, crop, flip and normalize without torchvision; records SDXL's original size and crop."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ImageTransform:
    resolution: int
    center_crop: bool = True
    random_flip: bool = False

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
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        return {
            "pixel_values": pixels,
            "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor((top, left)),
        }
