"""Data sources, transforms, the deterministic sample stream and the latent/text-embedding cache."""

from lcmkit.data.base import Source
from lcmkit.data.sources import resolve_data
from lcmkit.data.stream import DataError, SampleStream, SkipTally, collate, make_dataloader, summarize_skips
from lcmkit.data.transforms import ImageTransform
from lcmkit.data.webdataset import expand_shards

__all__ = [
    "DataError", "ImageTransform", "SampleStream", "SkipTally", "Source", "collate", "expand_shards",
    "make_dataloader", "resolve_data", "summarize_skips",
]  # fmt: skip
