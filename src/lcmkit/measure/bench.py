"""`lcmkit bench`: speed and memory.

distill: distillation throughput and peak memory, each configuration in its own process (so that peak RSS
belongs to that configuration alone), side by side in one run.
generate: latency per image and images/s of the distilled model at N steps against the teacher's sampler at
M steps with guidance, end to end and UNet-only; CUDA events and GPU memory on CUDA, wall time and peak RSS
on CPU; warm-up runs excluded, median of repeats.
soak: a long LCM-LoRA distillation with its resident memory sampled along the way (a leak shows as growth)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lcmkit.errors import ConfigError
from lcmkit.measure.system import machine, markdown, peak_bf16_tflops

log = logging.getLogger(__name__)


def _run_lcmkit(args: list[str], what: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "lcmkit", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"bench: the {what} run failed: {last}")


def bench_distill(
    teacher: str | None, data: str | None, modes: list[str], steps: int, batch_size: int, resolution: int,
    lora_rank: int, extra: list[str] | None = None, teacher_config: str | None = None, cache: bool = False,
    arch: str | None = None, profile: bool = False, compile: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run `lcmkit distill` once per mode (and per data kind: raw, and from an lcmkit cache of the same data when
    `cache`; eager, and with --compile too when `compile`) in a subprocess; the first step (warm-up) is excluded
    from medians. `arch` builds that public architecture with random weights (and, without `data`, a small
    synthetic image folder) in a temporary folder.
    `profile` adds the time per phase of the step (see --profile-steps)."""
    if steps < 3:
        raise ConfigError(f"--steps {steps}: use at least 3 (the first step is warm-up)")
    if (teacher is None) == (arch is None):
        raise ConfigError("bench distill: give either --teacher or --arch")
    if data is None and arch is None:
        raise ConfigError("bench distill: --data is needed with --teacher")
    with tempfile.TemporaryDirectory(prefix="lcmkit-bench-arch-") as arch_dir:
        if arch is not None:
            from lcmkit.measure.archs import build_sd15, synthetic_images

            log.info("bench: building the %s architecture with random weights in %s", arch, arch_dir)
            teacher = str(build_sd15(Path(arch_dir) / arch))
            data = data or synthetic_images(Path(arch_dir) / "images", n=max(8, batch_size * 4), size=resolution)
        extra = [*(extra or []), *(["--profile-steps", str(steps - 1)] if profile else [])]
        rows = _bench_distill_runs(teacher, data, modes, steps, batch_size, resolution, lora_rank, extra,
                                   teacher_config, cache, compile)  # fmt: skip
        forward, guidance_distilled = denoiser_forward_flops(teacher, teacher_config, resolution)
    for row in rows:  # model FLOP/s and, on a GPU whose peak is known, MFU
        passes = step_passes(row["mode"], guidance_distilled)
        row["step_tflop"] = forward * passes * row["batch_size"] / 1e12
        row["tflops_per_s"] = row["step_tflop"] / row["median_s_per_step"]
        peak = peak_bf16_tflops(row.get("gpu"))
        row["mfu"] = row["tflops_per_s"] / peak if peak else None
    return rows


def step_passes(mode: str, guidance_distilled: bool) -> int:
    """Denoiser forward-pass equivalents of one distillation step per sample: the teacher's cond and uncond (one
    for a guidance-distilled teacher), the target, the student's forward, and its backward (two for a full student:
    activation and weight gradients; one for a LoRA: the frozen base weights get no gradient)."""
    return (1 if guidance_distilled else 2) + 1 + 1 + (2 if mode == "full" else 1)


