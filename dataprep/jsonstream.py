"""Streaming reader for large JSON arrays (Visual Genome's objects.json, Karpathy's split files).

Elements are decoded one at a time with the standard library's C decoder, so memory holds one
element and a read buffer, never the whole document.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from agree.io import InputError, require_file

CHUNK = 1 << 20  # characters read at a time
MAX_ELEMENT = 256 << 20  # a single element larger than this is treated as malformed input
_WS = " \t\n\r"
_DECODER = json.JSONDecoder()


class _Stream:
    """A text buffer over a file, refilled on demand; `pos` indexes `buf`, `base` = chars dropped before it."""

    def __init__(self, path: Path, chunk: int):
        self.path, self.chunk = path, chunk
        self.f = open(path, "r", encoding="utf-8")
        self.buf, self.pos, self.base, self.eof = "", 0, 0, False

    def close(self) -> None:
        self.f.close()

    def _fill(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(self.chunk)
        if not data:
            self.eof = True
            return False
        if self.pos > self.chunk:  # drop what was consumed
            self.base += self.pos
            self.buf, self.pos = self.buf[self.pos :], 0
        self.buf += data
        return True

    def error(self, what: str, at: int | None = None) -> InputError:
        at = self.pos if at is None else at
        return InputError(f"{self.path}: malformed JSON near character {self.base + at}: {what}")

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file)."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self.error(
                f"expected one of {' '.join(repr(x) for x in chars)}, found {c or 'end of file'!r}"
            )
        self.pos += 1
        return c

    def value(self) -> Any:
        """Decode the next JSON value."""
        self.peek()
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
                # a number or literal that ends the buffer may continue in the next chunk
                if end < len(self.buf) or self.eof:
                    self.pos = end
                    return obj
            except json.JSONDecodeError as e:
                if self.eof or len(self.buf) - self.pos > MAX_ELEMENT:
                    raise self.error(e.msg, e.pos) from None
            if not self._fill() and self.eof and self.pos >= len(self.buf):
                raise self.error("unexpected end of file")


def iter_array(
    path: str | os.PathLike, key: Optional[str] = None, chunk: int = CHUNK
) -> Iterator[Any]:
    """Yield the elements of the top-level JSON array of `path`, or of the array under `key` of its top-level object."""
    s = _Stream(require_file(path), chunk)
    try:
        if key is None:
            yield from _elements(s)
            if s.peek():
                raise s.error("trailing data after the array")
            return
        s.expect("{")
        found = False
        if s.peek() == "}":
            s.pos += 1
        else:
            while True:
                name = s.value()
                if not isinstance(name, str):
                    raise s.error("expected an object key")
                s.expect(":")
                if name == key and not found:
                    found = True
                    yield from _elements(s)
                else:
                    s.value()
                if s.expect(",}") == "}":
                    break
        if not found:
            raise InputError(f"{path}: no {key!r} list in the top-level object")
    finally:
        s.close()


def _elements(s: _Stream) -> Iterator[Any]:
    s.expect("[")
    if s.peek() == "]":
        s.pos += 1
        return
    while True:
        yield s.value()
        if s.expect(",]") == "]":
            return
