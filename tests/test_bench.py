"""`lcmkit bench distill` runs each mode (from raw data and from a cache) in its own process and reports
measured numbers."""

from __future__ import annotations

import json

from lcmkit.cli import main


def test_bench_distill_reports_both_modes(tiny_sd, shards, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "distill", "--teacher", tiny_sd, "--data", shards, "--steps", "3", "--batch-size", "2",
            "--resolution", "64", "--lora-rank", "4", "--cache", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| lora | raw | 2 | 64 |" in printed and "| full | cache | 2 | 64 |" in printed
    record = json.loads(out.read_text())
    assert [(r["mode"], r["data"]) for r in record["distill"]] == [
        ("lora", "raw"), ("lora", "cache"), ("full", "raw"), ("full", "cache")
    ]  # fmt: skip
    assert record["distill"][1]["cache_build_s"] > 0
    for row in record["distill"]:
        assert row["median_s_per_step"] > 0 and row["samples_per_s"] > 0 and row["peak_rss_mb"] > 100
    assert record["machine"]["cpus"] >= 1


def test_bench_reports_a_failed_run_in_one_line(tiny_sd, tmp_path, capsys):
    args = ["bench", "distill", "--teacher", tiny_sd, "--data", str(tmp_path / "none.tar"), "--steps", "3"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lora run failed" in err and "none.tar" in err