def denoiser_forward_flops(teacher: str, teacher_config: str | None, resolution: int) -> tuple[float, bool]:
    """(FLOPs of one denoiser forward per sample, counted by torch's FlopCounterMode at batch 1 and this resolution;
    whether the teacher is guidance-distilled)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lcmkit.families.teacher import ModelConfig, load_teacher

    t = load_teacher(ModelConfig(teacher=teacher, teacher_config=teacher_config))
    size = torch.tensor([[resolution, resolution]])
    cond = t.conditioner().encode([""], size, torch.zeros_like(size), (resolution, resolution))
    latent = resolution // t.vae_downsampling
    z = torch.randn(1, int(t.vae.config.latent_channels), latent, latent)
    time_, _ = t.trajectory(resolution).sample_pairs(1, 50, None, "cpu")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        t.family.call(t.denoiser, z, time_, cond, torch.full((1,), 3.0), None)
    return float(counter.get_total_flops()), t.family.guidance_distilled


def _bench_distill_runs(
    teacher: str, data: str, modes: list[str], steps: int, batch_size: int, resolution: int, lora_rank: int,
    extra: list[str], teacher_config: str | None, cache: bool, compile: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    model_args = ["--teacher", teacher] + (["--teacher-config", teacher_config] if teacher_config else [])
    with tempfile.TemporaryDirectory(prefix="lcmkit-bench-cache-") as cache_dir:
        sources = [("raw", data)]
        cache_s = None
        if cache:
            start = time.perf_counter()
            _run_lcmkit(["cache", *model_args, "--data", data, "--out", cache_dir, "--overwrite",
                         "--resolution", str(resolution), "--no-progress"], "cache")  # fmt: skip
            cache_s = time.perf_counter() - start
            sources.append(("cache", f"cache:{cache_dir}"))
        runs = [(mode, kind, spec, compiled) for mode in modes for kind, spec in sources
                for compiled in ([False, True] if compile else [False])]  # fmt: skip
        for mode, kind, spec, compiled in runs:
            with tempfile.TemporaryDirectory(prefix=f"lcmkit-bench-{mode}-") as tmp:
                start = time.perf_counter()
                _run_lcmkit(["distill", *model_args, "--data", spec, "--out", tmp, "--overwrite", "--mode", mode,
                             "--max-steps", str(steps), "--batch-size", str(batch_size),
                             "--resolution", str(resolution), "--lora-rank", str(lora_rank),
                             "--checkpoint-every", "0", "--no-progress", *(["--compile"] if compiled else []),
                             *(extra or [])], mode)  # fmt: skip
                record = json.loads((Path(tmp) / "lcmkit_run.json").read_text())
                profile_file = Path(tmp) / "profile.json"
                profile = json.loads(profile_file.read_text()) if profile_file.is_file() else None
            rows.append({
                "mode": mode, "data": kind, "compiled": compiled, "steps": steps, "batch_size": batch_size,
                "resolution": resolution,
                "median_s_per_step": record["median_s_per_step"], "samples_per_s": record["samples_per_s"],
                "peak_rss_mb": record["peak_rss_mb"], "peak_gpu_mb": record.get("peak_gpu_mb"),
                "gpu": record.get("machine", {}).get("gpu"), "wall_s": time.perf_counter() - start,
                **({"cache_build_s": cache_s} if kind == "cache" else {}),
                **({"profile": profile} if profile else {}),
            })  # fmt: skip
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = ["mode", "data", "compiled", "batch", "resolution", "median s/step", "samples/s", "model TFLOP/s", "MFU",
              "peak RSS MB", "peak GPU MiB"]  # fmt: skip
    cells = [[r["mode"], r.get("data", "raw"), "yes" if r.get("compiled") else "no", str(r["batch_size"]),
              str(r["resolution"]), f"{r['median_s_per_step']:.3f}", f"{r['samples_per_s']:.1f}",
              f"{r['tflops_per_s']:.2f}" if r.get("tflops_per_s") else "-",
              f"{r['mfu']:.0%}" if r.get("mfu") else "-", f"{r['peak_rss_mb']:.0f}",
              f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") else "-"]
             for r in rows]  # fmt: skip
    text = markdown(header, cells)
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            phases = [[name, f"{ms:.1f}", f"{100 * ms / p['ms_per_step']:.0f}%"] for name, ms in p["phases_ms"].items()]
            phases.append(
                ["(unlabelled)", f"{p['unlabelled_ms']:.1f}", f"{100 * p['unlabelled_ms'] / p['ms_per_step']:.0f}%"]
            )
            run = f"{r['mode']}, {r.get('data', 'raw')}" + (", compiled" if r.get("compiled") else "")
            text += f"\nwhere a step goes: {run} ({p['ms_per_step']:.1f} ms/step over "
            text += f"{p['steps']} profiled steps)\n" + markdown(["phase", "ms/step", "share"], phases)
    return text


def mark(cuda: bool) -> Any:
    """A point in time: a recorded CUDA event on CUDA (GPU time, no sync), else perf_counter()."""
    if not cuda:
        return time.perf_counter()
    import torch

    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def elapsed(start: Any, end: Any) -> float:
    """Seconds between two marks (waits for a CUDA end event)."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def reset_peak_memory(cuda: bool) -> None:
    """Start a new peak: CUDA's allocator peak, or on Linux the process's RSS high-water mark (clear_refs 5)."""
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: peak RSS stays the peak of the whole process


