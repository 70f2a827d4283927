"""Data sources, transforms, the deterministic sample stream and the latent/text-embedding cache."""

from .sources import Source, resolve_data
from .stream import DataError, SampleStream, SkipTally, collate, make_dataloader, summarize_skips
from .transforms import ImageTransform
from .webdataset import expand_shards

__all__ = [
    "DataError", "ImageTransform", "SampleStream", "SkipTally", "Source", "collate", "expand_shards",
    "make_dataloader", "resolve_data", "summarize_skips",
]  # fmt: skip
