"""`lcmkit bench distill|generate|serve|soak`: distillation throughput, generation latency and memory.

generate and soak take their flags from measure/bench.py's GenerateBench and SoakBench, serve from the serve
command's model options; distill's options are BenchDistillOptions here. Each also takes --json FILE."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from lcmkit.app.common import LATENCY_REPEATS, MAX_STEPS, MODEL_FLAGS, RESOLUTION_HELP, toy_aliases, write_json
from lcmkit.app.flags import Flags, option
from lcmkit.app.serve import ServeModelOptions, serve_generator
from lcmkit.data.config import DataConfig
from lcmkit.errors import ConfigError
from lcmkit.families.models import LoraConfig
from lcmkit.infer.schedulers import SAMPLERS
from lcmkit.measure.archs import ARCHS
from lcmkit.measure.bench import GenerateBench, SoakBench


@dataclass
class BenchDistillOptions:
    """What bench distill runs: `lcmkit distill` once per mode (and data kind), each in its own process."""

    teacher: str | None = None
    """The teacher to distill (or --arch)."""
    arch: str | None = option(None, choices=ARCHS)
    """Build this public architecture with random weights instead."""
    teacher_config: str | None = None
    data: str | None = None
    """Training data (with --arch, default: a few synthetic images)."""
    modes: list[Literal["lora", "full"]] = field(default_factory=lambda: ["lora", "full"])
    steps: int = 20
    batch_size: int = 4
    resolution: int = DataConfig.resolution
    lora_rank: int = LoraConfig.lora_rank
    cache: bool = option(False, action="store_true")
    """Also run each mode from an lcmkit cache of --data."""
    profile: bool = option(False, action="store_true")
    """Also break each step down by phase (torch.profiler)."""
    compile: bool = option(False, action="store_true")
    """Also run each mode with distill --compile (torch.compile)."""
    distill_args: str = ""
    """Extra distill flags, e.g. '--gradient-checkpointing'."""


@dataclass
class BenchServeOptions(ServeModelOptions):
    """Prompt-to-image latency through the real server: per step count, the median of repeats."""

    steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    repeats: int = LATENCY_REPEATS


DISTILL = Flags(BenchDistillOptions)
GENERATE = Flags(
    GenerateBench,
    spec={
        **MODEL_FLAGS,
        "steps": {"help": "distilled-model steps"},
        "sampler": {"choices": SAMPLERS, "help": "the teacher's sampler"},
        "resolution": {"help": RESOLUTION_HELP},
        "compile": {"action": "store_true"},
        "vs_diffusers": {"action": "store_true"},
    },
)  # fmt: skip
SERVE = Flags(BenchServeOptions)
SOAK = Flags(
    SoakBench,
    spec={
        "teacher": {"help": "any teacher distill takes (e.g. the toy teacher folder)"},
        "at_step": {"help": "the reference point for growth"},
        "interval_s": {"help": "seconds between memory samples"},
        "out": {"help": "keep the run here (default: a temporary folder)"},
    },
)


def add_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="measure distillation throughput, generation latency and memory")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    d = sub.add_parser("distill", help="s/step, samples/s and peak RSS per mode, each in its own process")
    DISTILL.add(d)
    add_json(d, "also write the results (with machine info) to this file")
    g = sub.add_parser("generate", help="latency per image and images/s: distilled model vs teacher sampler",
                       description="End to end and UNet-only; warm-up excluded, median of repeats; CUDA events and "
                       "GPU memory on CUDA, wall time and peak RSS on CPU.")  # fmt: skip
    GENERATE.add(g)
    add_json(g, "also write the results (machine, versions, configuration) to this file")
    s = sub.add_parser("serve", help="prompt-to-image latency through lcmkit serve (median of repeats)")
    SERVE.add(s)
    add_json(s, "also write the results (with machine info) to this file")
    k = sub.add_parser("soak", help="memory over a long LCM-LoRA run: RSS after --at-step vs at the end",
                       description="Runs lcmkit distill (LoRA) in a subprocess and samples its resident memory; "
                       "a leak shows as growth between step --at-step and the end.")  # fmt: skip
    SOAK.add(k)
    add_json(k, "also write every sample and the summary to this file")
    bench.set_defaults(func=run)


def add_json(parser: argparse.ArgumentParser, text: str) -> None:
    """--json FILE: where to write the results, besides the table."""
    parser.add_argument("--json", help=text)


def run(args: argparse.Namespace) -> int:
    runs: dict[str, Callable[[argparse.Namespace], int]] = {
        "distill": run_distill, "generate": run_generate, "serve": run_serve, "soak": run_soak,
    }  # fmt: skip
    return runs[args.bench_command](args)


def run_distill(args: argparse.Namespace) -> int:
    import shlex

    from lcmkit.measure.bench import bench_distill, table
    from lcmkit.measure.system import machine

    o: BenchDistillOptions = DISTILL.build(args)
    rows = bench_distill(o.teacher, o.data, o.modes, o.steps, o.batch_size, o.resolution, o.lora_rank,
                         shlex.split(o.distill_args), teacher_config=o.teacher_config, cache=o.cache, arch=o.arch,
                         profile=o.profile, compile=o.compile)  # fmt: skip
    print(table(rows))
    write_json(args.json, {"machine": machine(), "distill": rows})
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from lcmkit.measure.bench import bench_generate, generate_table

    cfg: GenerateBench = GENERATE.build(args)
    cfg.teacher, cfg.lora = toy_aliases(cfg.teacher, cfg.lora)
    record = bench_generate(cfg)
    print(generate_table(record["generate"]))
    ours = record["generate"][0]
    if "speedup_vs_diffusers" in ours:
        db = ours["psnr_vs_diffusers_db"]
        print(f"{ours['model']}: {ours['speedup_vs_diffusers']:.2f}x the plain diffusers pipeline per image; images "
              + ("identical" if db is None else f"{db:.1f} dB PSNR apart"))  # fmt: skip
    m = record["machine"]
    print(f"machine: {m.get('gpu') or m['processor']}, {m['cpus']} CPUs ({m['threads']} threads), torch {m['torch']}, "
          f"diffusers {m['diffusers']}; {record['config']['device']} {record['config']['dtype']}, median of "
          f"{cfg.repeats} after {cfg.warmup} warm-up")  # fmt: skip
    write_json(args.json, record)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from lcmkit.app.server import bench_latency
    from lcmkit.measure.system import machine, markdown

    o: BenchServeOptions = SERVE.build(args)
    if o.repeats < 1 or any(s < 1 or s > MAX_STEPS for s in o.steps):
        raise ConfigError(f"--steps {o.steps} / --repeats {o.repeats}: steps in 1..{MAX_STEPS}, repeats >= 1")
    rows = bench_latency(serve_generator(o), o.steps, o.repeats)
    print(markdown(["steps", "prompt-to-image median ms", "generation median ms", "repeats"],
                   [[str(r["steps"]), f"{r['median_ms']:.1f}", f"{r['median_generation_ms']:.1f}", str(r["repeats"])]
                    for r in rows]), end="")  # fmt: skip
    write_json(args.json, {"machine": machine(), "serve": rows})
    return 0


def run_soak(args: argparse.Namespace) -> int:
    from lcmkit.measure.bench import bench_soak

    cfg: SoakBench = SOAK.build(args)

    def show(sample: dict[str, Any]) -> None:
        if args.verbose:
            print(f"t {sample['t']:.0f} s  step {sample['step']}  RSS {sample['rss_mb']:.0f} MB", file=sys.stderr)

    r = bench_soak(cfg, show)
    print(f"lcmkit bench soak: {cfg.steps} LoRA steps, batch {cfg.batch_size}, {cfg.resolution} px: RSS "
          f"{r['rss_at_step_mb']:.1f} MB at step {r['at_step']}, {r['rss_end_mb']:.1f} MB at step {r['end_step']}: "
          f"{r['growth_pct']:+.2f}% (max after step {r['at_step']}: {r['max_rss_after_mb']:.1f} MB, peak "
          f"{r['peak_rss_mb']:.1f} MB, {r['median_s_per_step']:.3f} s/step)")  # fmt: skip
    write_json(args.json, r)
    return 0
