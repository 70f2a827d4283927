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
