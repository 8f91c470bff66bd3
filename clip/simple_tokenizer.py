"""CLIP's byte-level BPE tokenizer (49,408 tokens) over the shipped merges file."""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import ftfy
import regex as re

DEFAULT_BPE_PATH = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = (
    49152 - 256 - 2
)  # merges used by CLIP: the vocabulary is 256 bytes x 2 + merges + 2 specials

# Words are split into: special tokens, English contractions, letter runs, single digits,
# and runs of other non-space characters (matched case-insensitively).
_WORD_RE = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    re.IGNORECASE,
)


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode character (printable Latin-1 bytes map to themselves).

    Insertion order matters: it is the order of the first 256 vocabulary entries
    (printable bytes first, then the others in byte order).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def basic_clean(text: str) -> str:
    """Fix mojibake with ftfy and undo (double) HTML escaping."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def whitespace_clean(text: str) -> str:
    """Collapse every whitespace run to one space."""
    return re.sub(r"\s+", " ", text).strip()


class SimpleTokenizer:
    """Text <-> BPE token ids, identical to OpenAI CLIP's tokenizer."""

    def __init__(self, bpe_path: str | Path = DEFAULT_BPE_PATH):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {SOT: SOT, EOT: EOT}
        self.sot_token = self.encoder[SOT]
        self.eot_token = self.encoder[EOT]

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49,408 for the shipped merges)."""
        return len(self.encoder)

    def bpe(self, token: str) -> str:
        """Apply BPE merges to one pre-tokenised word; returns space-separated symbols."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (cleaned and lower-cased), without start/end tokens."""
        text = whitespace_clean(basic_clean(text)).lower()
        ids: list[int] = []
        for word in _WORD_RE.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(mapped).split(" "))
        return ids

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of a sequence of token ids; word ends become spaces."""
        symbols = "".join(self.decoder[int(t)] for t in tokens)
        # '<', '/', 'w', '>' are printable bytes that map to themselves, so the word-end
        # marker survives the byte decoding and is replaced afterwards
        text = bytearray(self.byte_decoder[c] for c in symbols).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")
