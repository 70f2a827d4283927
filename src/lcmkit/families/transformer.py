"""What the rectified-flow transformer families (SD3/SD3.5, FLUX.1) share: the full student, the LoRA targets of their
joint-attention blocks, and the pooled text conditioning they need."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lcmkit.errors import ConfigError
from lcmkit.families.conditioning import Conditioning

JOINT_ATTENTION_TARGETS = (
    # image and text streams of every joint-attention block: attention projections and feed-forward
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip


def copy_student(teacher: nn.Module, guidance_embed_dim: int = 0) -> nn.Module:
    """A full student that starts as an exact copy of the teacher's transformer. Its guidance input, if it has one,
    is the teacher's own (FLUX.1-dev's guidance embedding); `guidance_embed_dim` is for UNets only."""
    return copy.deepcopy(teacher)


def weights_dtype(net: nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    return dtype or next(net.parameters()).dtype


def pooled(cond: Conditioning, family: str) -> torch.Tensor:
    if cond.pooled is None:
        raise ConfigError(f"{family} conditioning needs a pooled text embedding (re-encode, or rebuild the cache)")
    return cond.pooled


def feature_modules(transformer: nn.Module, count: int = 4) -> list[str]:
    """Up to `count` joint blocks, evenly spaced and the last included: the teacher features of an adversarial
    discriminator (each block's image tokens)."""
    n = len(transformer.transformer_blocks)
    picks = sorted({round((n - 1) * (i + 1) / count) for i in range(count)}) if n > count else range(n)
    return [f"transformer_blocks.{i}" for i in picks]


def token_map(out: tuple[torch.Tensor | None, torch.Tensor], z_t: torch.Tensor) -> torch.Tensor:
    """A joint block's output (text tokens, image tokens) -> its image tokens as a (B, D, H / p, W / p) map, p the
    patch size (SD3's patch embedding, FLUX's 2x2 packing): the tokens are in row-major order of the patch grid."""
    tokens = out[1]
    (b, n, d), (h, w) = tokens.shape, z_t.shape[-2:]
    p = round((h * w / n) ** 0.5)
    return tokens.reshape(b, h // p, w // p, d).permute(0, 3, 1, 2)
