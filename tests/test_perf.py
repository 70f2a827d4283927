"""Every speed optimization keeps the math: same losses for a fixed seed, the teacher view equals the adapters
disabled, the profile breakdown is written. (Speed itself is measured by `lcmkit bench`, never here.)"""

from __future__ import annotations

import json

import pytest
import torch
from test_distill_e2e import distill_args, losses, run_cli

from lcmkit.distill.config import LCDConfig
from lcmkit.families.conditioning import Conditioning
from lcmkit.families.models import LoraConfig, build_lcd_models
from lcmkit.families.teacher import ModelConfig, load_teacher
from lcmkit.families.unet import unet_call


def test_lora_teacher_view_shares_weights_and_equals_adapters_disabled(tiny_sd):
    teacher = load_teacher(ModelConfig(teacher=tiny_sd))
    models = build_lcd_models(teacher, "lora", LCDConfig(), LoraConfig(lora_rank=4))
    student, view = models.student_net, models.teacher_net
    assert view is not student
    base = dict(view.named_parameters())
    for name, p in student.named_parameters():  # no copy of the frozen weights
        if not p.requires_grad:
            key = name.replace(".base_layer", "")
            assert base[key].data_ptr() == p.data_ptr(), name
    with torch.no_grad():  # make the adapters matter
        for p in models.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500])
    dim = student.config.cross_attention_dim
    cond = Conditioning(torch.randn(2, 77, dim, generator=g))
    with torch.no_grad():
        via_view = models.teacher(z, t, cond, torch.zeros(2))
        student.disable_adapters()
        disabled = unet_call(student, z, t, cond)
        student.enable_adapters()
        adapted = unet_call(student, z, t, cond)
    torch.testing.assert_close(via_view, disabled, rtol=0, atol=1e-6)
    assert (adapted - disabled).abs().max() > 1e-3  # the comparison could fail


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_optimizations_keep_the_fixed_seed_losses(tiny_sd, shards, tmp_path, mode):
    fast, plain = tmp_path / "fast", tmp_path / "plain"
    assert run_cli(*distill_args(tiny_sd, shards, fast, mode, "--max-steps", "4", "--profile-steps", "2")) == 0
    slow = ["--max-steps", "4", "--no-fused-adam", "--cpu-conv", "onednn"]
    assert run_cli(*distill_args(tiny_sd, shards, plain, mode, *slow)) == 0
    a, b = losses(fast), losses(plain)
    assert sorted(a) == [1, 2, 3, 4]
    assert a[1] == pytest.approx(b[1], rel=1e-4)  # the same weights: the same loss
    # Adam's first updates are ~lr * sign(g): float noise in near-zero gradients (other conv kernels) grows over
    # steps: by step 4 in full mode 3.7e-3 relative on one CPU, 2.1e-2 on another (native against oneDNN convolutions
    # alone; fused against plain AdamW moved it by 2e-5). The update itself is tested exactly below.
    assert a[2] == pytest.approx(b[2], rel=1e-3)
    for step in (3, 4):
        assert a[step] == pytest.approx(b[step], rel=5e-2), step
    profile = json.loads((fast / "profile.json").read_text())
    assert profile["steps"] == 2
    for phase in ("lcd/student_forward", "lcd/teacher", "lcd/target", "train/backward", "train/optimizer"):
        assert profile["phases_ms"][phase] > 0, phase
    assert sum(profile["phases_ms"].values()) <= profile["ms_per_step"] * 1.01


