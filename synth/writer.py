"""Writes a synthetic dataset: raw downloads, then the release layout (docs/data.md, File formats)
built from them by the same pipeline as scripts/prepare_data.py; atomically and deterministically.

Under --out: raw/ and VG_raw/ (synth.raw), datasets/flickr30k_images/ and VG/ (dataprep.pipeline.prepare),
and the synthetic-only pretrain/ and synthetic/ (scene metadata, world.json). Everything is built in a
staging folder inside --out and renamed into place at the end, synthetic/ (holding world.json) last.
--out keeps a record of every file written there (agree.ownership): a part already in --out is replaced
only if everything in it was written by this generator; otherwise nothing is touched and the error names it.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from agree.io import atomic_path, atomic_write, dumps
from agree.layout import Layout
from agree.npz import NpzWriter
from agree.ownership import OutputFolder
from dataprep.pipeline import PrepareConfig, prepare
from dataprep.staging import staging_area
from synth import captions as C
from synth import formats as F
from synth.raw import SPLIT_CODES, UNUSABLE_VG_SHAPE, RawPaths, stem_for, write_flickr, write_vg
from synth.render import render_scene, to_storage
from synth.world import COLOUR_NAMES, SHAPES, iter_split_scenes

FORMAT_VERSION = 2
DATASET = "flickr30k"
OWNER = "scripts/make_synthetic_dataset.py"


@dataclass
class SynthConfig:
    """What to generate; defaults suit a tiny CLIP with 64-px input trained on CPU."""

    out: Path
    seed: int = 0
    train_images: int = 2000
    val_images: int = 200
    test_images: int = 200
    pretrain_images: int = 4000
    resolution: int = 64
    train_captions: int = 5
    pretrain_captions: int = 2
    vg_per_object: int = 20
    preprocessed: bool = False


class SynthLayout(Layout):
    """The release layout under the dataset root, plus the synthetic-only files (raw downloads, pre-training split,
    metadata)."""

    @property
    def raw(self) -> RawPaths:
        """The raw downloads the layout was built from (prepare_data.py's --raw, --vg-raw, --boxes)."""
        return RawPaths(self.root / "raw", self.root / "VG_raw")

    @property
    def pretrain_jsonl(self) -> Path:
        """Pre-training captions (training-jsonl format)."""
        return self.root / "pretrain" / "pretrain_pred.jsonl"

    @property
    def pretrain_npz(self) -> Path:
        """Pre-training images, key = str(image_id)."""
        return self.root / "pretrain" / "pretrain_images.npz"

    @property
    def meta(self) -> dict[str, Path]:
        """Scene metadata per split (read by the tests, not by the pipeline)."""
        return {s: self.root / "synthetic" / f"{s}_scenes.jsonl" for s in SPLIT_CODES}

    @property
    def world(self) -> Path:
        """world.json: the generator's config and counts; written last, so it marks a complete dataset."""
        return self.root / "synthetic" / "world.json"


class _Sink:
    """A JSONL file written line by line."""

    def __init__(self, handle):
        self._f = handle
        self.count = 0

    def __call__(self, record: dict) -> None:
        self._f.write(dumps(record))
        self._f.write(b"\n")
        self.count += 1


def image_path(split: str, stem: int) -> str:
    """The `image` field of an annotation record."""
    folder = "pretrain-images" if split == "pretrain" else "flickr30k-images"
    return f"{folder}/{stem}.jpg"


def _progress(enabled: bool):
    def bar(it, total: int, desc: str):
        return tqdm(
            it, total=total, desc=f"{desc:>8}", unit="img", disable=not enabled, leave=False
        )

    return bar


def _write_pretrain(cfg: SynthConfig, lay: SynthLayout, meta: _Sink, progress: bool) -> dict:
    """The pre-training split: simpler captions, in the training-jsonl format; images through the same JPEG coding."""
    r, pre, seed = cfg.resolution, cfg.preprocessed, cfg.seed
    with contextlib.ExitStack() as stack:
        pre_npz = NpzWriter(stack.enter_context(atomic_path(lay.pretrain_npz)))
        stack.callback(pre_npz.close)
        pre_jsonl = _Sink(stack.enter_context(atomic_write(lay.pretrain_jsonl)))
        scenes = iter_split_scenes(seed, SPLIT_CODES["pretrain"], cfg.pretrain_images, r)
        for i, scene, rng in _progress(progress)(scenes, cfg.pretrain_images, "pretrain"):
            image = F.decode_jpeg(F.jpeg_bytes(render_scene(scene).image))
            pre_npz.add(str(i), to_storage(image, pre))
            stem = stem_for(seed, "pretrain", i)
            caps = C.pretrain_captions(scene, rng, cfg.pretrain_captions)
            labels = C.grounding_labels(scene, rng)
            for cap in caps:
                preds, _ = C.preds_for(scene, cap, rng, labels)
                pre_jsonl(
                    {
                        "image": image_path("pretrain", stem),
                        "caption": cap.text,
                        "image_id": i,
                        "segs": C.segs_for(cap, rng),
                        "preds": preds,
                    }
                )
            meta(
                {
                    "index": i,
                    "image_id": i,
                    "stem": str(stem),
                    "scene": scene.to_json(),
                    "captions": [c.to_json() for c in caps],
                }
            )
    return {"pretrain_images": len(pre_npz), "pretrain_captions": pre_jsonl.count}


def _prepare(cfg: SynthConfig, root: Path, raw: RawPaths, progress: bool) -> dict:
    """Build datasets/flickr30k_images and VG/ under `root` from the raw files, as scripts/prepare_data.py does."""
    from synth.detector import THRESHOLD

    report = prepare(
        PrepareConfig(
            dataset=DATASET,
            raw=raw.raw,
            vg_raw=raw.vg_raw,
            out=root,
            boxes=raw.boxes,
            resolution=cfg.resolution,
            storage="float32" if cfg.preprocessed else "uint8",
            box_threshold=THRESHOLD,
            vg_per_word=cfg.vg_per_object,
            workers=0,
            progress=progress,
            log=lambda line: None,
        )
    )
    odd = {k: v for k, v in report.odd.items() if v}
    if odd:  # the generator's own files must prepare cleanly: anything skipped or noted is a generator bug
        raise RuntimeError(f"prepare_data found odd input in the synthetic raw files: {odd}")
    c = report.counts
    return {
        "train_images": c["train_images"],
        "train_captions": c["train_captions"],
        "grounding_images": c["grounding_images"],
        "val_images": c["val_images"],
        "test_images": c["test_images"],
        "test_queries": c["test_captions"],
        "vg_images": c["vg_images"],
        "vg_masked_images": c["vg_masked_images"],
        "vg_words": c["vg_words"],
    }


def check_replaceable(owned: OutputFolder, rels: list[str]) -> None:
    """InputError naming the first part of `rels` already in the output folder that holds a file this
    generator did not write (a part is replaced whole)."""
    for rel in rels:
        owned.check_no_foreign("make_synthetic_dataset.py replaces only what it wrote", under=rel)


def _commit(stage: Path, owned: OutputFolder, parts: list[str], drop: list[str]) -> None:
    """Rename each staged part into place (an old one is moved aside into the stage); old `drop` parts go
    too. Every part must hold only files this generator wrote; the record is updated around the renames."""
    out = owned.path
    check_replaceable(owned, drop + parts)
    new = sorted(
        p.relative_to(stage).as_posix()
        for rel in parts
        for p in (stage / rel).rglob("*")
        if p.is_file()
    )
    old = [c for c in owned.claims if any(c.startswith(rel + "/") for rel in drop + parts)]
    owned.claim(*new)  # before the files appear in --out
    aside = stage / ".replaced"
    aside.mkdir()
    for k, rel in enumerate(drop + parts):
        final = out / rel
        if final.exists():
            os.replace(final, aside / str(k))
        if rel in parts:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, final)
    owned.forget(*(set(old) - set(new)))


