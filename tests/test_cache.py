"""`lcmkit cache`: what it stores, that training from it follows the raw-data trajectory, refusals, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_data import make_folder

from lcmkit.app.cli import main
from lcmkit.data import ImageTransform, SampleStream, resolve_data
from lcmkit.errors import ConfigError
from lcmkit.families.teacher import ModelConfig, load_teacher


def cache_cli(teacher: str, data: str, out: Path, *extra: str) -> int:
    return main(["cache", "--teacher", teacher, "--data", data, "--out", str(out), "--resolution", "64",
                 "--no-progress", *extra])  # fmt: skip


def distill_cli(teacher: str, data: str, out: Path, *extra: str) -> int:
    return main(["distill", "--teacher", teacher, "--data", data, "--out", str(out), "--max-steps", "3",
                 "--batch-size", "2", "--resolution", "64", "--lora-rank", "2", "--no-progress", "--log-every", "1",
                 "--shuffle-buffer", "4", *extra])  # fmt: skip


def losses(run: Path) -> list[float]:
    lines = (run / "logs" / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def test_cache_holds_the_encodings(tiny_sd, tmp_path):
    root = make_folder(tmp_path / "f", "txt")  # img5 has no caption
    out = tmp_path / "cache"
    assert cache_cli(tiny_sd, f"folder:{root}", out, "--dtype", "fp32", "--shard-size", "2") == 0
    index = json.loads((out / "cache.json").read_text())
    assert index["num_samples"] == 5 and index["skipped"] == {"missing caption": 1}
    assert [s["count"] for s in index["shards"]] == [2, 2, 1]

    teacher = load_teacher(ModelConfig(teacher=tiny_sd))
    conditioner = teacher.conditioner()
    raw = list(SampleStream(resolve_data(f"folder:{root}"), ImageTransform(64), max_epochs=1, shuffle=False))
    cached = list(SampleStream(resolve_data(f"cache:{out}"), ImageTransform(64), max_epochs=1, shuffle=False))
    assert [it["caption"] for it in raw] == [it["caption"] for it in cached]
    with torch.no_grad():
        dist = teacher.vae.encode(torch.stack([it["pixel_values"] for it in raw])).latent_dist
        hidden = conditioner.encode([it["caption"] for it in raw]).hidden_states
    torch.testing.assert_close(torch.stack([it["latent_mean"] for it in cached]), dist.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack([it["latent_std"] for it in cached]), dist.std, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack([it["hidden_states"] for it in cached]), hidden, atol=1e-5, rtol=1e-4)
    assert "cache" in resolve_data(str(out)).description  # recognised without the prefix
    from lcmkit.formats.info import describe

    info = describe(out)
    assert (info["kind"], info["family"], info["samples"], info["shards"], info["resolution"]) == (
        "lcmkit cache",
        "sd",
        5,
        3,
        64,
    )


def test_training_from_the_cache_follows_the_raw_trajectory(tiny_sd, tmp_path):
    root = make_folder(tmp_path / "f", "jsonl")
    cache = tmp_path / "cache"
    assert cache_cli(tiny_sd, f"folder:{root}", cache, "--dtype", "fp32", "--shard-size", "1") == 0
    assert distill_cli(tiny_sd, f"folder:{root}", tmp_path / "raw") == 0
    assert distill_cli(tiny_sd, f"cache:{cache}", tmp_path / "cached") == 0
    record = json.loads((tmp_path / "cached" / "lcmkit_run.json").read_text())
    assert record["data"]["released"] == ["vae.encoder", "text_encoders"]  # a cached step encodes nothing
    raw, cached = losses(tmp_path / "raw"), losses(tmp_path / "cached")
    assert len(raw) == 3
    assert cached == pytest.approx(raw, rel=1e-4)
    a = load_file(tmp_path / "raw" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cached" / "pytorch_lora_weights.safetensors")
    for key in a:  # Adam moves every weight by ~lr per step: a near-zero gradient may flip sign between runs
        torch.testing.assert_close(a[key], b[key], atol=3e-4, rtol=0)


def test_a_cache_that_does_not_match_is_refused(tiny_sd, tiny_sdxl, tmp_path, capsys):
    root = make_folder(tmp_path / "f", "jsonl")
    cache = tmp_path / "cache"
    assert cache_cli(tiny_sd, f"folder:{root}", cache) == 0
    assert distill_cli(tiny_sd, f"cache:{cache}", tmp_path / "r1", "--resolution", "32") == 2
    assert "holds 64 px samples, --resolution is 32" in capsys.readouterr().err
    assert distill_cli(tiny_sdxl, f"cache:{cache}", tmp_path / "r2") == 2
    assert "was made for an sd teacher, this one is sdxl" in capsys.readouterr().err
    assert cache_cli(tiny_sd, f"folder:{root}", cache) == 2  # finished: no silent rebuild
    assert "--overwrite" in capsys.readouterr().err
    (cache / "cache.json").unlink()
    with pytest.raises(ConfigError, match="no cache.json"):
        resolve_data(f"cache:{cache}")


def test_sdxl_cache_trains(tiny_sdxl, tmp_path):
    root = make_folder(tmp_path / "f", "jsonl")
    cache = tmp_path / "cache"
    assert cache_cli(tiny_sdxl, f"folder:{root}", cache) == 0
    shard = load_file(cache / "shard-00000.safetensors")
    assert shard["pooled"].shape[0] == 6 and shard["latent_mean"].dtype == torch.float16
    sizes = shard["original_size"].tolist()  # (h, w) before resizing
    assert sorted(sizes) == [[72, 80 + 8 * i] for i in range(6)]
    run = tmp_path / "run"
    assert distill_cli(tiny_sdxl, f"cache:{cache}", run, "--max-steps", "1", "--validation-prompts", "a cat") == 0
    assert json.loads((run / "lcmkit_run.json").read_text())["data"]["released"] == ["vae.encoder"]
    assert (run / "validation" / "step-00000001.png").is_file()


def test_interrupted_cache_resumes_after_its_last_shard(tiny_sd, tmp_path, monkeypatch, capsys):
    import lcmkit.data.cache as cache_mod

    root = make_folder(tmp_path / "f", "jsonl")
    assert cache_cli(tiny_sd, f"folder:{root}", tmp_path / "whole", "--shard-size", "2") == 0
    real_save, calls = cache_mod._save_shard, []

    def failing(path, tensors, captions):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        real_save(path, tensors, captions)

    monkeypatch.setattr(cache_mod, "_save_shard", failing)
    assert cache_cli(tiny_sd, f"folder:{root}", tmp_path / "part", "--shard-size", "2") == 1  # one line, no traceback
    assert "disk full (injected)" in capsys.readouterr().err
    assert not (tmp_path / "part" / "cache.json").exists()
    assert sorted(p.name for p in (tmp_path / "part").glob("shard-*")) == ["shard-00000.safetensors"]
    monkeypatch.setattr(cache_mod, "_save_shard", real_save)
    assert cache_cli(tiny_sd, f"folder:{root}", tmp_path / "part", "--shard-size", "2") == 0
    for name in ("shard-00000", "shard-00001", "shard-00002"):
        a = load_file(tmp_path / "whole" / f"{name}.safetensors")
        b = load_file(tmp_path / "part" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
