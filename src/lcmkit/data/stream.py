"""A deterministic stream of training samples from any Source (sources.py).

The order is a pure function of (seed, epoch): units are permuted per epoch and split across accelerate
processes and dataloader workers (when there are fewer units than streams, every stream reads all units and
keeps every n-th sample), shuffled in a seeded buffer, and crops, flips and caption dropout use a per-sample
seeded RNG. So every sample is seen once per epoch, and a resumed run sees exactly the batches the
uninterrupted run saw. Bad samples are skipped and counted by reason (over the first pass); the counts
travel with the batches, so the main process can report them even when workers decode.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lcmkit.data.base import UNIT_REASONS, Source
from lcmkit.data.transforms import MAX_PIXELS, ImageTooLarge, ImageTransform, open_image

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data source cannot give a single usable sample."""


class SampleStream(IterableDataset):
    """An endless (or `max_epochs`-long), deterministic stream of transformed samples from a source."""

    def __init__(
        self,
        source: Source,
        transform: ImageTransform,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        max_epochs: int | None = None,
        caption_dropout: float = 0.0,
        max_pixels: int = MAX_PIXELS,
        shuffle: bool = True,
    ):
        """`shuffle=False`: units in the source's order, no buffer (the cache builder's fixed order)."""
        self.source = source
        self.transform = transform
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer) if shuffle else 1
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.max_epochs = max_epochs
        self.caption_dropout = caption_dropout
        self.max_pixels = max_pixels
        self.skipped: dict[str, int] = {}
        self._stream_id = 0
        self._epoch = 0

    def _skip(self, reason: str, where: str) -> None:
        """Count over the first pass only: later epochs meet the same bad samples again."""
        if self._epoch > 0:
            return
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if self.skipped[reason] <= 3:
            log.warning("skipping a sample (%s): %s", reason, where)

    def _raw_samples(self, epoch: int, unit: int, units: int) -> Iterator[dict[str, Any]]:
        order = self.source.units()
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}:units").shuffle(order)
        by_unit = len(order) >= units
        index = 0
        for name in order[unit::units] if by_unit else order:
            for sample in self.source.read(name, self._skip):
                index += 1
                if by_unit or (index - 1) % units == unit:
                    yield sample

    def _decode(self, raw: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        where = raw["where"]
        if raw.get("caption") is None:
            self._skip("missing caption", where)
            return None
        rng = random.Random(f"{self.seed}:{epoch}:{where}")
        if "encoded" in raw:
            item = dict(raw["encoded"])
        else:
            if raw.get("image") is None:
                self._skip("missing image", where)
                return None
            try:
                image = open_image(raw["image"], self.max_pixels)
            except ImageTooLarge as e:
                self._skip("image too large", f"{where} ({e})")
                return None
            except Exception as e:
                self._skip("corrupt image", f"{where} ({e})")
                return None
            reason = self.transform.reject(image)
            if reason:
                self._skip(reason, f"{where} ({image.width}x{image.height})")
                return None
            item = self.transform(image, rng)
        item["caption"] = raw["caption"]
        item["drop_caption"] = torch.tensor(rng.random() < self.caption_dropout)
        item["skipped"] = (self._stream_id, dict(self.skipped))
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        units, unit = self.world_size * workers, self.rank * workers + worker
        self._stream_id = unit
        epoch = 0
        while self.max_epochs is None or epoch < self.max_epochs:
            self._epoch = epoch
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
                raise DataError(f"data source {self.source.description} gave no usable sample ({skipped})")
            epoch += 1


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, list captions; `skipped` maps stream id -> that stream's running skip counts."""
    batch: dict[str, Any] = {"caption": [it["caption"] for it in items], "skipped": {}}
    for key, value in items[0].items():
        if isinstance(value, torch.Tensor):
            batch[key] = torch.stack([it[key] for it in items])
    for it in items:
        stream, counts = it["skipped"]
        batch["skipped"][stream] = counts
    return batch


class SkipTally:
    """Running skip counts over all streams of this process, from the batches it consumed."""

    def __init__(self) -> None:
        self.by_stream: dict[int, dict[str, int]] = {}

    def update(self, batch: dict[str, Any]) -> None:
        self.by_stream.update(batch.get("skipped", {}))

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for counts in self.by_stream.values():
            for reason, n in counts.items():
                out[reason] = out.get(reason, 0) + n
        return out


def summarize_skips(counts: dict[str, int]) -> str:
    """'3 samples skipped (2 corrupt image, 1 missing caption); 1 shard cut short or unreadable (the rest of it was
    not read)': samples and whole units counted apart."""
    samples = {r: n for r, n in counts.items() if r not in UNIT_REASONS}
    parts = []
    if samples:
        n = sum(samples.values())
        parts.append(f"{n} sample{'s' * (n != 1)} skipped (" + ", ".join(f"{k} {r}" for r, k in sorted(samples.items()))
                     + ")")  # fmt: skip
    for reason in UNIT_REASONS:
        if counts.get(reason):
            n = counts[reason]
            parts.append(f"{n} {reason.replace('shard', 'shards' if n > 1 else 'shard', 1)} (the rest of "
                         f"{'them' if n > 1 else 'it'} was not read)")  # fmt: skip
    return "; ".join(parts) or "no sample skipped"


def make_dataloader(dataset: SampleStream, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
        persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None,
    )  # fmt: skip