def test_compiled_step_keeps_the_fixed_seed_losses(tiny_sd, shards, tmp_path, monkeypatch):
    """--compile (torch.compile of student, teacher view and target; minutes of compile on a CPU, so 3 steps
    only) trains the same weights: the same losses as the eager step, and a LoRA that loads as usual. Even when
    inductor's global freezing is on (an earlier inference compile in the same process once left it on: the
    no-grad target then kept the step-1 weights baked in)."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "freezing", True)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    steps = ["--max-steps", "3"]
    assert run_cli(*distill_args(tiny_sd, shards, eager, "lora", *steps)) == 0
    assert run_cli(*distill_args(tiny_sd, shards, compiled, "lora", *steps, "--compile")) == 0
    a, b = losses(compiled), losses(eager)
    assert sorted(a) == [1, 2, 3]
    assert a[1] == pytest.approx(b[1], rel=1e-4)
    for step in (2, 3):  # Adam's first updates amplify float noise in near-zero gradients (see above)
        assert a[step] == pytest.approx(b[step], rel=1e-2), (step, a, b)
    from safetensors.torch import load_file

    saved = load_file(compiled / "pytorch_lora_weights.safetensors")
    reference = load_file(eager / "pytorch_lora_weights.safetensors")
    assert saved.keys() == reference.keys()  # no torch.compile prefix in the saved names
    diff = torch.cat([(value - reference[name]).abs().flatten() for name, value in saved.items()])
    # Adam moves a weight by up to lr (1e-3) a step whatever its gradient's size: where the gradient is float
    # noise its sign can differ, so a few weights end up to 2 lr x 3 steps apart; nearly all agree closely.
    assert diff.max() <= 6e-3 and (diff > 1e-4).float().mean() < 0.01


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_channels_last_keeps_the_losses(tiny_sd, shards, tmp_path, mode):
    """--channels-last on (the default on CUDA) lays every UNet's convolution weights out channels-last, keeps the
    LoRA teacher a view of the student's own weights, and trains the same: the same fixed-seed losses."""
    models = build_lcd_models(load_teacher(ModelConfig(teacher=tiny_sd)), mode, LCDConfig(), LoraConfig(lora_rank=4),
                              memory_format=torch.channels_last)  # fmt: skip
    for unet in (models.student_net, models.teacher_net, models.target_net):
        if unet is not None:
            for conv in (unet.conv_in, unet.down_blocks[0].resnets[0].conv1):  # the second has LoRA adapters
                weight = conv.base_layer.weight if hasattr(conv, "base_layer") else conv.weight
                assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    if mode == "lora":
        view, adapted = (m.down_blocks[0].resnets[0].conv1 for m in (models.teacher_net, models.student_net))
        assert view.weight.data_ptr() == adapted.base_layer.weight.data_ptr()
    runs = {}
    for layout in ("on", "off"):
        out = tmp_path / layout
        assert run_cli(*distill_args(tiny_sd, shards, out, mode, "--max-steps", "2", "--channels-last", layout)) == 0
        runs[layout] = losses(out)
    assert runs["on"][1] == pytest.approx(runs["off"][1], rel=1e-4)
    assert runs["on"][2] == pytest.approx(runs["off"][2], rel=1e-2)


def test_fused_adamw_makes_the_same_update():
    from lcmkit.distill.config import DistillConfig
    from lcmkit.train.optim import make_optimizer

    shapes = [(8, 4), (16,), (4, 4, 3, 3)]
    runs = []
    for fused in (True, False):
        params = [
            torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)
        ]
        cfg = DistillConfig()
        cfg.optim.fused_adam = fused
        opt = make_optimizer(params, cfg.optim)
        assert opt.defaults.get("fused") is (True if fused else None)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            opt.step()
        runs.append(params)
    for fused_p, plain_p in zip(*runs):
        torch.testing.assert_close(fused_p, plain_p, rtol=1e-6, atol=1e-7)


def test_ema_target_stays_fp32_and_follows_lr_sized_updates(tiny_sd):
    teacher = load_teacher(ModelConfig(teacher=tiny_sd))
    models = build_lcd_models(teacher, "full", LCDConfig(ema_decay=0.95), LoraConfig(), torch.bfloat16)
    assert next(models.teacher_net.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in models.target_net.parameters()} == {torch.float32}
    assert models.target_autocast == torch.bfloat16  # it still computes in the run's precision
    start = [p.detach().clone() for p in models.target_net.parameters()]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # one step's change at lr 1e-6 is about this size
        for p in models.student_net.parameters():
            p.add_(2e-5 * torch.randn(p.shape, generator=g))
    models.update_ema()
    moved = moved_in_bf16 = 0
    for t, s, o in zip(models.target_net.parameters(), start, models.student_net.parameters()):
        torch.testing.assert_close(t, s.lerp(o, 0.05), rtol=0, atol=1e-9)
        moved += int((t != s).sum())
        half = s.bfloat16()  # why fp32: the same update on bf16 storage mostly rounds back to where it was
        moved_in_bf16 += int((half.float().lerp(o, 0.05).bfloat16() != half).sum())
    total = sum(s.numel() for s in start)
    assert moved > 0.9 * total and moved_in_bf16 < 0.2 * total


