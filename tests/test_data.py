"""WebDataset specs, caption keys, transforms, deterministic order and rank splitting."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import make_shards

from lcmkit.data import ImageTransform, SampleStream, expand_shards, resolve_data, summarize_skips
from lcmkit.errors import ConfigError


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
    ds = SampleStream(resolve_data(url), ImageTransform(64), max_epochs=1)
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
    def captions(**kw) -> list[str]:
        source = resolve_data(shards)
        ds = SampleStream(source, ImageTransform(64), seed=kw.pop("seed", 0), shuffle_buffer=5, max_epochs=1, **kw)
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
    ds = SampleStream(resolve_data(str(path)), ImageTransform(64), max_epochs=1)
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
    root = make_folder(tmp_path / "f", captions)
    source = resolve_data(f"folder:{root}")
    assert len(source.units()) == 6 and resolve_data(str(root)).units() == source.units()
    ds = SampleStream(source, ImageTransform(64), max_epochs=1)
    items = list(ds)
    expected = 5 if captions == "txt" else 6
    assert len(items) == expected and all(it["caption"].startswith("picture") for it in items)
    if captions == "txt":
        assert ds.skipped == {"missing caption": 1}
    r0 = [it["caption"] for it in SampleStream(source, ImageTransform(64), max_epochs=1, world_size=2)]
    r1 = [it["caption"] for it in SampleStream(source, ImageTransform(64), max_epochs=1, rank=1, world_size=2)]
    assert sorted(r0 + r1) == sorted(it["caption"] for it in items)


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        resolve_data(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no image"):
        resolve_data(f"folder:{tmp_path / 'empty'}")


def test_folder_with_a_zero_byte_and_a_truncated_jpeg(tmp_path):
    root = make_folder(tmp_path / "f", "txt")
    (root / "zero.jpg").write_bytes(b"")
    Image.new("RGB", (96, 96), (200, 10, 10)).save(root / "cut.jpg", quality=95)
    (root / "cut.jpg").write_bytes((root / "cut.jpg").read_bytes()[:300])
    for name in ("zero", "cut"):
        (root / f"{name}.txt").write_text("broken")
    ds = SampleStream(resolve_data(f"folder:{root}"), ImageTransform(64), max_epochs=1)
    assert len(list(ds)) == 5
    assert ds.skipped == {"corrupt image": 2, "missing caption": 1}


def test_distill_from_an_image_folder(tiny_sd, tmp_path):
    from lcmkit.app.cli import main

    root = make_folder(tmp_path / "f", "txt")  # img5 has no caption
    out = tmp_path / "out"
    args = ["distill", "--teacher", tiny_sd, "--data", f"folder:{root}", "--out", str(out), "--max-steps", "4",
            "--batch-size", "2", "--resolution", "64", "--lora-rank", "2", "--no-progress"]  # fmt: skip
    assert main(args) == 0 and (out / "pytorch_lora_weights.safetensors").is_file()
    record = json.loads((out / "lcmkit_run.json").read_text())
    assert record["data"] == {"source": f"folder:{root}", "skipped": {"missing caption": 1}, "released": []}


def identities(stream) -> list[str]:
    return [it["caption"] + str(it["original_size"].tolist()) for it in stream]


@pytest.mark.parametrize("n_shards,per_shard", [(4, 4), (1, 10)])
def test_two_ranks_two_workers_see_every_sample_once(tmp_path, n_shards, per_shard):
    """4 streams: by shard when there are enough shards, else every stream keeps every 4th sample."""
    from torch.utils.data import DataLoader

    source = resolve_data(make_shards(tmp_path / "s", n_shards=n_shards, per_shard=per_shard, size=64))
    everything = identities(SampleStream(source, ImageTransform(64), max_epochs=1))
    seen = []
    for rank in range(2):
        stream = SampleStream(source, ImageTransform(64), seed=3, max_epochs=1, rank=rank, world_size=2)
        loader = DataLoader(stream, batch_size=None, num_workers=2)
        seen += identities(loader)
    assert len(everything) == n_shards * per_shard == len(set(everything))
    assert sorted(seen) == sorted(everything)


def png_bytes(size: tuple[int, int]) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_filters_and_decompression_bound(tmp_path):
    import webdataset as wds

    path = tmp_path / "mixed.tar"
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "ok", "png": png_bytes((80, 64)), "txt": "ok"})
        w.write({"__key__": "small", "png": png_bytes((40, 40)), "txt": "small"})
        w.write({"__key__": "wide", "png": png_bytes((300, 64)), "txt": "wide"})
        w.write({"__key__": "huge", "png": png_bytes((200, 200)), "txt": "huge"})
    transform = ImageTransform(32, min_size=48, max_aspect=3.0)
    ds = SampleStream(resolve_data(str(path)), transform, max_epochs=2, max_pixels=30_000)
    assert [it["caption"] for it in ds] == ["ok", "ok"]
    assert ds.skipped == {"below minimum size": 1, "aspect ratio above maximum": 1, "image too large": 1}


def test_caption_dropout_is_seeded(shards):
    def drops(seed: int) -> list[bool]:
        ds = SampleStream(resolve_data(shards), ImageTransform(64), seed=seed, max_epochs=4, caption_dropout=0.5)
        return [bool(it["drop_caption"]) for it in ds]

    first = drops(0)
    assert first == drops(0) and first != drops(1)
    assert 0.25 < sum(first) / len(first) < 0.75
    assert not any(bool(it["drop_caption"]) for it in SampleStream(resolve_data(shards), ImageTransform(64),
                                                                   max_epochs=1))  # fmt: skip


def test_flip_records_the_crop_in_the_flipped_image():
    ramp = np.tile((np.arange(128) * 2).astype(np.uint8), (64, 1))  # red = 2x, no resize at 128x64 -> 64
    image = Image.fromarray(np.stack([ramp, ramp * 0, ramp * 0], -1))
    outputs = [ImageTransform(64, center_crop=False, random_flip=True)(image, random.Random(s)) for s in range(30)]
    flips = 0
    for out in outputs:
        left = out["crop_top_left"][1].item()
        red = ((out["pixel_values"][0, 0] + 1) * 127.5).round().long().tolist()
        flipped = red[1] < red[0]
        flips += flipped
        # the recorded crop is where the pixels sit in the (flipped) image the model saw
        expected = [(127 - (left + i)) * 2 if flipped else (left + i) * 2 for i in range(64)]
        assert red == expected
    assert 5 < flips < 25


def make_table(root: Path, fmt: str, n: int = 6) -> Path:
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (64 + 4 * i, 64), (30 * i, 20, 90)) for i in range(n)]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": [f"table picture {i}" for i in range(n)]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    if fmt == "save_to_disk":
        ds.save_to_disk(str(root), num_shards=3)
        return root
    root.mkdir(parents=True)
    ds.to_parquet(str(root / "train-00000.parquet"), batch_size=2)
    return root


@pytest.mark.parametrize("fmt", ["save_to_disk", "parquet"])
def test_hf_dataset_sources(tmp_path, fmt):
    root = make_table(tmp_path / "t", fmt)
    for spec in (f"hf:{root}", str(root)):
        source = resolve_data(spec)
        assert len(source.units()) > 1  # row groups / record batches split across streams
        items = list(SampleStream(source, ImageTransform(64), max_epochs=1))
        assert sorted(it["caption"] for it in items) == [f"table picture {i}" for i in range(6)]
        assert sorted(it["original_size"][1].item() for it in items) == [64 + 4 * i for i in range(6)]
    halves = [
        [it["caption"] for it in SampleStream(resolve_data(f"hf:{root}"), ImageTransform(64), max_epochs=1,
                                              rank=r, world_size=2)]
        for r in range(2)
    ]  # fmt: skip
    assert sorted(halves[0] + halves[1]) == [f"table picture {i}" for i in range(6)]


def test_hf_source_errors(tmp_path):
    root = make_table(tmp_path / "t", "parquet")
    with pytest.raises(ConfigError, match="--image-column photo: the table has no such column .*image, text"):
        resolve_data(f"hf:{root}", image_column="photo")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_data(f"hf:{tmp_path / 'nothing'}")
    assert resolve_data(f"hf:{root}", caption_column="text").caption_column == "text"


def test_a_shard_failing_mid_stream_is_reported_and_the_rest_is_read(tmp_path):
    spec = make_shards(tmp_path / "s", n_shards=3, per_shard=4, size=64)
    broken = tmp_path / "s" / "00001.tar"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # truncated mid-sample
    ds = SampleStream(resolve_data(spec), ImageTransform(64), max_epochs=1)
    items = list(ds)
    assert 8 <= len(items) < 12  # both good shards, and what could be read of the broken one
    assert ds.skipped.get("shard cut short or unreadable") == 1
    summary = summarize_skips(ds.skipped)
    assert summary.startswith("1 shard cut short or unreadable (the rest of it was not read)"), summary
    assert "sample" not in summary  # a cut shard is one shard, not "1 sample skipped"
