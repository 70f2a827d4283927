"""What every data source is: a list of units and a reader of one unit (see sources.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

Skip = Callable[[str, str], None]
"""skip(reason, where): count and report a sample or unit that could not be read."""


SPEC_FORMS = "wds:SHARDS, folder:PATH, hf:PATH (save_to_disk folder or .parquet files) or cache:PATH"


class Source(Protocol):
    description: str

    def units(self) -> list[str]: ...

    def read(self, unit: str, skip: Skip) -> Iterator[dict[str, Any]]: ...


SHARD_CUT_SHORT = "shard cut short or unreadable"
"""The skip reason of a whole unit that could not be read to its end: counted per shard, not per sample."""
UNIT_REASONS = (SHARD_CUT_SHORT,)
