"""Data sources: one small interface over WebDataset shards, image folders, Hugging Face datasets / parquet
and lcmkit caches, chosen by a `--data` spec.

A source is a list of *units* (a shard, an image file, a parquet row group, a cache shard) and a reader that
turns one unit into raw samples. The stream (stream.py) permutes, splits and shuffles units; sources only read.
A raw sample is a dict with `where` (for messages and seeding), `caption` (str or None) and either `image`
(encoded bytes or None) or `encoded` (tensors from a cache).
"""

from __future__ import annotations

from pathlib import Path

from lcmkit.data.base import SPEC_FORMS, Source
from lcmkit.errors import ConfigError


def resolve_data(spec: str, image_column: str = "", caption_column: str = "") -> Source:
    """A `--data` spec -> a Source. Prefixes pick the kind; without one, a folder is recognised by what it holds
    (cache.json: cache, state.json/dataset_info.json or *.parquet: hf, images: folder) and anything else is
    read as WebDataset shards."""
    from lcmkit.data.cache import CacheSource, is_cache
    from lcmkit.data.folder import FolderSource
    from lcmkit.data.table import TableSource, is_table
    from lcmkit.data.webdataset import WdsSource

    spec = spec.strip()
    if not spec:
        raise ConfigError(f"--data is empty: give a data source ({SPEC_FORMS})")
    kind, _, rest = spec.partition(":")
    if kind in ("wds", "folder", "hf", "parquet", "cache") and rest:
        path = rest
    else:
        kind, path = "", spec
    local = Path(path).expanduser()
    if not kind:
        if is_cache(local):
            kind = "cache"
        elif is_table(local):
            kind = "hf"
        elif local.is_dir() and not any(local.glob("*.tar")):
            kind = "folder"
        else:
            kind = "wds"
    if kind == "cache":
        return CacheSource(path)
    if kind in ("hf", "parquet"):
        return TableSource(path, image_column, caption_column)
    if kind == "folder":
        return FolderSource(path)
    return WdsSource(path)
