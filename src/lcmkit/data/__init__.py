"""Data sources, transforms and batching for distillation."""

from .transforms import ImageTransform
from .webdataset import ShardDataset, collate, expand_shards, make_dataloader, resolve_data

__all__ = ["ImageTransform", "ShardDataset", "collate", "expand_shards", "make_dataloader", "resolve_data"]
