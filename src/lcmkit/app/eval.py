"""`lcmkit eval`: quality against steps and time, the distilled model vs the teacher's samplers. Flags from
measure/eval.py's EvalSettings, plus the prompts, scorers and --quick declared here."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lcmkit.app.common import MODEL_FLAGS, RESOLUTION_HELP, split_list, toy_aliases
from lcmkit.app.flags import Flags
from lcmkit.errors import ConfigError
from lcmkit.measure.eval import EvalSettings, parse_steps

QUICK = {"num_images": 2, "steps": [1, 2], "grid_rows": 2}
"""--quick: a smoke-test sized eval (steps and images unless given; grid rows always)."""
TOY_IMAGES = 64
"""Images per sampler of --prompts toy without --num-images."""
REFERENCE_STEPS = " and ".join(map(str, EvalSettings.reference_steps))

EVAL = Flags(
    EvalSettings,
    spec={
        **MODEL_FLAGS,
        "steps": {"text": parse_steps,
                  "help": f"distilled-model step counts; the teacher adds {REFERENCE_STEPS}"},
        "reference_steps": {"text": lambda text: tuple(parse_steps(text, "--reference-steps")),
                            "help": "the teacher's step counts added to --steps when --teacher-steps is not given; "
                            "50 is the DDIM 50 reference"},
        "teacher_steps": {"text": lambda text: parse_steps(text, "--teacher-steps"),
                          "help": f"the teacher's step counts (default: --steps plus {REFERENCE_STEPS}); without 50 "
                          "there is no DDIM 50 reference, so no PSNR/MS-SSIM/FID"},
        "teacher_samplers": {"text": split_list,
                             "help": "teacher samplers: ddim, dpm++, euler (a flow teacher: euler for ddim)"},
        "lcm_samplers": {"text": split_list,
                         "help": "the distilled model's samplers: lcm (LCMScheduler), tcd (TCDScheduler), euler "
                         "(a flow model's deterministic steps on its training grid)"},
        "tcd_gamma": {"help": "TCD's gamma (0: deterministic; 1: LCM's sampling)"},
        "seed": {"help": "image i starts from the noise of seed + i"},
        "size": {"flag": "--resolution", "help": RESOLUTION_HELP},
        "progress": {"action": "store_false"},
    },
    skip=("prompts",),  # --prompts below: a file or 'toy', read by the handler
    unset=("steps",),  # --quick changes the default
)  # fmt: skip


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="quality against steps and time: distilled model vs teacher samplers",
                              description="Same prompts and initial noise for every sampler; agreement with the "
                              "teacher's DDIM 50-step image, s/image, optional CLIP score / FID from local "
                              "weights.")  # fmt: skip
    EVAL.add(p)
    p.add_argument("--prompts", required=True, help="a file with one prompt per line, or 'toy' (toy-world captions "
                   "and the toy probe metrics)")  # fmt: skip
    p.add_argument("--num-images", type=int, help=f"images per sampler (default: one per prompt; {TOY_IMAGES} for toy)")
    p.add_argument("--clip-model", help="local transformers CLIP folder (or LCMKIT_CLIP); without it no CLIP score")
    p.add_argument("--inception", help="local torchvision Inception-v3 .safetensors (or LCMKIT_INCEPTION) for FID")
    p.add_argument("--quick", action="store_true", help="smoke-test size: 2 images, steps 1,2, 2 grid rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lcmkit.measure.eval import cycle, optional_scorers, read_prompts, run_eval

    n = QUICK["num_images"] if args.quick and args.num_images is None else args.num_images
    if n is not None and n < 1:
        raise ConfigError(f"--num-images {n}: must be >= 1")
    quick = {"grid_rows": QUICK["grid_rows"], **({"steps": list(QUICK["steps"])} if args.steps is None else {})}
    teacher, lora = toy_aliases(args.teacher, args.lora)
    toy_scorers = []
    if args.prompts == "toy":  # toy captions, scored by the toy checker and probe
        from lcmkit.toy.demo import toy_prompts, toy_scores

        prompts, toy_scorers = toy_prompts(TOY_IMAGES if n is None else n, args.seed), [toy_scores]
    else:
        prompts = read_prompts(args.prompts)
        prompts = cycle(prompts, len(prompts) if n is None else n)
    settings: EvalSettings = EVAL.build(args, teacher=teacher, lora=lora, prompts=prompts,
                                        **(quick if args.quick else {}))  # fmt: skip
    settings.check()
    scorers, skipped = optional_scorers(args.clip_model, args.inception, settings.device)
    result = run_eval(settings, scorers + toy_scorers)
    print(result["table"])
    if toy_scorers:
        quality_bar(result["out"], full=bool(settings.lcm))
    for line in skipped:
        print(f"lcmkit: {line}", file=sys.stderr)
    print(f"lcmkit eval: {result['n_images']} images per sampler in {result['total_s']:.0f} s; "
          f"eval.json, eval.md, quality.png and grid.png in {result['out']}")  # fmt: skip
    return 0


def quality_bar(out: str, full: bool) -> None:
    """The toy world's quality bar (the LCM paper's claim at toy scale): printed and appended to eval.md."""
    import json
    from pathlib import Path

    from lcmkit.toy.demo import quality_bar as bar

    rows = json.loads((Path(out) / "eval.json").read_text())["columns"]
    lines = bar(rows)
    if full:  # a full LCM should do at least as well at 2 steps
        lines += bar(rows, steps=2, dpm_steps=4)
    if lines:
        print("\n".join(["quality bar (LCM paper's claim at toy scale):", *lines]))
        with open(Path(out) / "eval.md", "a") as f:
            f.write("\n## Quality bar\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