def peak_memory_mb(cuda: bool) -> float:
    """CUDA: max memory allocated since the reset; CPU: peak RSS (VmHWM) since the reset, else of the process."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024.0
    except (OSError, StopIteration):
        from lcmkit.measure.system import peak_rss_mb

        return peak_rss_mb()


def unet_marks(unet: Any, cuda: bool) -> tuple[list[tuple[Any, Any]], Callable[[], None]]:
    """Record a (start, end) mark around every UNet forward; returns the list and a function removing the hooks."""
    spans: list[tuple[Any, Any]] = []
    pre = unet.register_forward_pre_hook(lambda module, args: spans.append((mark(cuda), None)))
    post = unet.register_forward_hook(lambda module, args, output: spans.append((spans.pop()[0], mark(cuda))))

    def remove() -> None:
        pre.remove()
        post.remove()

    return spans, remove


def bench_pipeline(
    pipe: Any, steps: int, guidance: float, batch: int, size: int, repeats: int, warmup: int, prompt: str
) -> dict[str, Any]:
    """Median end-to-end and UNet-only seconds per image of `repeats` timed calls after `warmup` untimed ones."""
    import statistics

    import torch

    from lcmkit.infer.pipelines import denoiser_of

    cuda = pipe.device.type == "cuda"

    def call() -> None:
        generator = torch.Generator("cpu").manual_seed(0)
        pipe([prompt] * batch, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
             generator=generator, output_type="pil")  # fmt: skip

    for _ in range(warmup):
        call()
    reset_peak_memory(cuda)
    spans, remove = unet_marks(denoiser_of(pipe), cuda)
    end_to_end, unet_only, calls = [], [], 0
    try:
        for _ in range(repeats):
            spans.clear()
            start = mark(cuda)
            call()
            end_to_end.append(elapsed(start, mark(cuda)))
            unet_only.append(sum(elapsed(a, b) for a, b in spans))
            calls = len(spans)
    finally:
        remove()
    e2e, unet = statistics.median(end_to_end), statistics.median(unet_only)
    return {
        "steps": steps, "guidance": guidance, "batch": batch, "resolution": size, "unet_calls": calls,
        "s_per_image": e2e / batch, "images_per_s": batch / e2e, "unet_s_per_image": unet / batch,
        "unet_share": unet / e2e, "peak_memory_mb": peak_memory_mb(cuda),
        "memory": "GPU max allocated" if cuda else "peak RSS", "end_to_end_s": end_to_end, "unet_s": unet_only,
    }  # fmt: skip


def sample_once(pipe: Any, steps: int, guidance: float, batch: int, size: int, prompt: str) -> list[Any]:
    """One seeded call's images (PIL), for comparing two pipelines' outputs."""
    import torch

    generator = torch.Generator("cpu").manual_seed(0)
    return pipe([prompt] * batch, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                generator=generator, output_type="pil").images  # fmt: skip


@dataclass
class GenerateBench:
    teacher: str
    lora: str | None = None
    lcm: str | None = None
    teacher_config: str | None = None
    steps: int = 4
    teacher_steps: int = 25
    sampler: str = "dpm++"
    guidance: float | None = None
    """The teacher's guidance scale (default: its family's, e.g. 7.5 for SD; and a full UNet LCM's w input unless
    lcm_guidance is set)."""
    lcm_guidance: float | None = None
    resolution: int | None = None
    batch: int = 1
    repeats: int = 5
    warmup: int = 1
    device: str = "auto"
    dtype: str = "auto"
    prompt: str = "a photograph of an astronaut riding a horse"
    compile: bool = False
    """lcmkit's row compiled (generate --compile); the compile itself is a warm-up call, not timed."""
    vs_diffusers: bool = False
    """Also time the same weights in the plain diffusers pipeline (LCM docs' way) and compare the images."""

    def check(self) -> None:
        if (self.compile or self.vs_diffusers) and not (self.lora or self.lcm):
            raise ConfigError("--compile and --vs-diffusers time the distilled model: give --lora or --lcm")
        if self.lora and self.lcm:
            raise ConfigError("give either --lora or --lcm, not both")
        for name in ("steps", "teacher_steps", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.warmup < 0:
            raise ConfigError(f"--warmup {self.warmup}: must be >= 0")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"--resolution {self.resolution}: must be a multiple of 8")


