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
