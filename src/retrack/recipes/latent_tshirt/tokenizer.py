"""A CLIP tokenizer built locally for the recipe's prompts: nothing is downloaded.

The vocabulary is GPT-2's byte alphabet (every character alone and word-final, so any text
encodes) plus one token per word of the prompts, reached through a chain of BPE merges; the
prompts thus encode one token per word, as with CLIP's own vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
WORDS = ("a", "handwritten", "digit", "photo", "of", "t", "-", "shirt")


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, which CLIP's byte-level BPE starts from."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]


def vocab_and_merges(words: Iterable[str] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Characters, then each word built left to right by merges ending in the word-final symbol."""
    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in words:
        if len(word) < 2:
            continue
        left = word[0]
        for j, c in enumerate(word[1:], start=1):
            right = c + "</w>" if j == len(word) - 1 else c
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for token in SPECIAL:
        vocab[token] = len(vocab)
    return vocab, merges


def save_tokenizer(path: Path, max_length: int):
    """Write vocab.json and merges.txt and return the CLIPTokenizer they make."""
    from transformers import CLIPTokenizer  # the optional [sd] extra

    vocab, merges = vocab_and_merges()
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length,
                         pad_token=SPECIAL[1])
