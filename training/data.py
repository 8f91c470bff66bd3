"""Fine-tuning's input files: where each lives (release layout, flags override) and reading the annotation files.

Each loss flag loads only the files its term needs: the slots a term reads (training.terms) name their
inputs, and the inputs their files (training.slots).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from agree.entities import grounding_label
from agree.io import InputError, iter_jsonl
from agree.layout import DEFAULT_ROOT, Layout, grounding_key
from training.slots import DATA_FILES, FILES, SLOTS, DataFile, Input, inputs_of, ordered
from training.terms import BY_NAME, slots_of


@dataclass
class DataPaths:
    """Every file fine-tuning may read (which are read depends on the loss flags; training.slots.DATA_FILES
    declares the training inputs), and which of them a flag named."""

    train_data: Path
    train_images: Path
    val_data: Optional[Path]
    val_images: Path
    train_objects: tuple[
        Path, ...
    ]  # read in this order; a later file's line wins for the same image
    vg_vocab: Path
    vg_images: Path
    vg_mask_boxes: Path
    vg_mask_images: Path
    grounding_boxes: Path
    grounding_images: Path
    given: frozenset = (
        frozenset()
    )  # dests of the files named by a flag (the rest are layout defaults)

    def file(self, dest: str) -> Union[Path, tuple[Path, ...]]:
        """The path(s) of a DataFile."""
        return getattr(self, dest)


def data_layout(args: argparse.Namespace) -> Layout:
    """The release layout of --data-root (default: the folder above --train-data's annotation/), --vg-root."""
    train = Path(args.train_data)
    if args.data_root is not None:
        data_dir = Path(args.data_root)
    elif train.parent.name == "annotation":
        data_dir = train.parent.parent
    else:
        data_dir = Layout.under(DEFAULT_ROOT, args.dataset).data_dir
    return Layout.from_data_dir(data_dir, args.dataset, args.vg_root)


def resolve_paths(args: argparse.Namespace) -> DataPaths:
    """Apply the release-layout defaults to every data path not given by a flag."""
    lay = data_layout(args)
    files: dict = {}
    given = set()
    for f in DATA_FILES:
        value = getattr(args, f.dest)
        if value is not None:
            given.add(f.dest)
            files[f.dest] = tuple(Path(p) for p in value) if f.many else Path(value)
        else:
            files[f.dest] = f.default(lay)
    return DataPaths(
        **files,
        val_data=Path(args.val_data) if args.val_data else None,
        val_images=Path(args.val_images) if args.val_images is not None else lay.val_npz,
        given=frozenset(given),
    )


def chosen_file(paths: DataPaths, inp: Input) -> Optional[DataFile]:
    """The file of a choice input that is read: the one a flag names, else the first present (None: none is)."""
    named = [d for d in inp.choice if d in paths.given]
    if len(named) > 1:
        flags = " and ".join(FILES[d].flag for d in named)
        raise InputError(f"{flags} name the same {inp.what} twice: give one of them")
    if named:
        return FILES[named[0]]
    return next((FILES[d] for d in inp.choice if paths.file(d).is_file()), None)


def slot_flag(terms: Iterable[str], slot: str) -> str:
    """The flag of the first enabled term that reads `slot` (for error messages)."""
    return next(BY_NAME[t].flag for t in terms if slot in BY_NAME[t].slots)


def input_flag(terms: Iterable[str], inp: Input) -> str:
    """The flag of the first enabled term whose slots read input `inp` (for error messages)."""
    if inp.flag is not None:
        return inp.flag
    terms = list(terms)
    slots = [s for s in ordered(slots_of(terms)) if inp.name in SLOTS[s].inputs]
    return slot_flag(terms, slots[0])


def required_files(terms: Iterable[str], paths: DataPaths) -> list[tuple[str, str, Path]]:
    """(flag, description, path) of every file the enabled terms need."""
    terms = list(terms)
    req = []
    for inp in inputs_of(slots_of(terms)):
        flag = input_flag(terms, inp)
        for dest in inp.files:
            f = FILES[dest]
            what = f.what if dest == "train_data" else f"{f.what} ({f.flag})"
            found = paths.file(dest)
            req += [(flag, what, p) for p in (found if f.many else (found,))]
        if inp.choice:
            f = chosen_file(paths, inp)
            if f is not None:
                req.append((flag, f"{f.what} ({f.flag})", paths.file(f.dest)))
            else:
                first, others = FILES[inp.choice[0]], [FILES[d] for d in inp.choice[1:]]
                alt = "".join(f", or {o.flag} {paths.file(o.dest)}" for o in others)
                req.append((flag, f"{inp.what} ({first.flag}{alt})", paths.file(first.dest)))
    if paths.val_data is not None:
        req += [
            ("--val-data", "validation captions", paths.val_data),
            ("--val-data", "val image archive (--val-images)", paths.val_images),
        ]
    return req


def check_files(args: argparse.Namespace, terms: Iterable[str], paths: DataPaths) -> None:
    """Raise InputError naming the flag and the path of the first missing file."""
    for flag, what, path in required_files(terms, paths):
        if not path.is_file():
            raise InputError(f"{flag}: {what} not found: {path}")
    if args.dataset_type == "auto":
        for flag, path in (("--train-data", paths.train_data), ("--val-data", paths.val_data)):
            if path is not None and path.suffix not in (".jsonl", ".json"):
                raise InputError(
                    f"{flag}: cannot infer the format of {path} "
                    "(expected .jsonl/.json; pass --dataset-type json)"
                )


# --------------------------------------------------------------------------- annotation files
@dataclass
class TrainRecord:
    """What one training example needs from its jsonl line."""

    image_key: str
    stem: str
    caption: str
    segs: list[str] = field(default_factory=list)
    grounding_key: Optional[str] = None
    where: str = ""  # file:line of the record, for messages


def str_list(value: object, what: str, where: str) -> list[str]:
    """`value` if it is a list of strings, else an InputError naming `where`."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: {what} must be a list of strings")
    return value


def load_train_records(
    path: Path, img_key: str, caption_key: str, need_segs: bool, need_preds: bool
) -> list[TrainRecord]:
    """Parse <dataset>_train_pred.jsonl; errors name file:line and the key."""
    required = (
        [img_key, caption_key, "image_id"]
        + (["segs"] if need_segs else [])
        + (["preds"] if need_preds else [])
    )
    records = []
    for lineno, rec in iter_jsonl(path, required):
        where = f"{path}:{lineno}"
        caption = rec[caption_key]
        if not isinstance(caption, str):
            raise InputError(f"{where}: {caption_key!r} must be a string (set --caption-key)")
        image = rec[img_key]
        if not isinstance(image, str):
            raise InputError(f"{where}: {img_key!r} must be an image path string (set --img-key)")
        r = TrainRecord(
            image_key=str(rec["image_id"]), stem=Path(image).stem, caption=caption, where=where
        )
        if need_segs:
            r.segs = str_list(rec["segs"], "'segs'", where)
        if need_preds:
            preds = rec["preds"]
            if not isinstance(preds, list) or not all(isinstance(p, dict) for p in preds):
                raise InputError(f"{where}: 'preds' must be a list of {{label: score}} objects")
            label = grounding_label(preds)
            r.grounding_key = None if label is None else grounding_key(r.stem, label)
        records.append(r)
    if not records:
        raise InputError(f"--train-data: {path} has no records")
    return records


def load_objects(paths: Sequence[Path]) -> dict[str, list[str]]:
    """Image stem -> objects seen in it, from objects/<dataset>_{split}_imgs_objs.jsonl files (later files win)."""
    out: dict[str, list[str]] = {}
    for path in paths:
        for lineno, rec in iter_jsonl(path, ("image_id", "image_objects")):
            out[str(rec["image_id"])] = str_list(
                rec["image_objects"], "'image_objects'", f"{path}:{lineno}"
            )
    return out


# --------------------------------------------------------------------------- missing data
@dataclass
class Misses:
    """Items of one kind of training input that were looked up at start-up, and those not found."""

    kind: str  # what a miss lacks, e.g. "grounding image"
    flag: str  # the flag of the file looked in
    path: str  # that file (or files)
    unit: str  # what was checked, plural ("grounded captions")
    fallback: str  # what a miss turns into when allowed
    checked: int = 0
    missing: int = 0
    first_key: Optional[str] = None
    first_where: Optional[str] = None

    def check(self, found: bool, key: str, where: Optional[str] = None) -> bool:
        """Count one look-up of `key` (needed at `where`); return `found`."""
        self.checked += 1
        if not found:
            self.missing += 1
            if self.first_key is None:
                self.first_key, self.first_where = key, where
        return found

    @property
    def fraction(self) -> float:
        """Missing / checked (0 when nothing was checked)."""
        return self.missing / self.checked if self.checked else 0.0

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"{self.kind}: {self.missing} of {self.checked} {self.unit} missing ({100 * self.fraction:.2f}%) "
            f"in {self.path}"
        )


def enforce_missing(misses: Iterable[Misses], max_fraction: float) -> list[tuple[int, str]]:
    """Raise InputError for the first kind whose missing fraction is above `max_fraction`, else return
    (logging level, message) lines that report each kind's count.

    With `max_fraction` 0 any miss is an error; a miss allowed by a larger fraction takes the
    masked-square substitute (reported as a warning).
    """
    report = []
    for m in misses:
        report.append((logging.INFO, f"start-up data check: {m.summary()}"))
        if m.missing == 0:
            continue
        at = f" (needed by {m.first_where})" if m.first_where else ""
        if m.fraction > max_fraction:
            raise InputError(
                f"{m.flag}: {m.path} has no {m.kind} {m.first_key!r}{at}; {m.missing} of {m.checked} {m.unit} "
                f"({100 * m.fraction:.2f}%) have none, above --max-missing-fraction {max_fraction:g}. Fix the data, "
                f"or pass --max-missing-fraction {m.fraction:.4g} (or more) to train with {m.fallback} "
                "in their place"
            )
        report.append(
            (
                logging.WARNING,
                f"{m.summary()}; allowed by --max-missing-fraction {max_fraction:g}: "
                f"{m.fallback} in their place (first: {m.first_key!r}{at})",
            )
        )
    return report


@dataclass(frozen=True)
class VgEntry:
    """One usable Visual Genome entry of a vocabulary word: the word, the VG image id, where it is listed."""

    word: str
    image_id: str
    where: str


def load_vg_entries(path: Path, words: set[str]) -> list[VgEntry]:
    """The usable entries (non-empty 'object') of the words in `words`, in file order."""
    out: list[VgEntry] = []
    for lineno, rec in iter_jsonl(path, ("vocab", "objects")):
        word = rec["vocab"]
        if word not in words:
            continue
        if not isinstance(rec["objects"], list):
            raise InputError(f"{path}:{lineno}: 'objects' must be a list")
        for obj in rec["objects"]:
            if not isinstance(obj, dict) or "image_id" not in obj:
                raise InputError(f"{path}:{lineno}: each object needs an 'image_id'")
            if obj.get("object"):
                out.append(VgEntry(word, str(obj["image_id"]), f"{path}:{lineno}"))
    return out


def vg_vocab(entries: Iterable[VgEntry]) -> dict[str, list[str]]:
    """Object word -> VG image ids of its entries, in order."""
    out: dict[str, list[str]] = {}
    for e in entries:
        out.setdefault(e.word, []).append(e.image_id)
    return out
