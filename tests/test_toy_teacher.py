"""The toy teacher recipe trains with lcmkit's generic Trainer and yields a plain SD pipeline folder."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from lcmkit.toy.teacher import TeacherRecipe, train_teacher
from lcmkit.toy.vae import build_toy_vae


def test_teacher_recipe_trains_resumes_and_saves_a_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    build_toy_vae().save_pretrained(tmp_path / "vae")
    recipe = dict(out=str(tmp_path / "t"), vae=str(tmp_path / "vae"), batch_size=4, num_train_images=32,
                  unet_channels=(32, 32), text_hidden=32, text_layers=1, warmup_steps=1, eval_every=0,
                  checkpoint_every=2)  # fmt: skip
    train_teacher(TeacherRecipe(steps=2, **recipe), progress=False)
    assert (tmp_path / "t" / "checkpoints" / "latest").read_text().strip() == "checkpoint-00000002"
    recipe.update(eval_every=4, eval_images=2)  # the in-training evaluation (DDIM 50 + checker) runs too
    summary = train_teacher(TeacherRecipe(steps=4, **recipe), progress=False)  # resumes at step 2
    assert summary["steps"] == 4
    (evaluation,) = [json.loads(line) for line in (tmp_path / "t" / "eval.jsonl").read_text().splitlines()]
    assert evaluation["step"] == 4 and 0 <= evaluation["prompt_accuracy"] <= 1 and "position" in evaluation
    log = [json.loads(line) for line in (tmp_path / "t" / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(np.isfinite(r["loss"]) for r in log)

    # the text encoder stays at its initialisation (the default recipe), the UNet learns
    def weights(step: int, part: str) -> dict[str, torch.Tensor]:
        state = load_file(tmp_path / "t" / "checkpoints" / f"checkpoint-{step:08d}" / "state.safetensors")
        return {k: v for k, v in state.items() if k.startswith(f"model.{part}.")}

    for part, changed in (("text_encoder", False), ("unet", True)):
        before, after = weights(2, part), weights(4, part)
        assert before and any(not torch.equal(before[k], after[k]) for k in before) == changed, part

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "t" / "teacher", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a small red circle in the center on a white background", num_inference_steps=2,
                 height=32, width=32, output_type="np").images[0]  # fmt: skip
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_ship_teacher_copies_measures_and_documents(tmp_path):
    import pytest

    from lcmkit.errors import ConfigError
    from lcmkit.toy.ship import ship_teacher

    torch.manual_seed(0)
    build_toy_vae().save_pretrained(tmp_path / "vae")
    run = tmp_path / "run"
    recipe = TeacherRecipe(out=str(run), vae=str(tmp_path / "vae"), batch_size=4, num_train_images=32, steps=2,
                           unet_channels=(32, 32), text_hidden=32, text_layers=1, warmup_steps=1,
                           eval_every=0)  # fmt: skip
    with pytest.raises(ConfigError, match="no finished teacher"):
        ship_teacher(run, tmp_path / "shipped", n_eval=2, progress=False)
    train_teacher(recipe, progress=False)
    log = run / "logs" / "train_log.jsonl"  # a stop of an hour between two records is not training time
    log.write_text('{"step": 1, "time": 100.0}\n{"step": 2, "time": 160.0}\n{"step": 3, "time": 3760.0}\n'
                   '{"step": 4, "time": 3790.0}\n')  # fmt: skip
    facts = ship_teacher(run, tmp_path / "shipped", n_eval=2, progress=False)
    assert facts["training"]["compute_s"] == 90.0 and facts["training"]["stops"] == 1
    card = (tmp_path / "shipped" / "README.md").read_text()
    assert "0.0 h of compute" in card and "teacher DDIM 50" in card and "prompt accuracy" in card
    assert (tmp_path / "shipped" / "evaluation" / "grid.png").is_file()
    evaluation = json.loads((tmp_path / "shipped" / "evaluation" / "eval.json").read_text())
    assert any("probe_fd" in c.get("metrics", c) for c in evaluation["columns"])
    with pytest.raises(ConfigError, match="--overwrite"):
        ship_teacher(run, tmp_path / "shipped", n_eval=2, progress=False)
