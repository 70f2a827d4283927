"""One call on one GPU: lcmkit against the diffusers reference LCM scripts, side by side, and generation speed.

On a fresh GPU machine with this repository and a kit folder (wheels the GPU image lacks, the reference scripts
patched for timing: benchmarks/README.md), `bash benchmarks/gpu.sh` builds SD1.5's architecture with random
weights, writes WebDataset shards, and runs each measurement in its own process under the same GPU memory meter:
lcmkit LoRA and full, the reference LoRA and full, lcmkit LoRA from `lcmkit cache` and with --compile, the step's
bare compute in plain PyTorch, and `lcmkit bench generate --vs-diffusers`. Every finished measurement is one JSON
line in OUT/results.jsonl as it goes (a timeout keeps what was measured); the end prints one table with each lcmkit
run's time as a fraction of the reference's, its model TFLOP/s and MFU.

A CPU dry run of the plumbing (tiny teacher, 64 px):
    python benchmarks/gpu_bench.py --device cpu --mp no --teacher TINY_SD --resolution 64 --batch 2 --steps 4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RUNS = ("lk_lora", "ref_lora", "lk_full", "ref_full", "ideal", "lk_lora_cache", "lk_lora_compile", "gen",
        "lk_lora_profile")
REFERENCE_OF = {"lk_lora": "ref_lora", "lk_lora_cache": "ref_lora", "lk_lora_compile": "ref_lora",
                "lk_full": "ref_full"}  # fmt: skip


class Results:
    """JSON lines as measurements finish."""

    def __init__(self, out: Path):
        self.path, self.rows, self.t0 = out / "results.jsonl", [], time.time()

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {**row, "t": round(time.time() - self.t0, 1)}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("RESULT", json.dumps(row), flush=True)
        return row


class GpuMeter(threading.Thread):
    """Peak GPU memory in use on the card (nvidia-smi, MiB) while a child process runs: one meter for every tool."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done, self.ok = 0, threading.Event(), shutil.which("nvidia-smi") is not None

    def run(self) -> None:
        while self.ok and not self.done.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout  # fmt: skip
                self.peak = max([self.peak, *(int(x) for x in out.split())])
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            time.sleep(0.3)


