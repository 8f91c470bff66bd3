"""Flickr30k Entities: the phrase markup of Sentences/<id>.txt and the VOC-style boxes of Annotations/<id>.xml.

Sentence lines look like `[/EN#18/people A child] in [/EN#19/clothing a pink dress] is climbing up ... .`:
each bracket is a phrase with its coreference chain id and one or more types; chain 0 / type
`notvisual` marks a phrase with no region. The text is tokenised (`a man 's arm`, a spaced final ` .`).
A box file lists <object>s with one or more <name> (chain ids) and either a <bndbox> with 1-based
inclusive pixel corners, or <nobndbox>/<scene> flags (the chain has no box).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from agree.io import InputError
from dataprep.geometry import Box, from_one_based

_PHRASE = re.compile(r"\[/EN#(\d+)((?:/[^\s/\[\]]+)*)\s+([^\[\]]*?)\s*\]")
NOT_VISUAL = "notvisual"


@dataclass(frozen=True)
class GoldPhrase:
    """One annotated phrase: its tokenised text, chain id and types."""

    text: str
    chain: str
    types: tuple[str, ...]

    @property
    def visual(self) -> bool:
        """False for the 'notvisual' phrases (chain 0), which name nothing in the image."""
        return self.chain != "0" and NOT_VISUAL not in self.types


@dataclass(frozen=True)
class GoldSentence:
    """A sentence without its markup (tokenised text) and its phrases in order."""

    text: str
    phrases: tuple[GoldPhrase, ...]


@dataclass
class GoldBoxes:
    """Boxes of each chain (continuous 0-based corners) and the annotated image size."""

    width: Optional[int]
    height: Optional[int]
    boxes: dict[str, list[Box]] = field(default_factory=dict)
    no_box: set[str] = field(default_factory=set)


def parse_sentence(line: str, where: str = "sentence") -> GoldSentence:
    """Parse one marked-up sentence; an unbalanced bracket raises InputError naming `where`."""
    phrases = []
    for m in _PHRASE.finditer(line):
        types = tuple(t for t in m.group(2).split("/") if t)
        phrases.append(GoldPhrase(" ".join(m.group(3).split()), m.group(1), types))
    plain = _PHRASE.sub(lambda m: m.group(3), line)
    if "[/EN#" in plain:
        raise InputError(f"{where}: unbalanced phrase markup (a '[/EN#' without its ']')")
    return GoldSentence(" ".join(plain.split()), tuple(phrases))


def read_sentences(path: Path) -> list[GoldSentence]:
    """All sentences of one Sentences/<id>.txt file, in order (blank lines skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    return [parse_sentence(line, f"{path}:{i}") for i, line in enumerate(lines, 1) if line.strip()]


def _int(elem: Optional[ET.Element], where: str) -> int:
    if elem is None or elem.text is None:
        raise InputError(f"{where}: missing value")
    try:
        return int(round(float(elem.text.strip())))
    except ValueError:
        raise InputError(f"{where}: not a number: {elem.text.strip()!r}") from None


def read_annotation(path: Path) -> GoldBoxes:
    """Parse one Annotations/<id>.xml; a box carrying several <name>s belongs to each of those chains."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as e:
        raise InputError(f"{path}: cannot parse ({e})") from None
    size = root.find("size")
    width = height = None
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        width, height = (
            _int(size.find("width"), f"{path}: <width>"),
            _int(size.find("height"), f"{path}: <height>"),
        )
    out = GoldBoxes(width, height)
    for k, obj in enumerate(root.iter("object")):
        names = [n.text.strip() for n in obj.findall("name") if n.text and n.text.strip()]
        bb = obj.find("bndbox")
        if bb is None:
            out.no_box.update(names)
            continue
        where = f"{path}: object {k}"
        box = from_one_based(
            *(_int(bb.find(t), f"{where} <{t}>") for t in ("xmin", "ymin", "xmax", "ymax"))
        )
        for name in names:
            out.boxes.setdefault(name, []).append(box)
    return out
