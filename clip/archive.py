"""The weights of a TorchScript archive (e.g. OpenAI's ViT-L-14.pt), read without running any of its code.

What `torch.jit.save` writes is a zip whose entries sit under one folder, `<prefix>/`:

* `data.pkl` pickles the module tree: each module is an object of a TorchScript class (a pickle global
  `__torch__.<path> <Class>`) whose pickled state is a dict of its parameters, buffers, sub-modules
  and plain attributes; a tensor is a call of `torch._utils._rebuild_tensor_v2` on a storage named by
  a persistent id `("storage", torch.<Type>Storage, key, location, numel)`;
* `data/<key>` holds the raw bytes of each storage, little-endian (a `byteorder` record, when present,
  says which);
* `code/<path>.py` is the TorchScript source of each class; a module's class body lists its
  parameters (`__parameters__ = [...]`) and buffers (`__buffers__ = [...]`; a class body without that
  list is taken to have every other tensor attribute as a buffer);
* `constants.pkl` holds the tensor constants of that code (not weights; never read here).

`read_archive_state_dict` unpickles `data.pkl` with an unpickler that knows only tensor reconstruction,
the storage types and plain containers (anything else is refused with a LoadError naming the file
and the global), reads the parameter and buffer lists from `code/` as text, and flattens the module tree
into the state dict that `torch.jit.load(path).state_dict()` would give. Nothing of the archive is
compiled, imported or called.
"""

from __future__ import annotations

import ast
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO, Callable, Optional, Union

import torch

from clip.errors import LoadError

# storage classes named in the persistent ids -> element dtype
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# torch.jit._pickle's markers of typed lists and dicts: each returns its argument unchanged
_CONTAINER_MARKERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"}
_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


def _identity(value, *_type_tag):
    return value


class _ScriptObject:
    """Inert record of an object of a TorchScript class: its qualified name and its pickled state."""

    qualified_name = ""

    def __setstate__(self, state) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(frozen=True)
class _Storage:
    """A storage's bytes viewed as its element type (a flat tensor)."""

    data: torch.Tensor