def _check(cfg: SynthConfig) -> None:
    for name in (
        "train_images",
        "val_images",
        "test_images",
        "train_captions",
        "pretrain_captions",
        "vg_per_object",
    ):
        if getattr(cfg, name) < 1:
            raise ValueError(f"SynthConfig.{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.pretrain_images < 0:
        raise ValueError(f"SynthConfig.pretrain_images must be >= 0, got {cfg.pretrain_images}")
    if cfg.resolution < 32:
        raise ValueError(f"SynthConfig.resolution must be at least 32 pixels, got {cfg.resolution}")


def generate(cfg: SynthConfig, progress: bool = True) -> dict:
    """Generate every file; nothing is renamed into place unless all of them were written."""
    _check(cfg)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    owned = OutputFolder(out, OWNER)
    final = SynthLayout.under(out)
    check_replaceable(  # before the work; checked again before the renames
        owned,
        [
            p.relative_to(out).as_posix()
            for p in (final.raw.raw, final.raw.vg_raw, final.data_dir, final.vg_dir)
            + (final.pretrain_jsonl.parent, final.world.parent)
        ],
    )
    counts: dict[str, int] = {}
    with staging_area(out, prefix=".synth.") as stage:
        lay = SynthLayout.under(stage)
        with contextlib.ExitStack() as stack:
            meta = {
                s: _Sink(stack.enter_context(open(p, "wb")))
                for s, p in _meta_files(lay, cfg).items()
            }
            sizes = {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images}
            bar = _progress(progress)
            counts.update(
                write_flickr(
                    cfg.seed, sizes, cfg.train_captions, cfg.resolution, lay.raw, meta, bar
                )
            )
            counts.update(
                write_vg(cfg.seed, cfg.vg_per_object, cfg.resolution, lay.raw, meta["vg"], bar)
            )
            counts.update(_prepare(cfg, stage, lay.raw, progress))
            if cfg.pretrain_images:
                counts.update(_write_pretrain(cfg, lay, meta["pretrain"], progress))

        def rel(p: Path) -> str:
            return p.relative_to(stage).as_posix()

        world = {
            "format_version": FORMAT_VERSION,
            "config": {**asdict(cfg), "out": None},
            "shapes": list(SHAPES),
            "colours": list(COLOUR_NAMES),
            "target_templates": list(C.TARGET_TEMPLATES),
            "pretrain_templates": list(C.PRETRAIN_TEMPLATES),
            "unusable_vg_word": UNUSABLE_VG_SHAPE,
            "raw": {
                "raw": rel(lay.raw.raw),
                "vg_raw": rel(lay.raw.vg_raw),
                "boxes": rel(lay.raw.boxes),
            },
            "counts": counts,
        }
        lay.world.write_bytes(dumps(world))
        pretrain = [rel(lay.pretrain_jsonl.parent)]
        parts = [rel(lay.raw.raw), rel(lay.raw.vg_raw), rel(lay.data_dir), rel(lay.vg_dir)]
        parts += (pretrain if cfg.pretrain_images else []) + [
            rel(lay.world.parent)
        ]  # world.json last
        _commit(stage, owned, parts, [] if cfg.pretrain_images else pretrain)
    counts["seconds"] = round(time.perf_counter() - t0, 2)
    return counts


def _meta_files(lay: SynthLayout, cfg: SynthConfig) -> dict[str, Path]:
    files = {s: p for s, p in lay.meta.items() if s != "pretrain" or cfg.pretrain_images}
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    return files
