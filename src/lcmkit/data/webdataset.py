"""WebDataset shards as a source: local files (brace ranges, globs, a folder of .tar), pipe:, http(s), s3/gs."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand
from webdataset.tariterators import tarfile_samples

from lcmkit.data.base import SHARD_CUT_SHORT, Skip
from lcmkit.errors import ConfigError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_KEYS = ("txt", "caption", "text")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


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


def sample_caption(sample: dict[str, Any]) -> str | None:
    for key in CAPTION_KEYS:
        if key in sample:
            return sample[key].decode("utf-8", errors="replace").strip()
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return None
        for key in ("caption", "text", "prompt"):
            if isinstance(meta, dict) and isinstance(meta.get(key), str):
                return meta[key].strip()
    return None


class WdsSource:
    def __init__(self, spec: str):
        self.urls = expand_shards(spec)
        self.description = self.urls[0] + (f" (+{len(self.urls) - 1} more shards)" if len(self.urls) > 1 else "")

    def units(self) -> list[str]:
        return list(self.urls)

    def read(self, unit: str, skip: Skip) -> Iterator[dict[str, Any]]:
        def handler(exn: Exception) -> bool:  # a shard failing mid-stream is reported, the run goes on
            skip(SHARD_CUT_SHORT, f"{unit}: {exn!r}"[:300])
            return True

        for sample in tarfile_samples([{"url": unit}], handler=handler):
            image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
            where = f"{sample.get('__url__', unit)}:{sample.get('__key__')}"
            yield {"where": where, "caption": sample_caption(sample), "image": image}