def bench_generate(cfg: GenerateBench) -> dict[str, Any]:
    """Bench the distilled model, then the teacher, each loaded alone (so memory is its own)."""
    import gc

    import torch

    from lcmkit.families.teacher import ModelConfig, load_teacher, teacher_family
    from lcmkit.infer.generator import distilled_pipeline
    from lcmkit.infer.pipelines import default_size, teacher_pipeline
    from lcmkit.infer.schedulers import teacher_scheduler
    from lcmkit.runtime import pick_device, pick_dtype

    cfg.check()
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    _, family = teacher_family(ModelConfig(teacher=cfg.teacher, teacher_config=cfg.teacher_config))
    guidance = family.teacher_guidance if cfg.guidance is None else cfg.guidance
    rows = []
    if cfg.lora or cfg.lcm:
        lcm, name, w = distilled_pipeline(cfg.teacher, cfg.lora, cfg.lcm, cfg.teacher_config, device, cfg.dtype,
                                          guidance, cfg.lcm_guidance, compile=cfg.compile)  # fmt: skip
        size = cfg.resolution or default_size(lcm)
        warmup = max(cfg.warmup, 1) if cfg.compile else cfg.warmup
        row = bench_pipeline(lcm, cfg.steps, w, cfg.batch, size, cfg.repeats, warmup, cfg.prompt)
        rows.append({"model": f"{name} (lcmkit{', compiled' if cfg.compile else ''})", "sampler": "lcm", **row})
        ours = sample_once(lcm, cfg.steps, w, cfg.batch, size, cfg.prompt) if cfg.vs_diffusers else None
        del lcm
        gc.collect()
        if ours is not None:
            from lcmkit.infer.generator import plain_diffusers_pipeline
            from lcmkit.measure.eval import psnr, to_unit_tensor

            plain = plain_diffusers_pipeline(cfg.teacher, cfg.lora, cfg.lcm, device, dtype)
            plain_row = bench_pipeline(plain, cfg.steps, w, cfg.batch, size, cfg.repeats, cfg.warmup, cfg.prompt)
            theirs = sample_once(plain, cfg.steps, w, cfg.batch, size, cfg.prompt)
            db = psnr(to_unit_tensor(ours).flatten()[None], to_unit_tensor(theirs).flatten()[None]).item()
            rows[-1]["psnr_vs_diffusers_db"] = db if math.isfinite(db) else None  # None: identical images
            rows[-1]["speedup_vs_diffusers"] = plain_row["s_per_image"] / rows[-1]["s_per_image"]
            rows.append({"model": f"{name} (plain diffusers)", "sampler": "lcm", **plain_row})
            del plain
            gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    teacher = load_teacher(ModelConfig(teacher=cfg.teacher, teacher_config=cfg.teacher_config), dtype)
    pipe = teacher_pipeline(teacher, teacher.denoiser, teacher_scheduler(teacher.scheduler.config, cfg.sampler)).to(
        device, dtype
    )
    size = cfg.resolution or default_size(pipe)
    row = bench_pipeline(pipe, cfg.teacher_steps, guidance, cfg.batch, size, cfg.repeats, cfg.warmup, cfg.prompt)
    rows.append({"model": "teacher", "sampler": cfg.sampler, **row})
    for r in rows:
        r["speedup_vs_teacher"] = rows[-1]["s_per_image"] / r["s_per_image"]
    config = dict(vars(cfg))
    config.update(device=device, dtype=str(dtype).removeprefix("torch."))
    return {"machine": machine(), "config": config, "generate": rows}


