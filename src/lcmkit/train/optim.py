"""Optimizers of a run: AdamW (fused where torch has the kernel), 8-bit AdamW, matrix-factored Adafactor."""

from __future__ import annotations

import torch

from lcmkit.distill.config import DistillConfig
from lcmkit.errors import ConfigError


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


def make_optimizer(params: list[torch.nn.Parameter], cfg: DistillConfig) -> torch.optim.Optimizer:
    o = cfg.optim
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
