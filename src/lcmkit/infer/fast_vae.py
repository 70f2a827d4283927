"""A faster VAE decoder upsampler for CPU generation (same output up to float rounding)."""

from __future__ import annotations

from typing import Any

import torch


class SubpixelUpsample(torch.nn.Module):
    """diffusers' Upsample2D (nearest 2x, then a 3x3 convolution) computed on the low-resolution input: each of
    the four output phases (row and column parity) sees a 2x2 window of input pixels, so the 3x3 kernel folds into
    four 2x2 kernels. 16 instead of 36 multiply-adds per input pixel and channel pair, no 4x-sized intermediate;
    the same output up to float rounding (tests/test_generate.py)."""

    def __init__(self, upsample: torch.nn.Module):
        super().__init__()
        self.conv = upsample.conv  # the same state-dict keys as Upsample2D: save_pretrained writes a loadable VAE
        object.__setattr__(self, "fallback", upsample)  # not a submodule: its conv would be saved twice
        w = upsample.conv.weight.detach()
        rows = (  # phase 0 reads source rows (i-1, i), phase 1 rows (i, i+1)
            torch.stack([w[:, :, 0], w[:, :, 1] + w[:, :, 2]], 2),
            torch.stack([w[:, :, 0] + w[:, :, 1], w[:, :, 2]], 2),
        )
        kernels = [
            torch.stack([r[..., 0], r[..., 1] + r[..., 2]], -1)
            if b == 0
            else torch.stack([r[..., 0] + r[..., 1], r[..., 2]], -1)
            for r in rows
            for b in (0, 1)
        ]
        self.register_buffer("kernels", torch.stack(kernels), persistent=False)

    @staticmethod
    def applies_to(module: torch.nn.Module) -> bool:
        conv = getattr(module, "conv", None)
        return (
            type(module).__name__ == "Upsample2D" and module.use_conv and not module.use_conv_transpose
            and module.interpolate and module.norm is None and isinstance(conv, torch.nn.Conv2d)
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
        )  # fmt: skip

    def forward(self, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        n, _, h, w = hidden_states.shape
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            return self.fallback(hidden_states, output_size, *args, **kwargs)
        x = torch.nn.functional.pad(hidden_states, (1, 1, 1, 1))
        bias = self.conv.bias
        phases = [
            torch.nn.functional.conv2d(x[:, :, a : a + h + 1, b : b + w + 1], self.kernels[2 * a + b], bias)
            for a in (0, 1)
            for b in (0, 1)
        ]
        out = torch.stack(phases, 2).view(n, -1, 2, 2, h, w)  # (n, c, row phase, column phase, h, w)
        return out.permute(0, 1, 4, 2, 5, 3).reshape(n, -1, 2 * h, 2 * w)


def subpixel_vae_decoder(vae: torch.nn.Module) -> int:
    """Swap the VAE decoder's upsamplers for SubpixelUpsample; returns how many. The decoder's weights are frozen
    from here on (generation only)."""
    count = 0
    for block in vae.decoder.up_blocks:
        for i, up in enumerate(block.upsamplers or []):
            if SubpixelUpsample.applies_to(up):
                block.upsamplers[i] = SubpixelUpsample(up)
                count += 1
    return count