def _rebuild_tensor(
    storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    """Stand-in for torch._utils._rebuild_tensor_v2: a strided view of a storage read from the archive."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor record names no storage")
    if backward_hooks:
        raise pickle.UnpicklingError("a tensor record carries backward hooks")
    if not (
        isinstance(offset, int)
        and all(isinstance(v, int) for v in (*size, *stride))
        and len(size) == len(stride)
    ):
        raise pickle.UnpicklingError(
            f"bad tensor record (offset {offset!r}, size {size!r}, stride {stride!r})"
        )
    return torch.as_strided(storage.data, tuple(size), tuple(stride), offset)


@dataclass
class _ClassInfo:
    is_module: bool
    parameters: Optional[list[str]]  # None: the class body declares no list
    buffers: Optional[list[str]]


class _Declarations:
    """Parameter and buffer lists of the archive's classes, read from `code/` as text (never compiled)."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, where: str):
        self.zf, self.prefix, self.where = zf, prefix, where
        self._sources: dict[str, list[str]] = {}
        self._classes: dict[str, _ClassInfo] = {}

    def _source(self, entry: str) -> list[str]:
        if entry not in self._sources:
            try:
                self._sources[entry] = self.zf.read(entry).decode("utf-8").splitlines()
            except KeyError:
                raise LoadError(f"{self.where}: the archive has no {entry}") from None
        return self._sources[entry]

    def lookup(self, qualified_name: str) -> _ClassInfo:
        """Whether `qualified_name` is a module, and the names its body lists as parameters and buffers."""
        if qualified_name in self._classes:
            return self._classes[qualified_name]
        module, _, name = qualified_name.rpartition(".")
        entry = f"{self.prefix}code/{module.replace('.', '/')}.py"
        lines = self._source(entry)
        header = re.compile(rf"^class {re.escape(name)}\((\w*)\)\s*:\s*$")
        starts = [i for i, line in enumerate(lines) if header.match(line)]
        if not starts:
            raise LoadError(f"{self.where}: class {qualified_name} is not declared in {entry}")
        is_module = header.match(lines[starts[0]]).group(1) == "Module"
        lists: dict[str, Optional[list[str]]] = {"__parameters__": None, "__buffers__": None}
        for line in lines[starts[0] + 1 :]:
            if line.strip() and not line[0].isspace():
                break  # end of the class body
            m = re.match(r"^\s+(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*$", line)
            if m:
                try:
                    names = ast.literal_eval(m.group(2))  # a list literal of strings: no code runs
                except (ValueError, SyntaxError):
                    names = None
                if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                    raise LoadError(
                        f"{self.where}: unreadable {m.group(1)} of {qualified_name} in {entry}"
                    )
                lists[m.group(1)] = names
        info = _ClassInfo(is_module, lists["__parameters__"], lists["__buffers__"])
        self._classes[qualified_name] = info
        return info


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles tensors, storages, plain containers and inert TorchScript object records; refuses the rest."""

    def __init__(self, file, load_storage: Callable[[str, torch.dtype, int], _Storage], where: str):
        super().__init__(file)
        self.load_storage, self.where = load_storage, where
        self.record_types: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.record_types:
                self.record_types[qualified] = type(
                    name, (_ScriptObject,), {"qualified_name": qualified}
                )
            return self.record_types[qualified]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch.jit._pickle" and (
            name in _CONTAINER_MARKERS or name == "restore_type_tag"
        ):
            return _identity
        raise LoadError(
            f"{self.where} calls {module}.{name}; a TorchScript archive is read without running "
            "anything, so only tensors and plain containers are accepted (nothing was run). "
            "If you trust this file, load it with jit=True (scripts: --jit), which runs its code "
            "through torch.jit.load."
        )

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        ):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.80}")
        return self.load_storage(pid[2], pid[1].dtype, pid[4])


def torchscript_prefix(zf: zipfile.ZipFile) -> Optional[str]:
    """The folder (with its trailing '/') holding a TorchScript archive's records, or None if not an archive."""
    for name in zf.namelist():
        if name == "constants.pkl":
            return ""
        if name.endswith("/constants.pkl") and name.count("/") == 1:
            return name[: -len("constants.pkl")]
    return None


def is_torchscript_archive(path: Union[str, os.PathLike]) -> bool:
    """True for a zip written by torch.jit.save (it has a constants.pkl; torch.save's zips do not)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return torchscript_prefix(zf) is not None
    except (OSError, zipfile.BadZipFile):
        return False


def _flatten(
    root: _ScriptObject, declarations: _Declarations, where: str
) -> dict[str, torch.Tensor]:
    """Parameters and buffers of every module in the tree, with dotted names (as Module.state_dict)."""
    out: dict[str, torch.Tensor] = {}
    stack: list[tuple[str, _ScriptObject, tuple[int, ...]]] = [("", root, ())]
    while stack:
        prefix, obj, path = stack.pop()
        if id(obj) in path:
            raise LoadError(f"{where}: the module tree has a cycle at {prefix[:-1]!r}")
        info = declarations.lookup(obj.qualified_name)
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            raise LoadError(
                f"{where}: {obj.qualified_name} stores its state in a custom form that only its "
                "own code can read; load the file with jit=True (scripts: --jit) if you trust it"
            )
        params = info.parameters or []
        children = []
        for name, value in state.items():
            if torch.is_tensor(value):
                declared = name in params or (
                    name in info.buffers if info.buffers is not None else True
                )  # no __buffers__ list: every tensor attribute
                if declared:
                    out[prefix + name] = value
            elif (
                isinstance(value, _ScriptObject)
                and declarations.lookup(value.qualified_name).is_module
            ):
                children.append((f"{prefix}{name}.", value, path + (id(obj),)))
        stack.extend(reversed(children))  # depth first, in attribute order
    return out


def _read_entry(zf: zipfile.ZipFile, raw: BinaryIO, info: zipfile.ZipInfo, where: str) -> bytearray:
    """The bytes of one zip entry, CRC-checked; a stored entry (torch writes no other) is read in one copy."""
    if info.compress_type != zipfile.ZIP_STORED:
        return bytearray(zf.read(info))
    raw.seek(info.header_offset)
    header = raw.read(
        30
    )  # local file header: signature, ..., name length and extra length at bytes 26-29
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise LoadError(f"{where}: bad zip entry header (damaged file?)")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    raw.seek(info.header_offset + 30 + name_len + extra_len)
    buffer = bytearray(info.file_size)
    if raw.readinto(buffer) != info.file_size:
        raise LoadError(f"{where}: the file ends inside this entry (truncated file?)")
    if zlib.crc32(buffer) != info.CRC:
        raise LoadError(f"{where}: CRC mismatch (damaged file?)")
    return buffer


def read_archive_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, read without running its code (see module doc)."""
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            prefix = torchscript_prefix(zf)
            if prefix is None:
                raise LoadError(f"{path}: not a TorchScript archive (no constants.pkl)")
            where = f"{path}: {prefix}data.pkl"
            if (
                f"{prefix}byteorder" in zf.namelist()
                and zf.read(f"{prefix}byteorder").strip() != b"little"
            ):
                raise LoadError(
                    f"{path}: a big-endian archive ({prefix}byteorder); only little-endian is read"
                )
            storages: dict[str, _Storage] = {}

            def load_storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
                if key not in storages:
                    if not _STORAGE_KEY.match(key) or numel < 0:
                        raise pickle.UnpicklingError(f"bad storage record {key!r}")
                    entry = f"{prefix}data/{key}"
                    try:
                        info = zf.getinfo(entry)
                    except KeyError:
                        raise LoadError(
                            f"{path}: the archive has no {entry} (truncated or damaged file?)"
                        ) from None
                    nbytes = numel * torch.empty((), dtype=dtype).element_size()
                    if info.file_size < nbytes:
                        raise LoadError(
                            f"{path}: {entry} holds {info.file_size} bytes, its record needs {nbytes}"
                        )
                    buffer = _read_entry(zf, raw, info, f"{path}: {entry}")
                    data = (
                        torch.frombuffer(buffer, dtype=torch.uint8)
                        if nbytes
                        else torch.empty(0, dtype=torch.uint8)
                    )
                    storages[key] = _Storage(data[:nbytes].view(dtype))
                if storages[key].data.dtype != dtype:
                    raise pickle.UnpicklingError(f"storage {key!r} is named with two element types")
                return storages[key]

            try:
                with zf.open(f"{prefix}data.pkl") as f:
                    root = _RestrictedUnpickler(f, load_storage, where).load()
            except KeyError:
                raise LoadError(f"{path}: the archive has no {prefix}data.pkl") from None
            if not isinstance(root, _ScriptObject):
                raise LoadError(f"{where} holds a {type(root).__name__}, not a module")
            return _flatten(root, _Declarations(zf, prefix, str(path)), where)
    except LoadError:
        raise
    except Exception as e:  # zip, pickle and tensor errors of a damaged or hand-made archive
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(
            f"{path}: damaged TorchScript archive ({type(e).__name__}: {first})"
        ) from None
