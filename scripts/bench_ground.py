"""Benchmark of the CPU side of scripts/ground_entities.py: training images per second that one worker process
gets ready for the detector (the image decoded as displayed, the textual entities of its 5 captions).

    python scripts/bench_ground.py [--images 300]

Uses scripts/bench_prepare.py's generated Flickr30k (500x375 JPEGs of ~120 KiB, Entities files) and
times, in this one process, the decode alone, the phrases alone (gold Flickr30k Entities phrases, and
the TextBlob extractor that COCO's captions go through) and the whole per-image task. The detector's
own speed needs its real weights and a GPU and is not measured here.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

from agree.cli import HelpFormatter
from dataprep.datasets import get_dataset
from dataprep.detect_boxes import PhraseTask, load_item
from dataprep.images import decode
from dataprep.item import Outcome, TextSettings, caption_segs
from dataprep.karpathy import read_split_file
from dataprep.skips import SkipLog
from dataprep.textual import get_extractor


def _make_raw():
    """scripts/bench_prepare.py's generator of a raw Flickr30k (a sibling script, loaded by path)."""
    spec = importlib.util.spec_from_file_location(
        "bench_prepare", Path(__file__).with_name("bench_prepare.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_raw


def _rate(fn, items) -> float:
    start = time.perf_counter()
    for it in items:
        fn(it)
    return len(items) / (time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    """The script's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--images", type=int, default=300, help="images generated (default 300; 90%% train)"
    )
    return p


def main() -> None:
    args = build_parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _make_raw()(root, args.images, n_vg=1)
        raw = root / "raw"
        spec = get_dataset("flickr30k")
        entries = [
            e
            for e in read_split_file(spec.split_path(raw), spec, SkipLog(1.0, print))
            if e.split == "train"
        ]
        sentences = raw / "flickr30k_entities" / "Sentences"
        text = TextSettings()
        get_extractor(text.extractor)
        gold = [
            PhraseTask(e, str(raw / e.file), str(sentences / f"{e.stem}.txt"), text)
            for e in entries
        ]
        extracted = [PhraseTask(e, str(raw / e.file), None, text) for e in entries]
        load_item(gold[0])  # warm the caches (the parser's lexicon)
        rows = [
            (
                "decode (EXIF, RGB)",
                _rate(lambda t: decode(t.image_path).image.convert("RGB"), gold),
            ),
            (
                "phrases, gold Entities",
                _rate(lambda t: caption_segs(t.entry, t.sentences_path, t.text, Outcome()), gold),
            ),
            (
                "phrases, TextBlob",
                _rate(lambda t: caption_segs(t.entry, None, t.text, Outcome()), extracted),
            ),
            ("whole task, gold Entities (Flickr30k)", _rate(load_item, gold)),
            ("whole task, TextBlob (COCO)", _rate(load_item, extracted)),
        ]
    print(f"{len(entries)} training images, 500x375 JPEG, 5 captions each; one process")
    for name, rate in rows:
        print(f"  {name:40s} {rate:8.1f} images/s  {1000 / rate:6.2f} ms/image")


if __name__ == "__main__":
    main()
