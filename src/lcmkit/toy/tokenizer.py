"""The toy world's CLIP tokenizer: the real CLIP BPE cut to 2,514 tokens, shipped as an asset."""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

ASSET_DIR = Path(__file__).parent / "assets" / "tokenizer"


def load_toy_tokenizer() -> CLIPTokenizer:
    """The shipped small CLIP tokenizer (built by build_clip_tokenizer, saved with save_pretrained)."""
    return CLIPTokenizer.from_pretrained(ASSET_DIR)
