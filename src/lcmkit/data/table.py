"""Tables of images and captions as a source: a Hugging Face `save_to_disk` folder (Arrow stream files) or
parquet files (one file, a glob, or a folder of them, as on the Hub). Read with pyarrow alone: the `datasets`
library is not needed. Units are parquet row groups and Arrow record batches, so large tables split well
across processes and workers.

The image column holds encoded bytes, or the `datasets` Image struct {bytes, path}; the caption column
holds strings. Both are found by name (or type) unless given with --image-column / --caption-column.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lcmkit.data.base import Skip
from lcmkit.errors import ConfigError

IMAGE_COLUMNS = ("image", "img", "jpg", "png", "webp", "image_bytes")
CAPTION_COLUMNS = ("text", "caption", "prompt", "txt", "captions")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError("--data hf:... needs pyarrow: pip install 'lcmkit[hf]' (or pip install pyarrow)") from None
    return pyarrow


def _table_files(path: str) -> tuple[list[Path], str]:
    """-> (files, 'arrow' | 'parquet')."""
    p = Path(path).expanduser()
    if any(ch in path for ch in "*?["):
        files = [Path(f) for f in sorted(glob.glob(str(p)))]
    elif p.is_file():
        files = [p]
    elif p.is_dir():
        state = p / "state.json"
        if state.is_file():
            try:
                names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"--data hf:{path}: {state} is not a datasets save_to_disk state file") from None
            return [p / n for n in names], "arrow"
        files = sorted(p.glob("*.parquet")) or sorted(p.glob("data/*.parquet")) or sorted(p.glob("*.arrow"))
        if not files and any(d.is_dir() and (d / "state.json").is_file() for d in p.iterdir()):
            splits = sorted(d.name for d in p.iterdir() if (d / "state.json").is_file())
            raise ConfigError(f"--data hf:{path} is a DatasetDict: pick a split, e.g. hf:{p / splits[0]}")
    else:
        raise ConfigError(f"--data hf:{path}: {p} does not exist")
    if not files:
        raise ConfigError(f"--data hf:{path}: no .parquet or .arrow file found (or state.json of save_to_disk)")
    kinds = {f.suffix for f in files}
    if kinds - {".parquet", ".arrow"} or len(kinds) > 1:
        raise ConfigError(f"--data hf:{path}: expected only .parquet or only .arrow files, found {sorted(kinds)}")
    return files, "parquet" if kinds == {".parquet"} else "arrow"


def is_table(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".parquet"
    return path.is_dir() and (
        (path / "state.json").is_file() or any(path.glob("*.parquet")) or any(path.glob("data/*.parquet"))
    )


def _pick(names: list[str], types: dict[str, Any], wanted: str, candidates: tuple[str, ...], kind: str) -> str:
    flag = f"--{kind}-column"
    if wanted:
        if wanted not in names:
            raise ConfigError(f"{flag} {wanted}: the table has no such column (columns: {', '.join(names)})")
        return wanted
    for name in candidates:
        if name in names:
            return name
    pa = _pyarrow()
    for name in names:
        t = types[name]
        if kind == "image" and (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t)):
            return name
        if kind == "caption" and (pa.types.is_string(t) or pa.types.is_large_string(t)):
            return name
    raise ConfigError(f"the table has no {kind} column (columns: {', '.join(names)}): name it with {flag}")


def _open_arrow(path: Path) -> Any:
    pa = _pyarrow()
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source)


def _arrow_batches(path: Path) -> Iterator[Any]:
    reader = _open_arrow(path)
    if hasattr(reader, "num_record_batches"):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


class TableSource:
    def __init__(self, path: str, image_column: str = "", caption_column: str = ""):
        pa = _pyarrow()
        self.files, self.format = _table_files(path)
        self.root = Path(path).expanduser() if Path(path).expanduser().is_dir() else self.files[0].parent
        self.description = f"hf:{path}"
        try:
            if self.format == "parquet":
                schema = pa.parquet.ParquetFile(self.files[0]).schema_arrow
                self._units = [
                    f"{f}#{g}" for f in self.files for g in range(pa.parquet.ParquetFile(f).num_row_groups)
                ]  # fmt: skip
            else:
                schema = _open_arrow(self.files[0]).schema
                self._units = [f"{f}#{g}" for f in self.files for g, _ in enumerate(_arrow_batches(f))]
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"--data {self.description}: cannot read the table ({e})") from None
        types = {name: schema.field(name).type for name in schema.names}
        self.image_column = _pick(schema.names, types, image_column, IMAGE_COLUMNS, "image")
        self.caption_column = _pick(schema.names, types, caption_column, CAPTION_COLUMNS, "caption")

    def units(self) -> list[str]:
        return list(self._units)

    def _rows(self, unit: str) -> list[dict[str, Any]]:
        pa = _pyarrow()
        file, _, index = unit.rpartition("#")
        columns = [self.image_column, self.caption_column]
        if self.format == "parquet":
            return pa.parquet.ParquetFile(file).read_row_group(int(index), columns=columns).to_pylist()
        for i, batch in enumerate(_arrow_batches(Path(file))):
            if i == int(index):
                return batch.select(columns).to_pylist()
        return []

    def read(self, unit: str, skip: Skip) -> Iterator[dict[str, Any]]:
        pa = _pyarrow()
        try:
            rows = self._rows(unit)
        except (OSError, pa.ArrowException) as e:
            skip("unreadable table data", f"{unit} ({e})")
            return
        for i, row in enumerate(rows):
            caption = row[self.caption_column]
            if isinstance(caption, list):  # several captions per image: the first
                caption = caption[0] if caption else None
            yield {"where": f"{unit}:{i}", "caption": caption, "image": self._image_bytes(row[self.image_column])}

    def _image_bytes(self, cell: Any) -> bytes | None:
        if isinstance(cell, dict):
            if cell.get("bytes"):
                return cell["bytes"]
            path = cell.get("path")
            if path and (self.root / path).is_file():
                return (self.root / path).read_bytes()
            if path and Path(path).is_file():
                return Path(path).read_bytes()
            return None
        return cell if isinstance(cell, bytes | bytearray) else None
