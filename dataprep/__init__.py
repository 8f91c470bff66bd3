"""Data preparation: the release layout (docs/data.md, File formats) built from the official raw downloads.

Inputs: Flickr30k or MSCOCO images with Karpathy's split file, optionally Flickr30k Entities, Visual
Genome, and any detector's boxes (JSONL). Output: every file of the layout under one root, written
into a temporary folder and renamed into place at the end. Same inputs and settings -> same bytes.

Library use (what scripts/prepare_data.py does)::

    from dataprep.pipeline import PrepareConfig, prepare
    report = prepare(PrepareConfig(dataset="flickr30k", raw=Path("raw"), vg_raw=Path("vg"), out=Path("tmp"),
                                   resolution=64, storage="uint8", workers=0, progress=False, log=print))
    report.layout        # agree.layout.Layout of what was written (report.skipped: it was there already)
    report.counts, report.odd, report.seconds

PrepareConfig's fields are the script's flags (boxes, resolution, storage, extractor, spacy_model,
gold_entities, box_threshold, vg_per_word, max_missing_fraction, overwrite, workers) plus `progress`
and `log` (where messages go). Bad input raises agree.io.InputError. The output bytes depend only on
the input files and the settings, not on `workers` or on timing.

Modules: karpathy (split files), entities_files (Flickr30k Entities sentences and boxes), boxes
(detector JSONL), visual_genome (image_data/objects and the choice of VG images), jsonstream
(streaming JSON arrays), images (decode, EXIF, resize + crop, masks), geometry (boxes through the
crop), textual (noun-phrase extractors, gold phrases on raw captions), grounding (preds and masked
images), objects (objects of an image), item (everything about one image, run in worker processes),
parallel (bounded ordered process pool), npz (streaming .npz writer), staging (temporary folder,
finished-layout check, final rename), skips (odd-input accounting), pipeline (the whole run).
This file imports nothing: worker processes import only the modules they need.
"""
