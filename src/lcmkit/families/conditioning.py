"""Prompts -> text conditioning: the Conditioning a denoiser takes besides (z_t, t), and the TextConditioner that
encodes prompts with a family's own text encoding (families/sd.py, sdxl.py, sd3.py, flux.py) and, for a family with time
ids (SDXL), add_time_ids = (original size, crop top-left, target size).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lcmkit.families.base import Family


@dataclass
class ConditioningSettings:
    """Options of the [lcd] section that say how prompts condition the teacher."""

    uncond: str = "auto"
    """Unconditional embedding: 'empty' (the empty prompt's), 'zeros' (the reference scripts'), or 'auto':
    what the teacher's own pipeline uses (zeros for SDXL with force_zeros_for_empty_prompt, else empty)."""


@dataclass
class Conditioning:
    """What a denoiser needs besides (z_t, t). `pooled` is set for SDXL, SD3 and FLUX, `time_ids` for SDXL only."""

    hidden_states: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None

    def cat(self, other: Conditioning) -> Conditioning:
        def join(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None else torch.cat([a, b])

        return Conditioning(
            torch.cat([self.hidden_states, other.hidden_states]),
            join(self.pooled, other.pooled),
            join(self.time_ids, other.time_ids),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        def move(x: Tensor | None, float_: bool = True) -> Tensor | None:
            return None if x is None else x.to(device=device, dtype=dtype if float_ else None)

        return Conditioning(move(self.hidden_states), move(self.pooled), move(self.time_ids))

    def where(self, mask: Tensor, other: Conditioning) -> Conditioning:
        """Rows where `mask` is true come from `other` (caption dropout: the unconditional branch)."""

        def pick(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None else torch.where(mask.view(-1, *[1] * (a.dim() - 1)).to(a.device), b, a)

        return Conditioning(
            pick(self.hidden_states, other.hidden_states), pick(self.pooled, other.pooled), self.time_ids
        )

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden_states}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


def sdxl_time_ids(original_sizes: Tensor, crops_top_left: Tensor, target_size: tuple[int, int]) -> Tensor:
    """add_time_ids rows (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    target = torch.tensor(target_size, dtype=torch.float32).expand(original_sizes.shape[0], 2)
    return torch.cat([original_sizes.float(), crops_top_left.float(), target], dim=1)


class TextConditioner:
    """Encodes prompts with the teacher's tokenizer(s) and text encoder(s)."""

    def __init__(self, family: Family, tokenizers: list[Any], text_encoders: list[torch.nn.Module]):
        self.family = family
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self._empty: Conditioning | None = None

    @property
    def device(self) -> torch.device:
        if not self.text_encoders:  # released (training from a cache): where the empty prompt's encoding lives
            return self._empty.hidden_states.device
        return next(self.text_encoders[0].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self._empty.hidden_states.dtype if not self.text_encoders else self.text_encoders[0].dtype

    def release_encoders(self) -> None:
        """Encode the empty prompt now, then drop the text encoders (training from a cache needs no more)."""
        ones = torch.ones(1, 2)
        self._empty = self.encode([""], ones, ones, (1, 1))
        self.text_encoders = []

    def _token_ids(self, tokenizer: Any, prompts: list[str], length: int) -> Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)  # fmt: skip

    @torch.no_grad()
    def encode(
        self,
        prompts: list[str],
        original_sizes: Tensor | None = None,
        crops_top_left: Tensor | None = None,
        target_size: tuple[int, int] | None = None,
    ) -> Conditioning:
        """Prompts -> Conditioning. A family with time ids (SDXL) needs sizes (height, width) per prompt and the
        target size."""
        lengths = token_lengths(self.family, self.tokenizers)
        ids = [self._token_ids(tokenizer, prompts, n) for tokenizer, n in zip(self.tokenizers, lengths)]
        hidden, pooled = self.family.encode_text(ids, self.text_encoders)
        if not self.family.time_ids:
            return Conditioning(hidden, pooled)
        if original_sizes is None or target_size is None:
            raise ValueError(f"{self.family.label} conditioning needs original sizes and a target size")
        if crops_top_left is None:
            crops_top_left = torch.zeros_like(original_sizes)
        time_ids = sdxl_time_ids(original_sizes, crops_top_left, target_size).to(self.device)
        return Conditioning(hidden, pooled, time_ids)

    def from_cache(self, batch: dict[str, Any], target_size: tuple[int, int]) -> Conditioning:
        """The conditioning of a batch read from an lcmkit cache (same values encode() gives)."""
        dtype = self.dtype
        hidden = batch["hidden_states"].to(self.device, dtype)
        if not self.family.time_ids:
            return Conditioning(hidden, batch["pooled"].to(self.device, dtype) if "pooled" in batch else None)
        time_ids = sdxl_time_ids(batch["original_size"], batch["crop_top_left"], target_size).to(self.device)
        return Conditioning(hidden, batch["pooled"].to(self.device, dtype), time_ids)

    def unconditional(self, cond: Conditioning, mode: str = "empty") -> Conditioning:
        """The uncond counterpart of `cond`: the empty prompt's embedding, or zeros (reference scripts).

        SDXL keeps the same add_time_ids as the conditional branch."""
        batch = cond.hidden_states.shape[0]
        if mode == "zeros":
            pooled = None if cond.pooled is None else torch.zeros_like(cond.pooled)
            return replace(cond, hidden_states=torch.zeros_like(cond.hidden_states), pooled=pooled)
        if self._empty is None:
            ones = torch.ones(1, 2)
            self._empty = self.encode([""], ones, ones, (1, 1))
        empty = self._empty.to(cond.hidden_states.device, cond.hidden_states.dtype)
        pooled = None if empty.pooled is None else empty.pooled.expand(batch, -1)
        return Conditioning(empty.hidden_states.expand(batch, -1, -1), pooled, cond.time_ids)


def token_lengths(family: Family, tokenizers: list[Any]) -> list[int]:
    """Positions per tokenizer: the family's fixed length (its pipeline's default max_sequence_length), capped by the
    tokenizer's own model_max_length (a model trained on shorter T5 sequences, like the toy flow teacher, says so
    there); without a fixed length, the tokenizer's."""
    fixed = (*family.text_lengths, *[None] * len(tokenizers))
    return [min(n, tok.model_max_length) if n else tok.model_max_length for tok, n in zip(tokenizers, fixed)]