def child(name: str, cmd: list[str], env: dict[str, str], timeout: float, logs: Path) -> tuple[Any, float, int]:
    """(return code or 'timeout', wall seconds, peak GPU MiB) of one measured process; its log in logs/."""
    meter = GpuMeter()
    meter.start()
    start = time.time()
    with open(logs / f"{name}.log", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            rc: Any = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    meter.done.set()
    meter.join()
    if rc != 0:
        tail = (logs / f"{name}.log").read_text(errors="replace").splitlines()[-20:]
        print(f"--- {name} failed ({rc}):\n" + "\n".join(tail), flush=True)
    return rc, time.time() - start, meter.peak


def write_shards(out: Path, n_shards: int, per_shard: int, size: int) -> str:
    """Captioned JPEGs of a disc on a plain background, as the reference scripts read them (jpg, txt, json)."""
    import webdataset as wds
    from PIL import Image, ImageDraw

    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "white": (245, 245, 245)}
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as sink:
            for i in range(per_shard):
                (fg, fc), (bg, bc) = rng.sample(list(colours.items()), 2)
                image = Image.new("RGB", (size, size), bc)
                r = rng.randint(size // 6, size // 3)
                x, y = rng.randint(r, size - r), rng.randint(r, size - r)
                ImageDraw.Draw(image).ellipse([x - r, y - r, x + r, y + r], fill=fc)
                jpg = io.BytesIO()
                image.save(jpg, format="JPEG", quality=92)
                meta = {"original_width": size, "original_height": size, "pwatermark": 0.0}
                sink.write({"__key__": f"{s:05d}_{i:05d}", "jpg": jpg.getvalue(), "txt": f"a {fg} disc on {bg}",
                            "json": json.dumps(meta)})  # fmt: skip
    return f"{out}/{{00000..{n_shards - 1:05d}}}.tar"


def lcmkit_run(name: str, mode: str, a: argparse.Namespace, teacher: str, data: str, extra: list[str], ctx: dict):
    out = Path(tempfile.mkdtemp(prefix=f"lk-{name}-"))
    cmd = [sys.executable, "-m", "lcmkit", "distill", "--teacher", teacher, "--data", data, "--out", str(out),
           "--overwrite", "--mode", mode, "--max-steps", str(a.steps), "--batch-size", str(a.batch), "--resolution",
           str(a.resolution), "--lora-rank", str(a.rank), "--checkpoint-every", "0", "--no-progress",
           "--num-workers", str(a.workers), "--seed", "0", "--mixed-precision", a.mp, *extra]  # fmt: skip
    rc, wall, gpu = child(name, cmd, dict(os.environ), a.child_timeout, ctx["logs"])
    row = {"run": name, "tool": "lcmkit", "mode": mode, "rc": rc, "wall_s": round(wall, 1), "gpu_mib": gpu}
    record = out / "lcmkit_run.json"
    if rc == 0 and record.is_file():
        r = json.loads(record.read_text())
        row.update(s_per_step=r["median_s_per_step"], samples_per_s=r["samples_per_s"], torch_gpu_mib=r.get(
            "peak_gpu_mb"))  # fmt: skip
    ctx["results"].add(row)
    return out if rc == 0 else None


def reference_run(name: str, script: str, a: argparse.Namespace, teacher: str, shards: str, ctx: dict) -> None:
    """The diffusers example script from the kit (patched there only to time each step), with the same data,
    batch, resolution, rank, precision and loader workers."""
    kit = ctx["kit"]
    if kit is None or not (kit / "ref" / script).is_dir():
        ctx["results"].add({"run": name, "tool": "reference", "skipped": "no kit with the reference scripts"})
        return
    sys.path.insert(0, str(kit))
    import refbench

    tmp = Path(tempfile.mkdtemp(prefix=f"ref-{name}-"))
    for f in (kit / "ref" / script).glob("*.py"):
        shutil.copy(f, tmp / f.name)
    cuda = a.device == "cuda"
    (tmp / "accelerate.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\n"
        f"use_cpu: {str(not cuda).lower()}\nnum_processes: 1\nnum_machines: 1\nmachine_rank: 0\n"
        f"mixed_precision: '{a.mp}'\ndynamo_config: {{}}\nmain_training_function: main\nrdzv_backend: static\n"
        "same_network: true\n" + ("gpu_ids: all\n" if cuda else "")
    )
    timing = tmp / "timing.txt"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp / "accelerate.yaml"),
           str(tmp / refbench.SCRIPTS[script]), "--pretrained_teacher_model", teacher, "--train_shards_path_or_url",
           shards, "--output_dir", str(tmp / "out"), "--resolution", str(a.resolution), "--train_batch_size",
           str(a.batch), "--max_train_steps", str(a.steps), "--max_train_samples", str(a.steps * a.batch * 2),
           "--dataloader_num_workers", str(a.workers), "--mixed_precision", a.mp, "--report_to", "none",
           "--checkpointing_steps", str(10**9), "--validation_steps", str(10**9), "--seed", "0"]  # fmt: skip
    if "lora" in script:
        cmd += ["--lora_rank", str(a.rank), "--lora_alpha", str(a.rank)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", REFBENCH_TIMING_FILE=str(timing),
               PYTHONPATH=str(tmp) + os.pathsep + os.environ.get("PYTHONPATH", ""))  # fmt: skip
    rc, wall, gpu = child(name, cmd, env, a.child_timeout, ctx["logs"])
    row = {"run": name, "tool": "reference", "script": script, "rc": rc, "wall_s": round(wall, 1), "gpu_mib": gpu}
    timed = refbench.parse_timing(str(timing), 1)  # the first step (warm-up) excluded, as lcmkit's median does
    if timed["median_s_per_step"]:
        row.update(s_per_step=timed["median_s_per_step"], samples_per_s=a.batch / timed["median_s_per_step"])
    ctx["results"].add(row)


