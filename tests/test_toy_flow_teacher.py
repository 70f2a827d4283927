"""The toy flow teacher recipe (a tiny SD3, rectified flow) trains with lcmkit's Trainer, resumes on the same
trajectory, and yields a plain StableDiffusion3Pipeline folder whose short T5 length lcmkit's own conditioning and
pipelines follow."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from lcmkit.toy.flow_teacher import FlowTeacherRecipe, flow_loss, sigmas_of, train_flow_teacher
from lcmkit.toy.vae import build_toy_vae

SMALL = dict(batch_size=4, num_train_images=32, num_layers=1, num_heads=2, head_dim=16, text_hidden=16,
             t5_dim=32, warmup_steps=1, eval_every=0, checkpoint_every=2)  # fmt: skip


def test_flow_loss_is_zero_for_the_exact_velocity_and_sigmas_follow_the_shift():
    z0, eps = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    # a "network" that knows z0 and eps: the velocity eps - z0 is exact, whatever z_sigma it is shown
    exact = lambda hidden_states, **kw: (eps - z0,)  # noqa: E731
    assert flow_loss(exact, z0, eps, sigma, None, None).item() == 0.0
    u = torch.zeros(1)  # sigmoid(0) = 0.5; shift 3 maps it where FlowMatchEulerDiscreteScheduler maps it: 0.75
    assert sigmas_of(u, 1.0).item() == 0.5 and abs(sigmas_of(u, 3.0).item() - 0.75) < 1e-7


def test_flow_teacher_trains_resumes_exactly_and_saves_an_sd3_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from lcmkit.families.conditioning import TextConditioner
    from lcmkit.families.sd3 import SD3
    from lcmkit.infer.pipelines import sequence_length

    torch.manual_seed(0)
    build_toy_vae().save_pretrained(tmp_path / "vae")
    straight = dict(SMALL, out=str(tmp_path / "straight"), vae=str(tmp_path / "vae"))
    train_flow_teacher(FlowTeacherRecipe(steps=4, **straight), progress=False)
    recipe = dict(SMALL, out=str(tmp_path / "t"), vae=str(tmp_path / "vae"))
    train_flow_teacher(FlowTeacherRecipe(steps=2, **recipe), progress=False)
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text().strip() == "checkpoint-00000002"
    recipe.update(eval_every=4, eval_images=2)  # the in-training evaluation (Euler 28 + checker) runs too
    summary = train_flow_teacher(FlowTeacherRecipe(steps=4, **recipe), progress=False)  # resumes at step 2
    assert summary["steps"] == 4
    (evaluation,) = [json.loads(line) for line in (tmp_path / "t" / "eval.jsonl").read_text().splitlines()]
    assert evaluation["step"] == 4 and 0 <= evaluation["prompt_accuracy"] <= 1 and "position" in evaluation

    def log(run: str) -> list[float]:
        lines = (tmp_path / run / "logs" / "train_log.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert log("t") == log("straight") and all(np.isfinite(log("t")))  # the resumed run continues the same run
    final = [load_file(tmp_path / r / "checkpoints" / "checkpoint-00000004" / "state.safetensors") for r in
             ("t", "straight")]  # fmt: skip
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])

    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "t" / "teacher", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == 24 and sequence_length(pipe) == {"max_sequence_length": 16}
    prompt = "a small red circle in the center on a white background"
    # lcmkit's SD3 conditioning reads the short T5 length from the tokenizer: equal to the pipeline's own encoding
    ours = TextConditioner(SD3, [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
                       [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]).encode([prompt])  # fmt: skip
    theirs, _, pooled, _ = pipe.encode_prompt(prompt, prompt, prompt, do_classifier_free_guidance=False,
                                              max_sequence_length=16)  # fmt: skip
    assert ours.hidden_states.shape == (1, 24 + 16, 32) and torch.allclose(ours.hidden_states, theirs, atol=1e-5)
    assert torch.allclose(ours.pooled, pooled, atol=1e-5)
    image = pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                 max_sequence_length=16).images[0]  # fmt: skip
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_ship_flow_teacher_measures_its_euler_and_documents(tmp_path):
    from lcmkit.toy.ship import ship_teacher

    torch.manual_seed(0)
    build_toy_vae().save_pretrained(tmp_path / "vae")
    run = tmp_path / "run"
    train_flow_teacher(FlowTeacherRecipe(steps=2, **dict(SMALL, out=str(run), vae=str(tmp_path / "vae"))),
                       progress=False)  # fmt: skip
    facts = ship_teacher(run, tmp_path / "shipped", n_eval=2, progress=False)
    card = (tmp_path / "shipped" / "README.md").read_text()
    assert "StableDiffusion3Pipeline" in card and "max_sequence_length=16" in card and "h of compute" in card
    for label in ("teacher Euler 28", "teacher Euler 1 ", "teacher Euler 50", "teacher DPM++ 4"):
        assert label in card, label
    assert facts["parameters"]["transformer"] > 0 and facts["parameters"]["text_encoder_3"] > 0
    evaluation = json.loads((tmp_path / "shipped" / "evaluation" / "eval.json").read_text())
    assert any("probe_fd" in c.get("metrics", c) for c in evaluation["columns"])
