"""WebDataset specs, caption keys, transforms, deterministic order and rank splitting."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import make_shards

from lcmkit.config import ConfigError
from lcmkit.data import ImageTransform, ShardDataset, expand_shards


def take(dataset: ShardDataset, n: int) -> list[dict]:
    it = iter(dataset)
    return [next(it) for _ in range(n)]


def test_spec_forms(tmp_path):
    spec = make_shards(tmp_path / "s", n_shards=3, per_shard=2)
    files = sorted(str(p) for p in (tmp_path / "s").glob("*.tar"))
    assert expand_shards(spec) == files
    assert expand_shards("wds:" + spec) == files
    assert expand_shards(str(tmp_path / "s" / "*.tar")) == files
    assert expand_shards(str(tmp_path / "s")) == files
    assert expand_shards(f"{files[0]}::{files[1]}") == files[:2]
    assert expand_shards("pipe:cat /x/{0..1}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]
    with pytest.raises(ConfigError, match="does not exist"):
        expand_shards(str(tmp_path / "s" / "{00000..00009}.tar"))


@pytest.mark.parametrize("caption_key", ["txt", "caption", "json"])
def test_caption_keys_and_pipe_source(tmp_path, caption_key):
    make_shards(tmp_path / "s", n_shards=1, per_shard=4, caption_key=caption_key, image_key="png")
    url = f"pipe:cat {tmp_path / 's' / '00000.tar'}"
    ds = ShardDataset(expand_shards(url), ImageTransform(64), max_epochs=1)
    items = list(ds)
    assert len(items) == 4
    assert all(it["caption"] and it["pixel_values"].shape == (3, 64, 64) for it in items)


def test_transform_resizes_crops_and_records_sizes():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    out = ImageTransform(64, center_crop=True)(image, random.Random(0))
    assert out["pixel_values"].shape == (3, 64, 64)
    assert out["original_size"].tolist() == [100, 200]
    assert out["crop_top_left"].tolist() == [0, 32]  # resized to 128x64, centre crop
    assert torch.allclose(out["pixel_values"][0], torch.ones(64, 64))  # red -> +1
    assert torch.allclose(out["pixel_values"][1], -torch.ones(64, 64))
    crops = {tuple(ImageTransform(64, center_crop=False)(image, random.Random(s))["crop_top_left"].tolist())
             for s in range(20)}  # fmt: skip
    assert len(crops) > 1 and all(top == 0 and 0 <= left <= 64 for top, left in crops)


def test_order_is_deterministic_and_rank_split_is_a_partition(shards):
    urls = expand_shards(shards)

    def captions(**kw) -> list[str]:
        ds = ShardDataset(urls, ImageTransform(64), seed=kw.pop("seed", 0), shuffle_buffer=5, max_epochs=1, **kw)
        return [it["caption"] + str(it["original_size"].tolist()) for it in ds]

    one = captions()
    assert one == captions() and len(one) == 16
    assert one != captions(seed=1)
    r0, r1 = captions(rank=0, world_size=2), captions(rank=1, world_size=2)
    assert sorted(r0 + r1) == sorted(one) and len(r0) == len(r1) == 8


def test_corrupt_samples_are_skipped(tmp_path):
    import webdataset as wds

    path = tmp_path / "mixed.tar"
    good = Image.new("RGB", (64, 64), (0, 255, 0))
    import io

    buf = io.BytesIO()
    good.save(buf, format="PNG")
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "a", "png": buf.getvalue(), "txt": "good"})
        w.write({"__key__": "b", "png": b"\x89PNG broken", "txt": "broken"})
        w.write({"__key__": "c", "png": buf.getvalue()})  # no caption
    ds = ShardDataset([str(path)], ImageTransform(64), max_epochs=1)
    items = list(ds)
    assert [it["caption"] for it in items] == ["good"]
    assert ds.skipped == {"corrupt image": 1, "missing caption": 1}


def test_folder_without_shards_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .tar shard"):
        expand_shards(str(tmp_path / "empty"))
    assert Path(tmp_path / "empty").is_dir()


def make_folder(root: Path, captions: str = "txt") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(6):
        name = f"img{i}.png" if i % 2 else f"sub/img{i}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (80 + 8 * i, 72), (40 * i, 100, 200)).save(root / name)
        if captions == "txt" and i != 5:  # img5 has no caption
            (root / name).with_suffix(".txt").write_text(f"picture {i}\n")
        rows.append({"file_name": name, "text": f"picture {i}"})
    if captions == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if captions == "csv":
        (root / "metadata.csv").write_text(
            "file_name,caption\n" + "".join(f"{r['file_name']},{r['text']}\n" for r in rows)
        )
    return root


@pytest.mark.parametrize("captions", ["txt", "jsonl", "csv"])
def test_image_folder_source(tmp_path, captions):
    from lcmkit.data import resolve_data

    root = make_folder(tmp_path / "f", captions)
    urls, caps = resolve_data(f"folder:{root}")
    assert len(urls) == 6
    ds = ShardDataset(urls, ImageTransform(64), captions=caps, max_epochs=1)
    items = list(ds)
    expected = 5 if captions == "txt" else 6
    assert len(items) == expected and all(it["caption"].startswith("picture") for it in items)
    if captions == "txt":
        assert ds.skipped == {"missing caption": 1}
    r0 = [it["caption"] for it in ShardDataset(urls, ImageTransform(64), captions=caps, max_epochs=1, world_size=2)]
    r1 = [it["caption"] for it in ShardDataset(urls, ImageTransform(64), captions=caps, max_epochs=1, rank=1,
                                                world_size=2)]  # fmt: skip
    assert sorted(r0 + r1) == sorted(it["caption"] for it in items)


def test_folder_errors(tmp_path):
    from lcmkit.data import resolve_data

    with pytest.raises(ConfigError, match="not a folder"):
        resolve_data(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no image"):
        resolve_data(f"folder:{tmp_path / 'empty'}")


def test_distill_from_an_image_folder(tiny_sd, tmp_path):
    from lcmkit.cli import main

    root = make_folder(tmp_path / "f", "jsonl")
    out = tmp_path / "out"
    args = ["distill", "--teacher", tiny_sd, "--data", f"folder:{root}", "--out", str(out), "--max-steps", "2",
            "--batch-size", "2", "--resolution", "64", "--lora-rank", "2", "--no-progress"]  # fmt: skip
    assert main(args) == 0 and (out / "pytorch_lora_weights.safetensors").is_file()