def ideal_step(a: argparse.Namespace, teacher: str, ctx: dict) -> None:
    """The step's compute alone in plain PyTorch (teacher cond + uncond as one batch, target forward, student
    forward and backward; no data, optimizer or LoRA): what the kernels cost at this batch and resolution."""
    import torch
    from diffusers import UNet2DConditionModel

    dev, lowp = a.device, torch.bfloat16 if a.mp == "bf16" else torch.float16 if a.mp == "fp16" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet").to(dev)
    frozen = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet", torch_dtype=lowp).to(dev)
    b, lat = a.batch, a.resolution // 8
    x, t = torch.randn(b, 4, lat, lat, device=dev), torch.randint(0, 1000, (b,), device=dev)
    text = torch.randn(b, 77, unet.config.cross_attention_dim, device=dev)
    autocast = torch.autocast(dev, dtype=lowp, enabled=lowp != torch.float32)

    def step() -> None:
        with torch.no_grad():
            frozen(torch.cat([x, x]).to(lowp), torch.cat([t, t]), torch.cat([text, text]).to(lowp))
            with autocast:
                unet(x, t, text)
        with autocast:
            out = unet(x, t, text).sample
        out.float().pow(2).mean().backward()

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    sync()
    times = []
    for _ in range(a.ideal_repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    ctx["results"].add({"run": "ideal", "tool": "plain PyTorch", "s_per_step": median, "samples_per_s": b / median})


def generation(a: argparse.Namespace, teacher: str, lora: Path | None, ctx: dict) -> None:
    if lora is None:
        ctx["results"].add({"run": "gen", "skipped": "no LoRA (lk_lora did not finish)"})
        return
    out = ctx["out"] / "generate.json"
    cmd = [sys.executable, "-m", "lcmkit", "bench", "generate", "--teacher", teacher, "--lora", str(lora), "--steps",
           "4", "--teacher-steps", "25", "--resolution", str(a.resolution), "--batch", "1", "--repeats",
           str(a.gen_repeats), "--warmup", "2", "--vs-diffusers", "--json", str(out)]  # fmt: skip
    rc, wall, gpu = child("gen", cmd, dict(os.environ), a.child_timeout, ctx["logs"])
    rows = json.loads(out.read_text()).get("generate", []) if out.is_file() else []
    ctx["results"].add({"run": "gen", "rc": rc, "wall_s": round(wall, 1), "gpu_mib": gpu, "rows": rows})


def table(rows: list[dict[str, Any]], forward: float | None, batch: int, gpu: str | None) -> str:
    """One line per distillation run: s/step, its fraction of the reference's, model TFLOP/s and MFU, GPU memory."""
    from lcmkit.measure.bench import step_passes
    from lcmkit.measure.system import markdown, peak_bf16_tflops

    by = {r["run"]: r for r in rows}
    peak = peak_bf16_tflops(gpu)
    lines = []
    for r in rows:
        if "s_per_step" not in r:
            continue
        ref = by.get(REFERENCE_OF.get(r["run"], ""), {}).get("s_per_step")
        mode = r.get("mode") or ("full" if r["run"] == "ref_full" else "lora")
        passes = step_passes(mode, False) if r["run"] != "ideal" else 6  # ideal: teacher 2, target 1, student 1 + 2
        tflops = forward * passes * batch / r["s_per_step"] / 1e12 if forward else None
        lines.append([r["run"], f"{r['s_per_step']:.3f}", f"{r['samples_per_s']:.1f}",
                      f"{r['s_per_step'] / ref:.2f}x" if ref else "-", f"{tflops:.3g}" if tflops else "-",
                      f"{tflops / peak:.0%}" if tflops and peak else "-", str(r.get("gpu_mib") or "-")])  # fmt: skip
    text = markdown(["run", "s/step", "samples/s", "vs reference", "model TFLOP/s", "MFU", "peak GPU MiB"], lines)
    for g in by.get("gen", {}).get("rows", []):
        text += f"\ngenerate: {g.get('model')} {g.get('steps')} steps: {g.get('images_per_s', 0):.1f} images/s"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", help="a teacher folder (default: SD1.5's architecture with random weights)")
    ap.add_argument("--kit", default=os.environ.get("KIT"), help="kit folder with ref/ and refbench.py")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mp", default="bf16", help="mixed precision of both tools: bf16, fp16 or no")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--child-timeout", type=float, default=200)
    ap.add_argument("--ideal-repeats", type=int, default=10)
    ap.add_argument("--gen-repeats", type=int, default=10)
    ap.add_argument("--profile-steps", type=int, default=8, help="steps the lk_lora_profile run profiles")
    ap.add_argument("--only", default=",".join(RUNS), help=f"runs, in this order: {','.join(RUNS)}")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-bench-out")
    a = ap.parse_args()
    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    ctx = {"out": out, "logs": out / "logs", "results": Results(out), "kit": Path(a.kit) if a.kit else None}
    only, work = a.only.split(","), Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    teacher = a.teacher
    if not teacher:
        from lcmkit.measure.archs import build_sd15

        start = time.time()
        teacher = str(build_sd15(work / "sd15"))
        ctx["results"].add({"run": "build_sd15", "s": round(time.time() - start, 1)})
    shards = write_shards(work / "shards", 8, max(16, a.steps * a.batch // 8 + 8), a.resolution)
    from lcmkit.measure.bench import denoiser_forward_flops

    forward, _ = denoiser_forward_flops(teacher, None, a.resolution)
    ctx["results"].add({"run": "flops", "forward_tflop_per_sample": forward / 1e12})
    lora = None
    for run in only:
        if run == "lk_lora":
            lora = lcmkit_run(run, "lora", a, teacher, f"wds:{shards}", [], ctx)
        elif run == "lk_full":
            lcmkit_run(run, "full", a, teacher, f"wds:{shards}", [], ctx)
        elif run in ("ref_lora", "ref_full"):
            reference_run(run, "sd-lora" if run == "ref_lora" else "sd", a, teacher, shards, ctx)
        elif run == "ideal":
            ideal_step(a, teacher, ctx)
        elif run == "lk_lora_compile":
            lcmkit_run(run, "lora", a, teacher, f"wds:{shards}", ["--compile"], ctx)
        elif run == "lk_lora_cache":
            cache = work / "cache"
            cmd = [sys.executable, "-m", "lcmkit", "cache", "--teacher", teacher, "--data", f"wds:{shards}", "--out",
                   str(cache), "--overwrite", "--resolution", str(a.resolution), "--no-progress"]  # fmt: skip
            rc, wall, _ = child("cache_build", cmd, dict(os.environ), a.child_timeout, ctx["logs"])
            ctx["results"].add({"run": "cache_build", "rc": rc, "wall_s": round(wall, 1)})
            if rc == 0:
                lcmkit_run(run, "lora", a, teacher, f"cache:{cache}", [], ctx)
        elif run == "gen":
            generation(a, teacher, lora, ctx)
        elif run == "lk_lora_profile":  # the phases and top kernels of a LoRA step (torch.profiler, CUDA events)
            from lcmkit.train.loop import PROFILE_FILE

            done = lcmkit_run(run, "lora", a, teacher, f"wds:{shards}", ["--profile-steps", str(a.profile_steps)], ctx)
            if done is not None and (done / PROFILE_FILE).is_file():
                shutil.copy(done / PROFILE_FILE, out / f"{run}.json")
    gpu = None
    if a.device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(0)
    print("\n" + table(ctx["results"].rows, forward, a.batch, gpu), flush=True)
    (out / "table.md").write_text(table(ctx["results"].rows, forward, a.batch, gpu) + "\n")


if __name__ == "__main__":
    main()
