"""A JSONL output written by a long job in whole units of work, safe against kill -9 at any moment.

While the job runs, lines go to OUT.partial and OUT.progress records what is finished:

    {"settings": {...}}                                   first line: what the output depends on
    {"done": n, "bytes": b, "last": "<key of unit n>"}    after each batch: n units, b bytes of OUT.partial
    {"finished": true, "done": n, "bytes": b}             when every unit is done

A batch's lines are flushed and fsync'ed before its record is appended (and fsync'ed), so a record
never claims lines that are not on disk. A re-run reads the last complete record, cuts OUT.partial
back to its byte count (a half line, or the lines of a batch whose record was not written, go) and
continues after unit n: no line is lost or written twice. A half-written record is cut off too.
When every unit is done OUT.partial is renamed to OUT, so OUT exists only complete; OUT.progress
stays beside it, so a re-run with the same settings has nothing to do and one with other settings is
refused instead of mixing two outputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from agree.io import InputError, JSONDecodeError, dumps, loads


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _append(f, data: bytes) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _records(path: Path) -> tuple[list[dict], int]:
    """The complete, parseable lines of a progress file and the byte length they span (the rest is a half line)."""
    data = path.read_bytes()
    out, end = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            rec = loads(line)
        except JSONDecodeError:
            break
        if not isinstance(rec, dict):
            break
        out.append(rec)
        end += len(line)
    return out, end


class ResumableJsonl:
    """OUT written batch by batch over an ordered list of unit keys; see the module doc."""

    def __init__(self, out: str | os.PathLike, settings: dict, keys: Sequence[str]):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.progress = self.out.with_name(self.out.name + ".progress")
        self.settings, self.keys = settings, list(keys)
        self.done = 0
        self.bytes = 0
        self.finished = False
        self._lines: Optional[object] = None
        self._records: Optional[object] = None
        self._open()

    # ------------------------------------------------------------------ recovery
    def _header(self) -> bytes:
        return dumps({"settings": self.settings}) + b"\n"

    def _refuse(self, why: str) -> InputError:
        return InputError(
            f"{self.out}: {why}; choose another output path, or remove the files named here to start over"
        )

    def _open(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        records: list[dict] = []
        if self.progress.is_file():
            records, end = _records(self.progress)
            if not records or "settings" not in records[0]:
                header = self._header()
                if not header.startswith(self.progress.read_bytes()) or self.out.exists():
                    raise self._refuse(
                        f"{self.progress} is not a progress record of this command with these settings"
                    )
                records = []  # killed while writing the first line: start over
            else:
                with open(self.progress, "r+b") as f:  # cut a half-written record off
                    f.truncate(end)
        else:
            for p in (self.out, self.partial):
                if p.exists():
                    raise self._refuse(
                        f"{p} exists but {self.progress.name} does not (not a run to continue)"
                    )
        if not records:
            with open(self.progress, "wb") as f:
                _append(f, self._header())
            with open(self.partial, "wb") as f:
                _append(f, b"")
            _fsync_dir(self.out.parent)
        else:
            self._resume(records)
        if not self.finished:
            self._lines = open(self.partial, "r+b")
            self._lines.seek(self.bytes)
            self._records = open(self.progress, "ab")

    def _resume(self, records: list[dict]) -> None:
        theirs = records[0]["settings"]
        if theirs != self.settings:
            diff = sorted(
                k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k)
            )
            shown = ", ".join(
                f"{k}: {theirs.get(k)!r} then, {self.settings.get(k)!r} now" for k in diff
            )
            raise self._refuse(
                f"the interrupted run ({self.progress}) had other settings ({shown})"
            )
        last = records[-1] if len(records) > 1 else {"done": 0, "bytes": 0}
        try:
            self.done, self.bytes = int(last["done"]), int(last["bytes"])
        except (KeyError, TypeError, ValueError):
            raise self._refuse(f"{self.progress}: malformed record {last}") from None
        if not 0 <= self.done <= len(self.keys):
            raise self._refuse(
                f"{self.progress} records {self.done} units done of {len(self.keys)}"
            )
        if self.done and last.get("last", self.keys[self.done - 1]) != self.keys[self.done - 1]:
            raise self._refuse(
                f"the input changed since the interrupted run: unit {self.done} was {last.get('last')!r}, "
                f"now {self.keys[self.done - 1]!r}"
            )
        if last.get("finished"):
            self.finished = True
            if self.partial.is_file():  # killed between the final record and the rename
                self._commit()
            elif not self.out.is_file():
                raise self._refuse(
                    f"{self.progress} says finished but neither {self.out} nor {self.partial} exists"
                )
            return
        if self.out.exists():
            raise self._refuse(
                f"{self.out} exists although {self.progress} says the run is not finished"
            )
        size = self.partial.stat().st_size if self.partial.is_file() else 0
        if size < self.bytes:
            raise self._refuse(
                f"{self.partial} holds {size} bytes, fewer than the {self.bytes} recorded"
            )
        if not self.partial.is_file():
            self.partial.touch()
        with open(self.partial, "r+b") as f:  # drop a half line and any lines not yet recorded
            f.truncate(self.bytes)
            os.fsync(f.fileno())

    # ------------------------------------------------------------------ writing
    def append(self, lines: Sequence[bytes], units: int) -> None:
        """Write the lines of the next `units` units (each line ends with a newline), then record them done."""
        if self.finished or self._lines is None:
            raise RuntimeError("append after finish")
        if units < 1 or self.done + units > len(self.keys):
            raise ValueError(
                f"cannot record {units} more units after {self.done} of {len(self.keys)}"
            )
        data = b"".join(lines)
        if data and not data.endswith(b"\n"):
            raise ValueError("every line must end with a newline")
        _append(self._lines, data)
        self.bytes += len(data)
        self.done += units
        rec = {"done": self.done, "bytes": self.bytes, "last": self.keys[self.done - 1]}
        _append(self._records, dumps(rec) + b"\n")

    def finish(self) -> None:
        """Record the end and rename OUT.partial to OUT (every unit must be done)."""
        if self.finished:
            return
        if self.done != len(self.keys):
            raise RuntimeError(f"finish with {self.done} of {len(self.keys)} units done")
        rec = {"finished": True, "done": self.done, "bytes": self.bytes}
        _append(self._records, dumps(rec) + b"\n")
        self.close()
        self.finished = True
        self._commit()

    def _commit(self) -> None:
        os.replace(self.partial, self.out)
        _fsync_dir(self.out.parent)

    def close(self) -> None:
        """Close the files (what is recorded stays resumable)."""
        for f in (self._lines, self._records):
            if f is not None:
                f.close()
        self._lines = self._records = None

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
