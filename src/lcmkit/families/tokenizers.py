"""Real CLIP BPE tokenizers built offline from the merges file in the open_clip_torch wheel, at any vocabulary size.

The byte-level BPE of OpenAI CLIP is rebuilt from its merges file; keeping only the first merges keeps the tokenizer
class and algorithm while the embedding table stays small (DESIGN.md section 5)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable unicode table, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = [], 0
    for b in range(256):
        if b in printable:
            codes.append(b)
        else:
            codes.append(256 + extra)
            extra += 1
    order = printable + [b for b in range(256) if b not in printable]
    table = dict(zip(range(256), codes))
    return [chr(table[b]) for b in order]


def clip_bpe_file() -> Path:
    """The merges file inside the open_clip_torch wheel, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the CLIP BPE vocabulary comes from the open_clip_torch wheel: pip install --no-deps open_clip_torch"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def build_clip_tokenizer(num_merges: int = 2000, model_max_length: int = 77) -> CLIPTokenizer:
    """CLIPTokenizer with the first `num_merges` CLIP merges (vocab = 512 + merges + 2)."""
    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + num_merges]
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=model_max_length)
