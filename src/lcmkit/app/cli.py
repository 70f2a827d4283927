"""The `lcmkit` command line: parse arguments, call the library, map errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
from collections.abc import Callable
from typing import Any

from lcmkit.distill.config import add_flags, load_config, validate
from lcmkit.errors import ConfigError
from lcmkit.measure.archs import ARCHS
from lcmkit.outputs.hub import PushError

EXIT_USAGE = 2
EXIT_FAULT = 1
ALLOW_PICKLE_HELP = "read pickle-based weights (.ckpt, .pt, .bin) you trust, with torch.load(weights_only=True)"


def _distill(args: argparse.Namespace) -> int:
    from lcmkit.distill.recipe import distill

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "command", "func", "verbose")}
    cfg = load_config(args.config, overrides)
    result = distill(cfg, command=shlex.join(["lcmkit", *sys.argv[1:]]))
    if not result.main_process:  # one line per run, not per process
        return 0
    t = result.train
    rate = f", {t.median_s_per_step:.3f} s/step" if t.median_s_per_step else ""
    print(f"lcmkit: {result.mode} {result.family} distillation finished: {t.steps} steps{rate}, "
          f"peak RSS {result.peak_rss_mb:.0f} MB -> {result.out}")  # fmt: skip
    return 0


def _cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcmkit.data import ImageTransform, resolve_data
    from lcmkit.data.cache import build_cache
    from lcmkit.families.teacher import load_teacher
    from lcmkit.runtime import pick_device

    own = ("config", "command", "func", "verbose", "out", "batch_size", "shard_size", "dtype", "device", "overwrite",
           "no_progress")  # fmt: skip
    cfg = load_config(args.config, {k: v for k, v in vars(args).items() if k not in own})
    cfg.train.out = args.out
    validate(cfg)
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    d = cfg.data
    source = resolve_data(d.data, d.image_column, d.caption_column)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "cache.json").exists() and not any(out.glob("cache*.json")):
        raise ConfigError(f"--out {out} is a non-empty folder that is not a cache: choose a new folder")
    teacher = load_teacher(cfg.model)
    transform = ImageTransform(d.resolution, d.center_crop, d.random_flip, d.min_size, d.max_aspect)
    index = build_cache(
        teacher, source, transform, out, d.data, args.batch_size, args.shard_size, args.dtype, args.overwrite,
        progress=not args.no_progress, device=pick_device(args.device),
    )  # fmt: skip
    from lcmkit.data import summarize_skips

    print(f"lcmkit: cached {index['num_samples']} samples in {len(index['shards'])} shard(s) "
          f"({summarize_skips(index['skipped'])}) in {index['seconds']:.0f} s -> {out}; "
          f"train with --data cache:{out}")  # fmt: skip
    return 0


def _serve_generator(args: argparse.Namespace) -> Any:
    """The FewStepGenerator of serve / bench serve; no model: the shipped toy teacher and its LCM-LoRA."""
    from pathlib import Path

    from lcmkit.infer.generator import FewStepGenerator

    base, loras = base_and_loras(args.base, args.lora)
    if not base and not args.lcm:
        assets = Path(__file__).parent.parent / "toy" / "assets"
        if not (assets / "teacher" / "model_index.json").is_file() or not (assets / "lcm_lora").is_dir():
            raise ConfigError("no model given and the shipped toy teacher/LCM-LoRA are not in this build: "
                              "pass --base MODEL --lora LCM_LORA or --lcm FULL_LCM")  # fmt: skip
        base, loras = str(assets / "teacher"), [(str(assets / "lcm_lora"), 1.0)]
    return FewStepGenerator(base, loras, args.lcm, args.scheduler, args.device, args.dtype, args.base_config,
                            compile=args.compile, tcd_gamma=args.tcd_gamma)  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    from lcmkit.app.serve import serve

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be in 1..65535")
    if args.max_connections < 1:
        raise ConfigError(f"--max-connections {args.max_connections}: must be >= 1")
    serve(_serve_generator(args), args.host, args.port, args.max_connections, info={"model": args.lcm or args.base})
    return 0


def _bench_serve(args: argparse.Namespace) -> int:

    from lcmkit.app.serve import bench_latency
    from lcmkit.measure.system import machine, markdown

    if args.repeats < 1 or any(s < 1 or s > 8 for s in args.steps):
        raise ConfigError(f"--steps {args.steps} / --repeats {args.repeats}: steps in 1..8, repeats >= 1")
    rows = bench_latency(_serve_generator(args), args.steps, args.repeats)
    print(markdown(["steps", "prompt-to-image median ms", "generation median ms", "repeats"],
                   [[str(r["steps"]), f"{r['median_ms']:.1f}", f"{r['median_generation_ms']:.1f}", str(r["repeats"])]
                    for r in rows]), end="")  # fmt: skip
    _write_json(args.json, {"machine": machine(), "serve": rows})
    return 0


def _presets(args: argparse.Namespace) -> int:
    from lcmkit.distill.config import list_presets, preset_file

    if args.name:
        print(preset_file(args.name).read_text(), end="")
        return 0
    for name, p in list_presets().items():
        print(f"{name:<11} {p.get('family', '?'):<5} {p['mode']:<5} {p.get('description', '')}")
    print(
        "\nshow one: lcmkit presets NAME; use it: lcmkit distill --preset NAME --teacher ... (flags and --config win)"
    )
    return 0


def _push(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcmkit.outputs.hub import push

    url = push(Path(args.out), args.repo_id, args.private)
    print(f"lcmkit: pushed {args.out} -> {url}")
    return 0


def _toy_train_teacher(args: argparse.Namespace) -> int:
    import json
    from dataclasses import fields
    from pathlib import Path

    from lcmkit.toy.teacher import TeacherRecipe, train_teacher

    if args.vae is None:
        args.vae = str(Path(__file__).parent.parent / "toy" / "assets" / "vae")
    if not (Path(args.vae) / "config.json").is_file():
        raise ConfigError(f"--vae {args.vae}: not a trained toy VAE folder (no config.json); train one with "
                          "python -m lcmkit.toy.vae --out DIR --steps N")  # fmt: skip
    given = {f.name: getattr(args, f.name) for f in fields(TeacherRecipe) if getattr(args, f.name, None) is not None}
    summary = train_teacher(TeacherRecipe(**given), resume=not args.no_resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def _toy_ship_teacher(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lcmkit.toy.ship import SHIPPED_TEACHER, ship_teacher

    out = Path(args.out) if args.out else SHIPPED_TEACHER
    facts = ship_teacher(Path(args.run), out, args.eval_images, args.overwrite, progress=not args.no_progress)
    print(f"lcmkit: shipped the toy teacher to {out} ({facts['size_mb']:.1f} MB, "
          f"{facts['training']['compute_s'] / 3600:.1f} h of training); its card is {out}/README.md")  # fmt: skip
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lcmkit.toy.demo import DemoSettings, run_demo

    names = ("out", "mode", "teacher", "steps", "learning_rate", "num_ddim_timesteps", "seed", "shipped_lora",
             "tcd_gamma")  # fmt: skip
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    settings = DemoSettings.quick(**given) if args.quick else DemoSettings(**given)
    settings.check()
    result = run_demo(settings)
    print(result["table"])
    print(f"LCM n: distilled in this run ({result['distill_steps']} steps, {result['distill_s']:.0f} s), n sampling "
          f"steps; TCD n: the same model on TCDScheduler (gamma {settings.tcd_gamma:g}); teacher: DPM-Solver++ "
          "with guidance.")  # fmt: skip
    if result["shipped_lora"]:
        made = result["shipped_lora_steps"]
        print(f"shipped LCM n: {result['shipped_lora']}" + (f" ({made} steps of distillation)" if made else ""))
    print(f"lcmkit demo: {result['total_s']:.0f} s; grid, metrics and plot in {result['out']}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from PIL import Image

    from lcmkit.infer.generator import FewStepGenerator
    from lcmkit.infer.images import save_images

    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if args.num_images < 1:
        raise ConfigError(f"--num-images {args.num_images}: must be >= 1")
    init = None
    if args.image:
        if not Path(args.image).is_file():
            raise ConfigError(f"--image {args.image} does not exist")
        try:
            init = Image.open(args.image)
            init.load()
        except Exception as e:
            raise ConfigError(f"--image {args.image} is not a readable image: {e}") from None
    base, loras = base_and_loras(args.base, args.lora)
    gen = FewStepGenerator(base, loras, args.lcm, args.scheduler, args.device, args.dtype, args.base_config,
                           allow_pickle=args.allow_pickle, compile=args.compile)  # fmt: skip
    if args.compile:
        print("lcmkit: --compile: the first batch compiles the UNet and VAE decoder (minutes on a CPU)",
              file=sys.stderr)  # fmt: skip
    expanded = [p for p in prompts for _ in range(args.num_images)]
    images = gen(
        expanded, args.negative_prompt, args.steps, args.guidance, args.seed, args.width, args.height,
        args.batch_size, init, args.strength, args.tcd_gamma, progress=True,
    )  # fmt: skip
    info = {
        "steps": args.steps, "guidance": gen.default_guidance if args.guidance is None else args.guidance,
        "scheduler": args.scheduler, "negative_prompt": args.negative_prompt, "model": args.lcm or args.base,
        "loras": [f"{p}:{w}" for p, w in loras], "strength": args.strength if init else None,
    }  # fmt: skip
    out = save_images(images, expanded, args.out, args.seed, info, args.overwrite)
    print(f"lcmkit: {len(images)} image(s) in {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from lcmkit.formats.kohya import export_kohya
    from lcmkit.outputs.export import fuse_lora, import_kohya

    if args.format == "kohya":
        path = export_kohya(args.input, args.out, args.allow_pickle)
    elif args.format == "diffusers":
        if not args.base:
            raise ConfigError("export diffusers needs --base (the model the kohya LoRA was made for)")
        path = import_kohya(args.input, args.out, args.base, args.base_config, args.allow_pickle)
    elif args.format == "fused":
        if not args.base:
            raise ConfigError("export fused needs --base (the model the LoRA was made for)")
        path = fuse_lora(args.base, args.input, args.out, args.base_config, allow_pickle=args.allow_pickle)
    else:
        import torch

        from lcmkit.families.single_file import export_single_file

        dtype = None if args.dtype == "keep" else {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        path = export_single_file(args.input, args.out, dtype=dtype)
    print(f"lcmkit: wrote {path}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import json

    from lcmkit.formats.info import describe

    info = {k: v for k, v in describe(args.path).items() if v is not None}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _bench_distill(args: argparse.Namespace) -> int:

    from lcmkit.measure.bench import bench_distill, table
    from lcmkit.measure.system import machine

    rows = bench_distill(args.teacher, args.data, args.modes, args.steps, args.batch_size, args.resolution,
                         args.lora_rank, shlex.split(args.distill_args), teacher_config=args.teacher_config,
                         cache=args.cache, arch=args.arch, profile=args.profile, compile=args.compile)  # fmt: skip
    print(table(rows))
    _write_json(args.json, {"machine": machine(), "distill": rows})
    return 0


def _bench_soak(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from lcmkit.measure.bench import SoakBench, bench_soak

    given = {f.name: getattr(args, f.name) for f in fields(SoakBench) if getattr(args, f.name, None) is not None}
    cfg = SoakBench(**given)

    def show(sample: dict) -> None:
        if args.verbose:
            print(f"t {sample['t']:.0f} s  step {sample['step']}  RSS {sample['rss_mb']:.0f} MB", file=sys.stderr)

    r = bench_soak(cfg, show)
    print(f"lcmkit bench soak: {cfg.steps} LoRA steps, batch {cfg.batch_size}, {cfg.resolution} px: RSS "
          f"{r['rss_at_step_mb']:.1f} MB at step {r['at_step']}, {r['rss_end_mb']:.1f} MB at step {r['end_step']}: "
          f"{r['growth_pct']:+.2f}% (max after step {r['at_step']}: {r['max_rss_after_mb']:.1f} MB, peak "
          f"{r['peak_rss_mb']:.1f} MB, {r['median_s_per_step']:.3f} s/step)")  # fmt: skip
    _write_json(args.json, r)
    return 0


def split_list(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def toy_aliases(teacher: str | None, lora: str | None) -> tuple[str | None, str | None]:
    """--teacher toy / --lora toy: the shipped toy teacher and LCM-LoRA (checked)."""
    from lcmkit.toy.demo import toy_lora, toy_teacher

    return (toy_teacher() if teacher == "toy" else teacher), (toy_lora() if lora == "toy" else lora)


def base_and_loras(base: str | None, specs: list[str] | None) -> tuple[str | None, list[tuple[str, float]]]:
    """--base and repeated --lora PATH[:WEIGHT] of generate / serve, 'toy' naming the shipped ones."""
    from lcmkit.infer.loras import parse_lora_spec

    loras = [parse_lora_spec(s) for s in specs or []]
    return toy_aliases(base, None)[0], [(str(toy_aliases(None, path)[1]), weight) for path, weight in loras]


def _eval(args: argparse.Namespace) -> int:
    from lcmkit.measure.eval import EvalSettings, cycle, optional_scorers, parse_steps, read_prompts, run_eval

    n = 2 if args.quick and args.num_images is None else args.num_images
    if n is not None and n < 1:
        raise ConfigError(f"--num-images {n}: must be >= 1")
    steps = parse_steps(args.steps or ("1,2" if args.quick else "1,2,4,8"))
    teacher, lora = toy_aliases(args.teacher, args.lora)
    toy_scorers = []
    if args.prompts == "toy":  # toy captions, scored by the toy checker and probe
        from lcmkit.toy.demo import toy_prompts, toy_scores

        prompts, toy_scorers = toy_prompts(64 if n is None else n, args.seed), [toy_scores]
    else:
        prompts = read_prompts(args.prompts)
        prompts = cycle(prompts, len(prompts) if n is None else n)
    teacher_steps = None if args.teacher_steps is None else parse_steps(args.teacher_steps, "--teacher-steps")
    settings = EvalSettings(
        teacher=teacher, prompts=prompts, lora=lora, lcm=args.lcm, teacher_config=args.teacher_config,
        steps=steps, teacher_steps=teacher_steps, teacher_samplers=split_list(args.teacher_samplers),
        lcm_samplers=split_list(args.lcm_samplers), tcd_gamma=args.tcd_gamma,
        guidance=args.guidance, lcm_guidance=args.lcm_guidance, seed=args.seed, size=args.resolution,
        batch_size=args.batch_size, grid_rows=2 if args.quick else args.grid_rows, device=args.device,
        dtype=args.dtype, out=args.out, progress=not args.no_progress,
    )  # fmt: skip
    settings.check()
    scorers, skipped = optional_scorers(args.clip_model, args.inception, settings.device)
    result = run_eval(settings, scorers + toy_scorers)
    print(result["table"])
    if toy_scorers:  # the toy world's quality bar, also appended to eval.md
        import json
        from pathlib import Path

        from lcmkit.toy.demo import quality_bar

        rows = json.loads((Path(result["out"]) / "eval.json").read_text())["columns"]
        lines = quality_bar(rows)
        if args.lcm:  # a full LCM should do at least as well at 2 steps
            lines += quality_bar(rows, steps=2, dpm_steps=4)
        if lines:
            print("\n".join(["quality bar (LCM paper's claim at toy scale):", *lines]))
            with open(Path(result["out"]) / "eval.md", "a") as f:
                f.write("\n## Quality bar\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
    for line in skipped:
        print(f"lcmkit: {line}", file=sys.stderr)
    print(f"lcmkit eval: {result['n_images']} images per sampler in {result['total_s']:.0f} s; "
          f"eval.json, eval.md, quality.png and grid.png in {result['out']}")  # fmt: skip
    return 0


def _bench_generate(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from lcmkit.measure.bench import GenerateBench, bench_generate, generate_table

    given = {f.name: getattr(args, f.name) for f in fields(GenerateBench) if getattr(args, f.name, None) is not None}
    given["teacher"], lora = toy_aliases(given["teacher"], given.get("lora"))
    if lora is not None:
        given["lora"] = lora
    record = bench_generate(GenerateBench(**given))
    print(generate_table(record["generate"]))
    ours = record["generate"][0]
    if "speedup_vs_diffusers" in ours:
        db = ours["psnr_vs_diffusers_db"]
        print(f"{ours['model']}: {ours['speedup_vs_diffusers']:.2f}x the plain diffusers pipeline per image; images "
              + ("identical" if db is None else f"{db:.1f} dB PSNR apart"))  # fmt: skip
    m = record["machine"]
    print(f"machine: {m.get('gpu') or m['processor']}, {m['cpus']} CPUs ({m['threads']} threads), torch {m['torch']}, "
          f"diffusers {m['diffusers']}; {record['config']['device']} {record['config']['dtype']}, median of "
          f"{args.repeats} after {args.warmup} warm-up")  # fmt: skip
    _write_json(args.json, record)
    return 0


def _write_json(path: str | None, data: Any) -> None:
    """--json FILE of the bench commands: the results, indented."""
    if path:
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--teacher", required=True, help="hub id, diffusers folder or .safetensors file ('toy': the shipped one)"
    )
    p.add_argument("--teacher-config", help="for a single-file teacher offline: a diffusers folder with its configs")
    p.add_argument("--lora", help="the LCM-LoRA to evaluate on the teacher (file or folder; 'toy': the shipped one)")
    p.add_argument("--lcm", help="a full LCM: a distill output folder or its pipeline/ folder")
    p.add_argument("--guidance", type=float, default=7.5, help="the teacher's CFG scale (a full LCM's w by default)")
    p.add_argument("--lcm-guidance", type=float, help="default: 1 for an LCM-LoRA, --guidance for a full LCM")
    p.add_argument("--resolution", type=int, help="square image size (default: the model's native size)")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")


def _add_serve_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model (default with no model: the shipped toy teacher + its LCM-LoRA)")
    p.add_argument("--base-config", help="for a single-file base offline: a diffusers folder with its configs")
    p.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]", help="the LCM-LoRA (+ style LoRAs)")
    p.add_argument("--lcm", help="a full LCM (distill output, pipeline folder or single file)")
    p.add_argument("--scheduler", choices=["lcm", "tcd"], default="lcm")
    p.add_argument("--tcd-gamma", type=float, default=0.3, help="with --scheduler tcd: TCD's gamma in [0, 1]")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet and VAE decoder at start (LoRAs fused; no teacher comparison)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcmkit", description="Latent Consistency Distillation for SD / SDXL")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("distill", help="distill a teacher into a full LCM or an LCM-LoRA",
                       description="Options come from --config (TOML) and flags; flags win.")  # fmt: skip
    add_flags(p)
    p.set_defaults(func=_distill)

    c = sub.add_parser("cache", help="encode a data source once (VAE latents + text embeddings) for fast steps",
                       description="Model and data options as for distill (same --config works); the result is "
                       "used with --data cache:OUT.")  # fmt: skip
    add_flags(c, sections=("model", "data"))
    c.add_argument("--out", required=True, help="cache folder")
    c.add_argument("--batch-size", type=int, default=16, help="images encoded at once")
    c.add_argument("--shard-size", type=int, default=1024, help="samples per cache shard")
    c.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16", help="storage precision")
    c.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    c.add_argument("--overwrite", action="store_true", help="rebuild a finished cache")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_cache)

    sv = sub.add_parser("serve", help="a real-time generation page (the image follows the prompt as you type)")
    _add_serve_model_flags(sv)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--max-connections", type=int, default=32, help="concurrent connections before 503")
    sv.set_defaults(func=_serve)

    pr = sub.add_parser("presets", help="list the shipped distillation presets, or show one")
    pr.add_argument("name", nargs="?")
    pr.set_defaults(func=_presets)

    pu = sub.add_parser("push", help="upload a finished distill folder (weights, model card, record, grids)")
    pu.add_argument("out", help="the distill output folder")
    pu.add_argument("--repo-id", required=True, help="e.g. you/sd15-lcm-lora")
    pu.add_argument("--private", action="store_true")
    pu.set_defaults(func=_push)

    g = sub.add_parser("generate", help="few-step images from base + LCM-LoRA (+ style LoRAs) or a full LCM")
    g.add_argument("--base", help="base model: hub id, diffusers folder or .safetensors file ('toy': the shipped one)")
    g.add_argument("--base-config", help="for a single-file base offline: a diffusers folder with its configs")
    g.add_argument(
        "--lora", action="append", metavar="PATH[:WEIGHT]", help="LoRA to stack (repeatable), e.g. the LCM-LoRA"
    )
    g.add_argument("--lcm", help="a full LCM: a distill output folder or its pipeline/ folder")
    g.add_argument("--prompt", action="append", help="repeatable")
    g.add_argument("--prompts-file", help="one prompt per line")
    g.add_argument("--negative-prompt")
    g.add_argument("--steps", type=int, default=4)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and VAE decoder (LoRAs fused in): faster images after a one-time "
                        "compile of minutes; worth it for many images")  # fmt: skip
    g.add_argument("--guidance", type=float, default=None, help="default: 1 with a LoRA, 8.5 for a full LCM")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--scheduler", choices=["lcm", "tcd"], default="lcm")
    g.add_argument("--tcd-gamma", type=float, default=0.3, help="with --scheduler tcd: TCD's gamma in [0, 1]")
    g.add_argument("--image", help="init image for img2img")
    g.add_argument("--strength", type=float, default=0.5, help="img2img strength in [0, 1]")
    g.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    g.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    g.add_argument("--out", default="generated")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    g.set_defaults(func=_generate)

    e = sub.add_parser("export", help="convert outputs: kohya LoRA keys, fused pipeline, single-file checkpoint")
    e.add_argument("format", choices=["kohya", "diffusers", "fused", "single-file"],
                   help="kohya: diffusers LoRA -> kohya/webui keys; diffusers: kohya LoRA -> diffusers; "
                   "fused: base + LoRA -> pipeline folder; single-file: pipeline -> original-layout file")  # fmt: skip
    e.add_argument("input", help="LoRA file/folder, or a pipeline folder for single-file")
    e.add_argument("--out", required=True)
    e.add_argument("--base", help="for fused and diffusers: the base model the LoRA belongs to")
    e.add_argument("--base-config", help="with a single-file base offline: a diffusers folder with its configs")
    e.add_argument("--dtype", choices=["fp16", "fp32", "keep"], default="fp16", help="for single-file")
    e.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE_HELP)
    e.set_defaults(func=_export)

    i = sub.add_parser("info", help="say what a file or folder is (LoRA, pipeline, UNet, checkpoint, run)")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_info)

    ev = sub.add_parser("eval", help="quality against steps and time: distilled model vs teacher samplers",
                        description="Same prompts and initial noise for every sampler; agreement with the teacher's "
                        "DDIM 50-step image, s/image, optional CLIP score / FID from local weights.")  # fmt: skip
    _add_model_flags(ev)
    ev.add_argument("--prompts", required=True, help="a file with one prompt per line, or 'toy' (toy-world captions "
                    "and the toy probe metrics)")  # fmt: skip
    ev.add_argument("--steps", help="distilled-model step counts (default 1,2,4,8); the teacher adds 25 and 50")
    ev.add_argument("--teacher-steps", help="the teacher's step counts (default: --steps plus 25 and 50); without "
                    "50 there is no DDIM 50 reference, so no PSNR/MS-SSIM/FID")  # fmt: skip
    ev.add_argument("--teacher-samplers", default="ddim,dpm++", help="teacher samplers: ddim, dpm++ or both")
    ev.add_argument("--lcm-samplers", default="lcm", help="the distilled model's samplers: lcm (LCMScheduler), tcd "
                    "(TCDScheduler) or both")  # fmt: skip
    ev.add_argument("--tcd-gamma", type=float, default=0.3, help="TCD's gamma (0: deterministic; 1: LCM's sampling)")
    ev.add_argument("--num-images", type=int, help="images per sampler (default: one per prompt; 64 for toy)")
    ev.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--grid-rows", type=int, default=4)
    ev.add_argument("--clip-model", help="local transformers CLIP folder (or LCMKIT_CLIP); without it no CLIP score")
    ev.add_argument("--inception", help="local torchvision Inception-v3 .safetensors (or LCMKIT_INCEPTION) for FID")
    ev.add_argument("--out", default="eval")
    ev.add_argument("--quick", action="store_true", help="smoke-test size: 2 images, steps 1,2, 2 grid rows")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_eval)

    b = sub.add_parser("bench", help="measure distillation throughput, generation latency and memory").add_subparsers(
        dest="bench_command", required=True
    )
    bd = b.add_parser("distill", help="s/step, samples/s and peak RSS per mode, each in its own process")
    bd.add_argument("--teacher", help="the teacher to distill (or --arch)")
    bd.add_argument("--arch", choices=ARCHS, help="build this public architecture with random weights instead")
    bd.add_argument("--teacher-config")
    bd.add_argument("--data", help="training data (with --arch, default: a few synthetic images)")
    bd.add_argument("--modes", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    bd.add_argument("--steps", type=int, default=20)
    bd.add_argument("--batch-size", type=int, default=4)
    bd.add_argument("--resolution", type=int, default=512)
    bd.add_argument("--lora-rank", type=int, default=64)
    bd.add_argument("--cache", action="store_true", help="also run each mode from an lcmkit cache of --data")
    bd.add_argument("--profile", action="store_true", help="also break each step down by phase (torch.profiler)")
    bd.add_argument("--compile", action="store_true", help="also run each mode with distill --compile (torch.compile)")
    bd.add_argument("--distill-args", default="", help="extra distill flags, e.g. '--gradient-checkpointing'")
    bd.add_argument("--json", help="also write the results (with machine info) to this file")
    bd.set_defaults(func=_bench_distill)
    bg = b.add_parser("generate", help="latency per image and images/s: distilled model vs teacher sampler",
                      description="End to end and UNet-only; warm-up excluded, median of repeats; CUDA events and "
                      "GPU memory on CUDA, wall time and peak RSS on CPU.")  # fmt: skip
    _add_model_flags(bg)
    bg.add_argument("--steps", type=int, default=4, help="distilled-model steps")
    bg.add_argument("--teacher-steps", type=int, default=25)
    bg.add_argument("--sampler", choices=["dpm++", "ddim"], default="dpm++", help="the teacher's sampler")
    bg.add_argument("--batch", type=int, default=1)
    bg.add_argument("--repeats", type=int, default=5)
    bg.add_argument("--warmup", type=int, default=1)
    bg.add_argument("--prompt")
    bg.add_argument("--compile", action="store_true", help="time lcmkit generate --compile (compile not timed)")
    bg.add_argument(
        "--vs-diffusers",
        action="store_true",
        help="also time the same weights in the plain diffusers pipeline and compare the images",
    )
    bg.add_argument("--json", help="also write the results (machine, versions, configuration) to this file")
    bg.set_defaults(func=_bench_generate)

    bs = b.add_parser("serve", help="prompt-to-image latency through lcmkit serve (median of repeats)")
    _add_serve_model_flags(bs)
    bs.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    bs.add_argument("--repeats", type=int, default=20)
    bs.add_argument("--json", help="also write the results (with machine info) to this file")
    bs.set_defaults(func=_bench_serve)

    bsk = b.add_parser("soak", help="memory over a long LCM-LoRA run: RSS after --at-step vs at the end",
                      description="Runs lcmkit distill (LoRA) in a subprocess and samples its resident memory; "
                      "a leak shows as growth between step --at-step and the end.")  # fmt: skip
    bsk.add_argument("--teacher", required=True, help="any teacher distill takes (e.g. the toy teacher folder)")
    bsk.add_argument("--teacher-config")
    bsk.add_argument("--data", required=True)
    bsk.add_argument("--steps", type=int, default=2000)
    bsk.add_argument("--batch-size", type=int, default=2)
    bsk.add_argument("--resolution", type=int, default=512)
    bsk.add_argument("--lora-rank", type=int, default=64)
    bsk.add_argument("--at-step", type=int, default=200, help="the reference point for growth")
    bsk.add_argument("--interval-s", type=float, default=1.0, help="seconds between memory samples")
    bsk.add_argument("--checkpoint-every", type=int, default=500)
    bsk.add_argument("--out", help="keep the run here (default: a temporary folder)")
    bsk.add_argument("--json", help="also write every sample and the summary to this file")
    bsk.set_defaults(func=_bench_soak)

    d = sub.add_parser("demo", help="distill the shipped toy teacher and compare it with its teacher, offline")
    d.add_argument("--out", default=None, help="output folder (default runs/demo)")
    d.add_argument("--mode", choices=["lora", "full"], default=None)
    d.add_argument("--steps", type=int, default=None, help="distillation steps")
    d.add_argument("--learning-rate", type=float, default=None,
                   help="of the distillation (default 1e-4: quick to converge in the short live run)")  # fmt: skip
    d.add_argument("--num-ddim-timesteps", type=int, default=None,
                   help="N of the distillation's skipping-step grid (k = 1000 / N)")  # fmt: skip
    d.add_argument("--teacher", default=None, help="another toy-world teacher folder")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--shipped-lora", default=None,
                   help="an LCM-LoRA of the same teacher to show beside the live run (default with the shipped "
                        "teacher: the shipped toy LCM-LoRA; 'none' to leave it out)")  # fmt: skip
    d.add_argument("--tcd-gamma", type=float, default=None, help="gamma of the TCD columns (default 0.3)")
    d.add_argument("--quick", action="store_true", help="a smoke-test sized run")
    d.set_defaults(func=_demo)

    toy = sub.add_parser("toy", help="the embedded toy world: build its teacher").add_subparsers(
        dest="toy_command", required=True
    )
    t = toy.add_parser("train-teacher", help="train the tiny toy teacher (resumable; checkpoints in --out)")
    t.add_argument("--out", required=True)
    t.add_argument("--vae", default=None, help="trained toy VAE folder (default: the shipped one)")
    for name, tp in (
        ("steps", int),
        ("batch_size", int),
        ("learning_rate", float),
        ("seed", int),
        ("eval_every", int),
        ("eval_images", int),
        ("num_threads", int),
        ("checkpoint_every", int),
    ):
        t.add_argument("--" + name.replace("_", "-"), type=tp, default=None)  # fmt: skip
    t.add_argument(
        "--train-text-encoder",
        action="store_const",
        const=True,
        default=None,
        help="train the CLIP text encoder too (default: frozen at its seeded initialisation)",
    )
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_toy_train_teacher)
    sh = toy.add_parser("ship-teacher", help="copy a trained toy teacher into the package with its card and scores")
    sh.add_argument("--run", required=True, help="the --out folder of lcmkit toy train-teacher")
    sh.add_argument("--out", default=None, help="where to put it (default: lcmkit/toy/assets/teacher)")
    sh.add_argument("--eval-images", type=int, default=300, help="held-out prompts for the card's scores")
    sh.add_argument("--overwrite", action="store_true")
    sh.add_argument("--no-progress", action="store_true")
    sh.set_defaults(func=_toy_ship_teacher)
    return parser


def _quiet_libraries(verbose: bool) -> None:
    """Our own progress bars and one-line errors only: no loading bars or advisory warnings from the libraries."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    if verbose:
        return
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE") and argv is None:  # `lcmkit presets | head`: end quietly like other CLI tools
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="lcmkit: %(message)s")
    _quiet_libraries(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as e:
        print(f"lcmkit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PushError as e:
        print(f"lcmkit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lcmkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # faults raised inside the run: one line each (-v shows the traceback)
        from lcmkit.data import DataError
        from lcmkit.errors import os_error_text
        from lcmkit.train.session import PeerFailed, TrainingError

        if isinstance(e, PeerFailed):  # the process that failed has said why
            return EXIT_FAULT
        if isinstance(e, (DataError, TrainingError, OSError)) and not args.verbose:
            text = os_error_text(e) if isinstance(e, OSError) else str(e)
            print(f"lcmkit: error: {text}", file=sys.stderr)
            return EXIT_USAGE if isinstance(e, DataError) else EXIT_FAULT
        raise


if __name__ == "__main__":
    sys.exit(main())
