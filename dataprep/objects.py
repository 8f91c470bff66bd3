"""Objects of an image (objects/<dataset>_<split>_imgs_objs.jsonl): the Visual Genome vocabulary words
named by its textual entities or by its detector labels.

A seg names a word through its head, i.e. its last word (English noun phrases end in their noun):
its last two words (`tennis racket`), else its last word, else the singular of the last word
(`men` -> `man`, `dresses` -> `dress`), whichever is first in the vocabulary.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")
_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
    "oxen": "ox",
    "dice": "die",
}


def singulars(word: str) -> list[str]:
    """Likely singular forms of an English plural, most likely first ([] for a word not ending in s)."""
    if word in _IRREGULAR:
        return [_IRREGULAR[word]]
    if word.endswith("men") and len(word) > 4:
        return [word[:-3] + "man"]
    out = []
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("ves") and len(word) > 4:
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])
    return out


def head_word(phrase: str, vocabulary: set[str] | dict) -> Optional[str]:
    """The vocabulary word a phrase names through its head (see the module doc), or None."""
    words = _WORD.findall(phrase.lower())
    if not words:
        return None
    candidates = (
        ([" ".join(words[-2:])] if len(words) >= 2 else []) + [words[-1]] + singulars(words[-1])
    )
    return next((c for c in candidates if c in vocabulary), None)


def image_objects(phrases: Iterable[str], vocabulary: set[str] | dict) -> list[str]:
    """The distinct vocabulary words named by `phrases` (segs, then detector labels), in first-seen order."""
    out = dict.fromkeys(w for w in (head_word(p, vocabulary) for p in phrases) if w is not None)
    return list(out)