def generate_table(rows: list[dict[str, Any]]) -> str:
    header = ["model", "sampler", "steps", "guidance", "batch", "resolution", "s/image", "images/s",
              "UNet s/image", "UNet calls", "speed-up", f"{rows[0]['memory']} MB"]  # fmt: skip
    cells = [[r["model"], r["sampler"], str(r["steps"]), f"{r['guidance']:g}", str(r["batch"]), str(r["resolution"]),
              f"{r['s_per_image']:.4f}", f"{r['images_per_s']:.1f}", f"{r['unet_s_per_image']:.4f}",
              str(r["unet_calls"]), f"{r['speedup_vs_teacher']:.1f}x", f"{r['peak_memory_mb']:.0f}"]
             for r in rows]  # fmt: skip
    return markdown(header, cells)


def process_rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process in MB, from /proc (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024.0
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def _last_logged_step(log_file: Path) -> int:
    try:
        lines = log_file.read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return 0


@dataclass
class SoakBench:
    teacher: str
    data: str
    steps: int = 2000
    batch_size: int = 2
    resolution: int = 512
    lora_rank: int = 64
    at_step: int = 200
    interval_s: float = 1.0
    checkpoint_every: int = 500
    teacher_config: str | None = None
    out: str | None = None

    def check(self) -> None:
        if not Path("/proc/self/status").is_file():
            raise ConfigError("bench soak reads memory from /proc: Linux only")
        if self.steps <= self.at_step:
            raise ConfigError(f"--steps {self.steps}: must be above --at-step {self.at_step}")


def bench_soak(cfg: SoakBench, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """An LCM-LoRA `lcmkit distill` in a subprocess; its RSS is sampled every `interval_s` with the step it had
    logged. Reports the RSS when step `at_step` was reached, at the end of training, and the growth between."""
    cfg.check()
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="lcmkit-soak-") as tmp:
        out = Path(cfg.out) if cfg.out else Path(tmp) / "run"
        log_file = out / "logs" / "train_log.jsonl"
        args = [sys.executable, "-m", "lcmkit", "distill", "--teacher", cfg.teacher, "--data", cfg.data,
                "--out", str(out), "--overwrite", "--mode", "lora", "--max-steps", str(cfg.steps),
                "--batch-size", str(cfg.batch_size), "--resolution", str(cfg.resolution),
                "--lora-rank", str(cfg.lora_rank), "--checkpoint-every", str(cfg.checkpoint_every),
                "--checkpoints-total-limit", "2", "--log-every", "10", "--no-progress",
                *(["--teacher-config", cfg.teacher_config] if cfg.teacher_config else [])]  # fmt: skip
        start = time.perf_counter()
        with open(Path(tmp) / "stderr.txt", "w+") as err:
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
            while proc.poll() is None:
                try:
                    rss, peak = process_rss_mb(proc.pid)
                except (FileNotFoundError, ProcessLookupError):
                    break
                sample = {"t": round(time.perf_counter() - start, 1), "step": _last_logged_step(log_file),
                          "rss_mb": round(rss, 1), "peak_mb": round(peak, 1)}  # fmt: skip
                samples.append(sample)
                if progress is not None:
                    progress(sample)
                time.sleep(cfg.interval_s)
            proc.wait()
            err.seek(0)
            last = (err.read().strip().splitlines() or ["no output"])[-1]
        if proc.returncode != 0:
            raise ConfigError(f"bench soak: the distill run failed: {last}")
        record = json.loads((out / "lcmkit_run.json").read_text())
    return soak_summary(cfg, samples, record)


def soak_summary(cfg: SoakBench, samples: list[dict[str, float]], record: dict[str, Any]) -> dict[str, Any]:
    after = [s for s in samples if s["step"] >= cfg.at_step]
    training = [s for s in after if s["step"] < cfg.steps] or after
    if not training:
        raise ConfigError(f"bench soak: no memory sample after step {cfg.at_step} (the run was too short to sample)")
    at, end = training[0], training[-1]
    return {
        "config": asdict(cfg), "machine": machine(), "samples": samples,
        "rss_at_step_mb": at["rss_mb"], "at_step": at["step"], "rss_end_mb": end["rss_mb"], "end_step": end["step"],
        "growth_pct": 100.0 * (end["rss_mb"] - at["rss_mb"]) / at["rss_mb"],
        "max_rss_after_mb": max(s["rss_mb"] for s in training), "peak_rss_mb": record["peak_rss_mb"],
        "median_s_per_step": record["median_s_per_step"], "nonfinite_steps": record.get("nonfinite_steps", 0),
    }  # fmt: skip
