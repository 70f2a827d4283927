"""Optimizers of a run: AdamW (fused where torch has the kernel), 8-bit AdamW, matrix-factored Adafactor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lcmkit.errors import ConfigError


@dataclass
class OptimConfig:
    """The [optim] options."""

    learning_rate: float = 1e-4
    """Peak learning rate (the presets: 1e-6 full, 1e-4 LoRA)."""
    lr_scheduler: str = "constant"
    """A diffusers scheduler name: constant, constant_with_warmup, linear, cosine, ..."""
    lr_warmup_steps: int = 0
    """Steps of linear warm-up of the learning rate."""
    adam_beta1: float = 0.9
    """AdamW's beta1."""
    adam_beta2: float = 0.999
    """AdamW's beta2."""
    adam_epsilon: float = 1e-8
    """AdamW's epsilon."""
    adam_weight_decay: float = 1e-2
    """Weight decay (decoupled, AdamW's)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this."""
    use_8bit_adam: bool = False
    """bitsandbytes' 8-bit AdamW (CUDA only)."""
    optimizer: str = "adamw"
    """adamw, or adafactor (torch's: factored second moments, no first moment; a fraction of AdamW's state,
    for full LCD of large UNets in little memory)."""
    fused_adam: bool = True
    """torch's fused AdamW kernel where it has one (CPU and CUDA): the same update, one kernel for all tensors."""


LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
)  # fmt: skip


class MatrixAdafactor(torch.optim.Adafactor):
    """torch's Adafactor with every weight of more than two dimensions (a convolution's out x in x kh x kw)
    factored as the matrix out x (in kh kw), as the Adafactor paper treats them. torch factors over the last two
    dimensions instead: for a 3x3 convolution that keeps 2/3 of the weight's size as state (1.75 GB for the SD1.5
    UNet) and spends most of a step in norms over rows of 3 (38 s of an 84 s full-size step, measured)."""

    def _init_group(self, group, params_with_grad, grads, row_vars, col_vars, variances, state_steps) -> bool:
        start = len(params_with_grad)
        has_complex = super()._init_group(group, params_with_grad, grads, row_vars, col_vars, variances, state_steps)
        for i in range(start, len(params_with_grad)):
            p, g = params_with_grad[i], grads[i]
            if p.dim() > 2 and p.is_contiguous() and g.is_contiguous():
                params_with_grad[i], grads[i] = p.view(p.shape[0], -1), g.view(g.shape[0], -1)
                state = self.state[p]
                if state["row_var"].dim() > 2:  # first step: state for the matrix view
                    state["row_var"] = g.new_zeros(p.shape[0], 1)
                    state["col_var"] = g.new_zeros(1, grads[i].shape[1])
                row_vars[i], col_vars[i] = state["row_var"], state["col_var"]
        return has_complex


def make_optimizer(params: list[torch.nn.Parameter], o: OptimConfig) -> torch.optim.Optimizer:
    if o.optimizer == "adafactor":
        return MatrixAdafactor(params, lr=o.learning_rate, weight_decay=o.adam_weight_decay)
    kwargs = dict(lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                  weight_decay=o.adam_weight_decay)  # fmt: skip
    if o.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    if o.fused_adam:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except RuntimeError:  # a device or dtype without the fused kernel
            pass
    return torch.optim.AdamW(params, **kwargs)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig, max_steps: int) -> Any:
    """diffusers' learning-rate schedule by name (--lr-scheduler), with linear warm-up."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps, num_training_steps=max_steps)
