"""Images out: labelled grids, and PNG files that carry their generation parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

GUTTER = 6
"""Pixels between tiles, so that neighbouring images do not run into each other."""
BACKGROUND = (214, 214, 214)
"""The grid's grey: it sets tiles apart from each other on white and on black images alike."""


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def image_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """A labelled grid: one row per prompt (its prompt under it), one column per setting (its label above it),
    tiles at least 112 px (small images scaled up without smoothing) with gutters between them."""
    w, _ = rows[0][0].size
    cell = max(w, 112)
    font = _font(12)
    pitch, line = cell + GUTTER, 16
    width = GUTTER + pitch * len(col_labels)
    grid = Image.new("RGB", (width, line + GUTTER + (cell + line + GUTTER) * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        text = _fit(draw, label, font, cell)
        x = GUTTER + j * pitch + (cell - draw.textlength(text, font=font)) / 2
        draw.text((x, 2), text, fill="black", font=font)
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = line + GUTTER + i * (cell + line + GUTTER)
        for j, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (GUTTER + j * pitch, y))
        draw.text((GUTTER, y + cell + 1), _fit(draw, label, font, width - 2 * GUTTER), fill=(70, 70, 70), font=font)
    return grid


def png_parameters(prompt: str, seed: int, info: dict[str, Any]) -> Any:
    """PNG text chunks: an AUTOMATIC1111-style 'parameters' line and the full JSON record."""
    import json

    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    neg = f"\nNegative prompt: {info['negative_prompt']}" if info.get("negative_prompt") else ""
    size = f", Size: {info['size']}" if info.get("size") else ""
    line = (f"{prompt}{neg}\nSteps: {info['steps']}, Sampler: {info['scheduler'].upper()}, "
            f"CFG scale: {info['guidance']}, Seed: {seed}{size}, Model: {info.get('model', '')}")  # fmt: skip
    meta.add_text("parameters", line)
    meta.add_text("lcmkit", json.dumps({"prompt": prompt, "seed": seed, **info}))
    return meta


def image_paths(folder: Path, n: int, seed: int, overwrite: bool) -> list[Path]:
    """The files save_images writes; refuses (before any work, when called first) to overwrite one silently."""
    from lcmkit.errors import ConfigError

    paths = [Path(folder) / f"{i:04d}-seed{seed + i}.png" for i in range(n)]
    clash = next((p for p in paths if p.exists()), None)
    if clash is not None and not overwrite:
        raise ConfigError(f"{clash} exists: pass --overwrite or choose another --out")
    return paths


def save_images(
    images: list[Image.Image], prompts: list[str], out: str | Path, seed: int, info: dict[str, Any], overwrite: bool
) -> Path:
    """NNNN-seedS.png files with their generation parameters in PNG text chunks; never overwrites silently."""
    folder = Path(out)
    paths = image_paths(folder, len(images), seed, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (path, prompt, image) in enumerate(zip(paths, prompts, images)):
        size = f"{image.width}x{image.height}"  # what was written, whatever was asked for
        image.save(path, pnginfo=png_parameters(prompt, seed + i, {**info, "size": size}))
    return folder
