"""Textual entities (segs) of a caption: every seg is an exact substring of the caption.

Sources, in the order the pipeline tries them: the gold phrases of Flickr30k Entities (tokenised
text located on Karpathy's raw caption: `a man 's arm` -> `a man's arm`), then an extractor:
`textblob` (the Pattern chunker bundled with TextBlob, offline: noun-phrase chunks, with `NP 's NP`
and `NP of NP` joined) or `spacy` (noun chunks of an installed English pipeline; nothing is downloaded).
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Iterable, Optional, Sequence

from agree.io import InputError
from dataprep.entities_files import GoldSentence

Extractor = Callable[[str], list[str]]
EXTRACTORS = ("textblob", "spacy")

_TOKEN = re.compile(
    r"""
    \w+(?=n't\b)                 # do|n't
  | n't\b
  | '(?:s|re|ll|ve|m|d)\b        # clitics: man|'s
  | \w+(?:[-.]\w+)*              # words, hyphenated words, decimals
  | \S                           # any other character on its own
""",
    re.X | re.I,
)
_NOUN_TAGS = {"NN", "NNS", "NNP", "NNPS"}
_PTB = {
    "``": "(?:``|''|\"|“|”)",
    "''": "(?:``|''|\"|“|”)",
    "-LRB-": r"\(",
    "-RRB-": r"\)",
    "-LSB-": r"\[",
    "-RSB-": r"\]",
    "-LCB-": r"\{",
    "-RCB-": r"\}",
}


def tokenize(text: str) -> list[tuple[str, int, int]]:
    """Penn-Treebank-like tokens with their character spans: "man's" -> man, 's."""
    return [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def unique(items: Iterable[str]) -> list[str]:
    """Items in first-seen order, without repeats or empty strings."""
    return list(dict.fromkeys(i for i in items if i))


# --------------------------------------------------------------------------- gold phrases
def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text).lower().rstrip(".")


def match_sentence(
    caption: str, index: int, sentences: Sequence[GoldSentence]
) -> Optional[GoldSentence]:
    """The Entities sentence of a raw caption: the one at the same position if its text agrees (ignoring
    spacing, case and a final period), else any sentence that agrees, else None."""
    key = _squash(caption)
    if index < len(sentences) and _squash(sentences[index].text) == key:
        return sentences[index]
    return next((s for s in sentences if _squash(s.text) == key), None)


@functools.lru_cache(
    maxsize=1 << 16
)  # phrases repeat across captions; re's own cache holds only 512
def _phrase_regex(phrase: str) -> Optional[re.Pattern]:
    tokens = phrase.split()
    if not tokens:
        return None
    body = r"\s*".join(_PTB.get(t, re.escape(t)) for t in tokens)
    pre = r"(?<!\w)" if re.match(r"\w", tokens[0]) else ""
    post = r"(?!\w)" if re.search(r"\w$", tokens[-1]) else ""
    return re.compile(pre + body + post, re.I)


def locate(phrase: str, caption: str, start: int = 0) -> Optional[tuple[int, int]]:
    """Character span in `caption` of a tokenised phrase, spaces between tokens optional, case ignored."""
    rx = _phrase_regex(phrase)
    if rx is None:
        return None
    m = rx.search(caption, start) or rx.search(caption)
    return (m.start(), m.end()) if m else None


def gold_segs(caption: str, sentence: GoldSentence) -> list[tuple[str, str]]:
    """(seg, chain id) of the visual phrases of `sentence` found in `caption`, in order; segs are caption substrings."""
    out, cursor = [], 0
    for p in sentence.phrases:
        if not p.visual:
            continue
        span = locate(p.text, caption, cursor)
        if span is None:
            continue
        cursor = span[1]
        out.append((caption[span[0] : span[1]], p.chain))
    return out


# --------------------------------------------------------------------------- extractors
class TextBlobChunker:
    """Noun-phrase chunks from TextBlob's bundled Pattern parser (works offline; no corpora needed)."""

    name = "textblob"

    def __init__(self):
        try:
            from textblob.en import parse
        except ImportError:
            raise InputError(
                "the textblob extractor needs the textblob package (pip install textblob)"
            ) from None
        self._parse = parse

    def __call__(self, caption: str) -> list[str]:
        tokens = tokenize(caption)
        if not tokens:
            return []
        tagged = self._parse(
            " ".join(t for t, _, _ in tokens),
            tokenize=False,
            tags=True,
            chunks=True,
            relations=False,
            lemmata=False,
        ).split()
        rows = [row for sentence in tagged for row in sentence]
        if len(rows) != len(
            tokens
        ):  # the parser kept our tokens in every case we tried; be safe anyway
            return []
        spans = _noun_chunks([(t, r[1], r[2]) for (t, _, _), r in zip(tokens, rows)])
        return unique(caption[tokens[a][1] : tokens[b - 1][2]] for a, b in spans)


def _noun_chunks(rows: Sequence[tuple[str, str, str]]) -> list[tuple[int, int]]:
    """Token spans [a, b) of the NP chunks of (word, tag, chunk) rows that hold a noun; `NP 's NP` and
    `NP of NP` are joined into one chunk."""
    chunks: list[list[int]] = []
    for i, (_, _, chunk) in enumerate(rows):
        if chunk == "I-NP" and chunks and chunks[-1][1] == i:
            chunks[-1][1] = i + 1
        elif chunk in ("B-NP", "I-NP"):
            chunks.append([i, i + 1])
    joined: list[list[int]] = []
    for a, b in chunks:
        if joined and a == joined[-1][1] + 1:
            word, tag, _ = rows[joined[-1][1]]
            if tag == "POS" or word.lower() == "of":
                joined[-1][1] = b
                continue
        joined.append([a, b])
    keep = []
    for a, b in joined:
        while a < b and rows[a][1] in {",", ".", ":", "POS"}:
            a += 1
        if any(rows[k][1] in _NOUN_TAGS for k in range(a, b)):
            keep.append((a, b))
    return keep


class SpacyChunker:
    """Noun chunks of an installed spaCy English pipeline (never downloaded at run time)."""

    name = "spacy"

    def __init__(self, model: str = "en_core_web_sm"):
        try:
            import spacy
        except ImportError:
            raise InputError(
                "--extractor spacy needs spaCy and an English pipeline: pip install spacy, then install "
                f"the pipeline package {model!r} (nothing is downloaded at run time)"
            ) from None
        try:
            self.nlp = spacy.load(model, disable=["ner", "lemmatizer", "textcat"])
        except OSError as e:
            raise InputError(
                f"--spacy-model {model!r}: pipeline not installed or unreadable ({e}); "
                "install it yourself (nothing is downloaded at run time)"
            ) from None
        if not self.nlp.has_pipe("parser"):
            raise InputError(
                f"--spacy-model {model!r} has no dependency parser, which noun chunks need"
            )

    def __call__(self, caption: str) -> list[str]:
        return unique(caption[c.start_char : c.end_char] for c in self.nlp(caption).noun_chunks)


_CACHE: dict[tuple[str, str], Extractor] = {}


def get_extractor(name: str, spacy_model: str = "en_core_web_sm") -> Extractor:
    """The extractor called `name` (built once per process)."""
    if name not in EXTRACTORS:
        raise InputError(
            f"--extractor: unknown extractor {name!r} (choose from {', '.join(EXTRACTORS)})"
        )
    key = (name, spacy_model if name == "spacy" else "")
    if key not in _CACHE:
        _CACHE[key] = TextBlobChunker() if name == "textblob" else SpacyChunker(spacy_model)
    return _CACHE[key]
