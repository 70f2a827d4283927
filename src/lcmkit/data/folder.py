"""An image folder as a data source: captions from a .txt beside each image, or metadata.jsonl / metadata.csv
(columns file_name and text, caption or prompt), as in the Hugging Face ImageFolder convention."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lcmkit.data.base import Skip
from lcmkit.errors import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_FIELDS = ("text", "caption", "prompt")


def _metadata_captions(root: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    rows: list[dict] = []
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"{jsonl} line {n} is not valid JSON") from None
    elif table.is_file():
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
    for row in rows:
        name = row.get("file_name")
        text = next((row[k] for k in CAPTION_FIELDS if isinstance(row.get(k), str)), None)
        if name and text is not None:
            captions[str((root / name).resolve())] = text.strip()
    return captions


def scan_folder(path: str) -> tuple[list[str], dict[str, str]]:
    """(image paths in a fixed order, caption per resolved image path). Images without caption stay listed:
    the stream skips and counts them."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--data folder:{path}: {root} is not a folder")
    images = sorted(str(p.resolve()) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ConfigError(f"--data folder:{path}: no image ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    captions = _metadata_captions(root)
    for image in images:
        side = Path(image).with_suffix(".txt")
        if image not in captions and side.is_file():
            captions[image] = side.read_text(errors="replace").strip()
    return images, captions


class FolderSource:
    """Each image file is one unit (and one sample)."""

    def __init__(self, path: str):
        self.images, self.captions = scan_folder(path)
        self.description = f"folder:{path}"

    def units(self) -> list[str]:
        return list(self.images)

    def read(self, unit: str, skip: Skip) -> Iterator[dict[str, Any]]:
        try:
            image: bytes | None = Path(unit).read_bytes()
        except OSError as e:
            skip("unreadable file", f"{unit} ({e})")
            return
        yield {"where": unit, "caption": self.captions.get(unit), "image": image}
