"""WebDataset shards (local brace ranges and globs, pipe:, http(s)) -> image + caption samples.

The order is a pure function of (seed, epoch): shards are permuted per epoch, split across
accelerate processes and dataloader workers, shuffled in a seeded buffer, and crops and flips use a
per-sample seeded RNG. So a resumed run sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from ..config import ConfigError
from .transforms import ImageTransform

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_KEYS = ("txt", "caption", "text")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


class DataError(RuntimeError):
    """The data source cannot give a single usable sample."""


def resolve_data(spec: str) -> tuple[list[str], dict[str, str] | None]:
    """--data -> (items, captions): 'folder:PATH' is an image folder (captions per image), anything else shards."""
    if spec.strip().startswith("folder:"):
        from .folder import scan_folder

        return scan_folder(spec.strip()[len("folder:") :])
    return expand_shards(spec), None


def expand_shards(spec: str) -> list[str]:
    """A spec ('wds:' optional; '::' separates several) -> shard URLs. Local ones must exist."""
    spec = spec.strip()
    if spec.startswith("wds:"):
        spec = spec[4:]
    if not spec:
        raise ConfigError("--data is empty: give shards such as '/data/{00000..00099}.tar'")
    urls: list[str] = []
    for part in spec.split("::"):
        for url in braceexpand.braceexpand(part):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
                continue
            path = url[7:] if url.startswith("file://") else url
            path = str(Path(path).expanduser())
            if any(ch in path for ch in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise ConfigError(f"--data {part}: the pattern {path} matches no file")
                urls.extend(found)
            elif Path(path).is_dir():
                found = sorted(str(p) for p in Path(path).glob("*.tar"))
                if not found:
                    raise ConfigError(f"--data {part}: the folder {path} holds no .tar shard")
                urls.extend(found)
            elif not Path(path).is_file():
                raise ConfigError(f"--data {part}: shard {path} does not exist")
            else:
                urls.append(path)
    return urls


def _caption(sample: dict[str, Any]) -> str | None:
    for key in CAPTION_KEYS:
        if key in sample:
            return sample[key].decode("utf-8").strip()
    if "json" in sample:
        meta = json.loads(sample["json"])
        for key in ("caption", "text", "prompt"):
            if isinstance(meta.get(key), str):
                return meta[key].strip()
    return None


def _image(sample: dict[str, Any]) -> Image.Image | None:
    for key in IMAGE_KEYS:
        if key in sample:
            image = Image.open(io.BytesIO(sample[key]))
            image.load()
            return image
    return None


class ShardDataset(IterableDataset):
    """An endless, deterministic stream of transformed samples from WebDataset shards."""

    def __init__(
        self,
        urls: list[str],
        transform: ImageTransform,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        max_epochs: int | None = None,
        captions: dict[str, str] | None = None,
    ):
        """`captions` given: `urls` are image files of a folder (see folder.py), each one sample."""
        self.urls = urls
        self.captions = captions
        self.transform = transform
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.max_epochs = max_epochs
        self.skipped: dict[str, int] = {}

    def _skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if self.skipped[reason] <= 3:
            log.warning("skipping a sample (%s): %s", reason, where)

    def _handler(self, exn: Exception) -> bool:
        self._skip("unreadable shard data", repr(exn)[:200])
        return True

    def _raw_samples(self, epoch: int, unit: int, units: int) -> Iterator[dict[str, Any]]:
        order = list(self.urls)
        random.Random(f"{self.seed}:{epoch}:shards").shuffle(order)
        if self.captions is not None:
            for path in order[unit::units]:
                yield self._file_sample(path)
            return
        by_shard = len(order) >= units
        shards = order[unit::units] if by_shard else order
        index = 0
        for url in shards:
            for sample in tarfile_samples([{"url": url}], handler=self._handler):
                index += 1
                if by_shard or (index - 1) % units == unit:
                    yield sample

    def _file_sample(self, path: str) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": path, "__url__": path}
        try:
            sample[Path(path).suffix.lower().lstrip(".")] = Path(path).read_bytes()
        except OSError as e:
            self._skip("unreadable file", f"{path} ({e})")
        if path in self.captions:
            sample["txt"] = self.captions[path].encode("utf-8")
        return sample

    def _decode(self, sample: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        caption = _caption(sample)
        if caption is None:
            self._skip("missing caption", where)
            return None
        try:
            image = _image(sample)
        except Exception as e:
            self._skip("corrupt image", f"{where} ({e})")
            return None
        if image is None:
            self._skip("missing image", where)
            return None
        rng = random.Random(f"{self.seed}:{epoch}:{where}")
        return {**self.transform(image, rng), "caption": caption}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        units, unit = self.world_size * workers, self.rank * workers + worker
        epoch = 0
        while self.max_epochs is None or epoch < self.max_epochs:
            rng = random.Random(f"{self.seed}:{epoch}:{unit}:buffer")
            buffer: list[dict[str, Any]] = []
            produced = 0
            for raw in self._raw_samples(epoch, unit, units):
                buffer.append(raw)
                if len(buffer) >= self.shuffle_buffer:
                    item = self._decode(buffer.pop(rng.randrange(len(buffer))), epoch)
                    if item is not None:
                        produced += 1
                        yield item
            while buffer:
                item = self._decode(buffer.pop(rng.randrange(len(buffer))), epoch)
                if item is not None:
                    produced += 1
                    yield item
            if produced == 0:
                skipped = ", ".join(f"{n} {r}" for r, n in self.skipped.items()) or "no samples found"
                raise DataError(
                    f"data source {self.urls[0]}{' ...' if len(self.urls) > 1 else ''} "
                    f"gave no usable sample ({skipped})"
                )
            epoch += 1


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "original_size": torch.stack([it["original_size"] for it in items]),
        "crop_top_left": torch.stack([it["crop_top_left"] for it in items]),
        "caption": [it["caption"] for it in items],
    }


def make_dataloader(dataset: ShardDataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
        persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None,
    )  # fmt: skip
