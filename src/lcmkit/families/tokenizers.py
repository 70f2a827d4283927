"""Real CLIP BPE tokenizers built offline from the merges file in the open_clip_torch wheel, at any vocabulary size.

The byte-level BPE of OpenAI CLIP is rebuilt from its merges file; keeping only the first merges keeps the tokenizer
class and algorithm while the embedding table stays small (DESIGN.md section 5)."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

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


def build_t5_tokenizer(words: list[str], model_max_length: int = 512) -> Any:
    """A real T5Tokenizer (SentencePiece unigram, as T5 v1.1 and the SD3/FLUX text encoders use) over a small
    vocabulary built offline: <pad> 0, </s> 1, <unk> 2, then "▁word" pieces for `words` and single letters and
    digits (with and without "▁") so that any lowercase text tokenizes."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
