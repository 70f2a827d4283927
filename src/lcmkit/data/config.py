"""The [data] options: which data, and how images become training samples."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """The [data] options."""

    data: str = ""
    """wds:SHARDS (brace ranges, globs, a folder of .tar, pipe:, http(s)://), folder:PATH (an image folder with
    a .txt caption beside each image or metadata.jsonl / metadata.csv), hf:PATH (a datasets save_to_disk folder
    or parquet files) or cache:PATH (made by lcmkit cache). Without a prefix the kind is recognised."""
    resolution: int = 512
    """Training images are resized (shorter side) and cropped to this square size in pixels."""
    center_crop: bool = True
    """Crop the centre (else a random crop)."""
    random_flip: bool = False
    """Flip images horizontally at random."""
    min_size: int = 0
    """Skip images whose shorter side is below this many pixels (0: keep all)."""
    max_aspect: float = 0.0
    """Skip images whose long/short side ratio is above this (0: keep all)."""
    caption_dropout: float = 0.0
    """Probability of training a sample with the unconditional (empty) prompt instead of its caption."""
    image_column: str = ""
    """hf: the image column (found by name or type when empty)."""
    caption_column: str = ""
    """hf: the caption column (found by name or type when empty)."""
    num_workers: int = 0
    """Data loader worker processes (0: load in the training process)."""
    shuffle_buffer: int = 1000
    """Samples held for shuffling a streamed source (deterministic for a seed)."""
