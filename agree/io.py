"""File I/O shared by every stage: JSONL reading with located errors, atomic writes."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

try:  # orjson parses and serialises feature files several times faster
    import orjson

    def loads(data: bytes | str) -> Any:
        """Parse one JSON document."""
        return orjson.loads(data)

    def dumps(obj: Any) -> bytes:
        """Serialise one JSON document (numpy arrays allowed)."""
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

    JSONDecodeError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    import json

    def loads(data: bytes | str) -> Any:
        """Parse one JSON document."""
        return json.loads(data)

    def dumps(obj: Any) -> bytes:
        """Serialise one JSON document."""
        if hasattr(obj, "tolist"):
            obj = obj.tolist()
        return json.dumps(obj, default=lambda o: o.tolist()).encode()

    JSONDecodeError = (json.JSONDecodeError,)


class InputError(Exception):
    """Bad user input (file, line, flag); reported without a traceback."""


def require_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """Return `path` as a Path, or raise InputError if it is not an existing file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {p}")
    return p


def iter_jsonl(path: str | os.PathLike, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; errors name file and line."""
    p = require_file(path)
    with open(p, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if (
                line.isspace()
            ):  # blank line; isspace() stops at the first character, strip() would copy
                continue
            try:
                rec = loads(line)
            except JSONDecodeError as e:
                raise InputError(f"{p}:{lineno}: malformed JSON ({e})") from None
            if not isinstance(rec, dict):
                raise InputError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in required:
                if key not in rec:
                    raise InputError(f"{p}:{lineno}: missing key {key!r}")
            yield lineno, rec


def read_jsonl(
    path: str | os.PathLike, required: Sequence[str] = (), allow_empty: bool = False
) -> list[dict]:
    """Read a whole JSONL file into a list of records (see iter_jsonl)."""
    records = [rec for _, rec in iter_jsonl(path, required)]
    if not records and not allow_empty:
        raise InputError(f"{path}: file is empty")
    return records


def read_json(path: str | os.PathLike) -> Any:
    """Read one JSON document; errors name the file."""
    p = require_file(path)
    try:
        return loads(p.read_bytes())
    except JSONDecodeError as e:
        raise InputError(f"{p}: malformed JSON ({e})") from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; rename it into place only if the block succeeds."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=p.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for writers that take a filename; rename on success."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part" + p.suffix, dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Atomically write records as JSONL; return how many were written."""
    n = 0
    with atomic_write(path) as f:
        for rec in records:
            f.write(dumps(rec))
            f.write(b"\n")
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write one JSON document."""
    with atomic_write(path) as f:
        f.write(dumps(obj))


def is_input_error(e: BaseException) -> bool:
    """InputError, or clip's LoadError (checked without importing clip, and so torch, when it is not loaded)."""
    clip_api = sys.modules.get("clip.clip")
    return isinstance(e, InputError) or (clip_api is not None and isinstance(e, clip_api.LoadError))


def run_cli(main: Callable[[], Any]) -> None:
    """Run an entry point: InputError (or clip's LoadError) -> 'error: ...' on stderr, exit status 2, no traceback."""
    try:
        rc = main()
    except Exception as e:
        if not is_input_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)
