"""Images out: labelled grids, and PNG files that carry their generation parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


def image_grid(rows: list[list[Image.Image]], row_labels: list[str], col_labels: list[str]) -> Image.Image:
    """A labelled grid: one row per prompt, one column per setting."""
    w, h = rows[0][0].size
    cell = max(w, 112)
    left, top = 8, 16
    grid = Image.new("RGB", (left + cell * len(col_labels), top + (cell + 12) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        draw.text((left + j * cell + 2, 2), label, fill="black")
    for i, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + i * (cell + 12)
        for j, image in enumerate(row):
            grid.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (left + j * cell, y))
        draw.text((left, y + cell), label[: cell * len(col_labels) // 6], fill="black")
    return grid


def png_parameters(prompt: str, seed: int, info: dict[str, Any]) -> Any:
    """PNG text chunks: an AUTOMATIC1111-style 'parameters' line and the full JSON record."""
    import json

    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    neg = f"\nNegative prompt: {info['negative_prompt']}" if info.get("negative_prompt") else ""
    line = (f"{prompt}{neg}\nSteps: {info['steps']}, Sampler: {info['scheduler'].upper()}, "
            f"CFG scale: {info['guidance']}, Seed: {seed}, Model: {info.get('model', '')}")  # fmt: skip
    meta.add_text("parameters", line)
    meta.add_text("lcmkit", json.dumps({"prompt": prompt, "seed": seed, **info}))
    return meta


def save_images(
    images: list[Image.Image], prompts: list[str], out: str | Path, seed: int, info: dict[str, Any], overwrite: bool
) -> Path:
    """NNNN-seedS.png files with their generation parameters in PNG text chunks; never overwrites silently."""
    from lcmkit.errors import ConfigError

    folder = Path(out)
    paths = [folder / f"{i:04d}-seed{seed + i}.png" for i in range(len(images))]
    clash = next((p for p in paths if p.exists()), None)
    if clash is not None and not overwrite:
        raise ConfigError(f"{clash} exists: pass --overwrite or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    for i, (path, prompt, image) in enumerate(zip(paths, prompts, images)):
        image.save(path, pnginfo=png_parameters(prompt, seed + i, info))
    return folder