def test_bf16_teacher_computes_in_fp32_layer_by_layer(tiny_sd):
    reference = load_teacher(ModelConfig(teacher=tiny_sd))
    plain = build_lcd_models(reference, "full", LCDConfig(), LoraConfig())
    lean = build_lcd_models(load_teacher(ModelConfig(teacher=tiny_sd)), "full", LCDConfig(), LoraConfig(),
                            teacher_storage=torch.bfloat16)  # fmt: skip
    dtypes = {n: p.dtype for n, p in lean.teacher_net.named_parameters()}
    assert dtypes["conv_in.weight"] == torch.bfloat16 and dtypes["conv_norm_out.weight"] == torch.float32
    assert lean.teacher_dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 500])
    cond = Conditioning(torch.randn(2, 77, reference.denoiser.config.cross_attention_dim, generator=g))
    with torch.no_grad():
        a, b = plain.teacher(z, t, cond, None), lean.teacher(z, t, cond, None)
    assert b.dtype == torch.float32
    assert dict((n, p.dtype) for n, p in lean.teacher_net.named_parameters()) == dtypes  # back to storage
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()  # bf16 weights: close, not equal


def test_teacher_precision_option(tiny_sd, shards, tmp_path):
    a, b = tmp_path / "fp32", tmp_path / "bf16"
    assert run_cli(*distill_args(tiny_sd, shards, a, "full", "--max-steps", "2")) == 0
    assert run_cli(*distill_args(tiny_sd, shards, b, "full", "--max-steps", "2", "--teacher-precision", "bf16")) == 0
    assert losses(b)[1] == pytest.approx(losses(a)[1], rel=0.05)  # within bf16 tolerance
    assert losses(b)[1] != losses(a)[1]
    lora = distill_args(tiny_sd, shards, tmp_path / "x", "lora", "--teacher-precision", "bf16")
    assert run_cli(*lora) == 2


def test_adafactor_factors_convolutions_as_matrices():
    from lcmkit.train.optim import MatrixAdafactor

    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (8, 4), (8,)]
    values = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    as_matrix = [torch.nn.Parameter(v.clone().reshape(v.shape[0], -1) if v.dim() > 2 else v.clone()) for v in values]
    opt_a = MatrixAdafactor(ours, lr=1e-2, weight_decay=1e-2)
    opt_b = torch.optim.Adafactor(as_matrix, lr=1e-2, weight_decay=1e-2)
    for step in grads:
        for p, q, gr in zip(ours, as_matrix, step):
            p.grad, q.grad = gr.clone(), gr.clone().reshape(q.shape)
        opt_a.step()
        opt_b.step()
    for p, q, v in zip(ours, as_matrix, values):
        assert p.shape == v.shape
        torch.testing.assert_close(p.detach().reshape(q.shape), q.detach(), rtol=0, atol=0)
        assert not torch.equal(p.detach(), v)  # it moved
    conv_state = opt_a.state[ours[0]]
    assert conv_state["row_var"].shape == (8, 1) and conv_state["col_var"].shape == (1, 36)


def test_adafactor_option_resumes_exactly(tiny_sd, shards, tmp_path):
    args = ["--optimizer", "adafactor", "--checkpoint-every", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(*distill_args(tiny_sd, shards, straight, "full", *args, "--max-steps", "4")) == 0
    assert run_cli(*distill_args(tiny_sd, shards, resumed, "full", *args, "--max-steps", "2")) == 0
    (resumed / "lcmkit_run.json").unlink()
    again = ["--max-steps", "4", "--resume", "latest"]
    assert run_cli(*distill_args(tiny_sd, shards, resumed, "full", *args, *again)) == 0
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):  # the factored optimizer state came back from the checkpoint
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    assert run_cli(*distill_args(tiny_sd, shards, tmp_path / "bad", "full", "--optimizer", "sgd")) == 2


def test_cpu_conv_auto_picks_native_only_for_small_work():
    from lcmkit.distill.recipe import conv_kernels

    small_unet, cpu = torch.nn.Conv2d(4, 4, 3), torch.device("cpu")
    before = torch.backends.mkldnn.enabled
    seen = {}
    for choice, positions in (("auto", 256), ("auto", 8192), ("native", 8192), ("onednn", 256)):
        with conv_kernels(choice, small_unet, cpu, positions):
            seen[choice, positions] = torch.backends.mkldnn.enabled
        assert torch.backends.mkldnn.enabled == before
    assert seen == {("auto", 256): False, ("auto", 8192): True, ("native", 8192): False, ("onednn", 256): True}
