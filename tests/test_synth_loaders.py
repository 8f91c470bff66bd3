"""The synthetic dataset passes the project's own loaders: fine-tuning data (docs/method.md §1) and the eval readers."""

import json
import logging

import pytest

from agree.entities import training_slots
from agree.images import ImageArchive
from agree.io import read_jsonl
from eval import evaluation, predictions
from synth.writer import UNUSABLE_VG_SHAPE, SynthConfig, SynthLayout, generate
from training import data as D
from training import dataset as DS
from training import params
from training import validation as V
from training.terms import AGREE_TERMS, enabled_terms, flags_of

R = 64
ALL_TERMS = flags_of(AGREE_TERMS)


@pytest.fixture(scope="module")
def lay(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_loaders")
    generate(
        SynthConfig(
            out=root,
            seed=6,
            train_images=24,
            val_images=4,
            test_images=6,
            pretrain_images=6,
            vg_per_object=3,
        ),
        progress=False,
    )
    return SynthLayout.under(root)


def _texts(caption, segs):
    slots = training_slots(caption, segs)
    return slots.prompts, slots.masked


def _args(train, *flags):
    return params.parse_args(["--train-data", str(train), "--model", "tiny", *flags])


def test_fine_tuning_reads_every_file_from_the_default_layout(lay, caplog):
    args = _args(lay.train_jsonl, "--val-data", str(lay.val_json), *ALL_TERMS)
    paths = D.resolve_paths(args)
    D.check_files(
        args, enabled_terms(args), paths
    )  # every default path resolves to a generated file
    assert paths.grounding_images == lay.grounding and paths.vg_vocab == lay.vg_vocab
    with caplog.at_level(logging.WARNING):
        dset = DS.build_train_dataset(args, paths, enabled_terms(args), R)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert len(dset) == 5 * 24
    # grounding: every record with a label finds its masked image; some records exercise the fallback
    keyed = [r for r in dset.records if r.grounding_key is not None]
    assert keyed and all(r.grounding_key in dset.grounding for r in keyed)
    assert len(keyed) < len(dset.records)
    # VG: every usable word is reachable, the unusable one is not
    assert UNUSABLE_VG_SHAPE not in dset.vg_vocab and len(dset.vg_vocab) >= 3
    for i in range(0, len(dset), 7):
        ex = dset[i]
        for key in ("image", "vg_image", "vg_image_masked", "grounding_masked"):
            assert tuple(ex[key].shape) == (3, R, R), key
        assert tuple(ex["prompts"].shape) == (5, 77) and tuple(ex["masked"].shape) == (5, 77)


def test_entity_slots_come_from_the_entity_phrases(lay):
    recs = read_jsonl(lay.train_jsonl)
    masked_any = 0
    for rec in recs:
        prompts, masked = _texts(rec["caption"], rec["segs"])
        real = [p for p in prompts if p]
        assert real, rec
        masked_any += sum(m != rec["caption"] and "[MASK]" in m for m in masked if m)
    assert masked_any > len(recs)  # masking really removes phrases from the captions


def test_validation_file_loads(lay):
    val = V.load_val(lay.val_json, lay.val_npz, "caption")
    assert len(val.keys) == 4 and len(val.captions) == 20
    assert val.images.load_tensor("0", R).shape == (3, R, R)


def test_pretrain_split_loads_as_training_data(lay):
    args = _args(lay.pretrain_jsonl, "--train-images", str(lay.pretrain_npz))
    dset = DS.build_train_dataset(args, D.resolve_paths(args), enabled_terms(args), R)
    assert len(dset) == 12 and tuple(dset[0]["image"].shape) == (3, R, R)


def test_eval_reads_the_ground_truth_and_scores_a_perfect_ranking(lay, tmp_path, capsys):
    texts = predictions.read_ranked_lists(lay.test_texts, "query_id", "ground truth")
    images = predictions.read_ranked_lists(lay.test_images, "image_id", "ground truth")
    assert len(texts) == 30 and len(images) == 6
    archive = ImageArchive(lay.test_npz)
    for items in texts.items:
        assert str(items[0]) in archive
    assert archive.load_tensor(str(images.ids[0]), R).shape == (3, R, R)
    for gt, key in ((lay.test_texts, "query_id"), (lay.test_images, "image_id")):
        out = tmp_path / f"{key}.json"
        assert evaluation.main([str(gt), str(gt), str(out), key]) == 0
        score = json.loads(out.read_text())
        assert score["success"] and score["scoreJson"]["r1"] == 100.0


def test_test_segs_match_the_queries(lay):
    rows = read_jsonl(lay.test_segs, required=("query_id", "query_text", "items"))
    texts = {r["query_id"]: r["query_text"] for r in read_jsonl(lay.test_texts)}
    for r in rows:
        assert texts[r["query_id"]] == r["query_text"]
        assert 1 <= len(r["items"]) <= 10
        assert all(item in r["query_text"] for item in r["items"])
