"""The dataset registry (dataprep.datasets): complete for every dataset the layout names, read by every
consumer of raw data (split file, image folders, ids, Visual Genome's held-out images, gold entities),
and a new dataset is one entry: a toy third dataset registered in the test prepares end to end."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from agree.io import InputError
from agree.layout import DATASETS, Layout
from dataprep import datasets
from dataprep.datasets import REGISTRY, Dataset, GoldEntities, get_dataset
from dataprep.karpathy import read_split_file
from dataprep.pipeline import PrepareConfig, prepare
from dataprep.skips import SkipLog
from tests._raw_data import make_registered, make_vg
from tests._scripts import load_script

R = 32
TOY = Dataset(
    name="toy",
    split_file="dataset_toy.json",
    image_folders=("toy-images",),
    id_key="toyid",
    heldout_id="id",
    vg_key="toy_id",
)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_registry_holds_exactly_the_layouts_datasets():
    assert tuple(REGISTRY) == DATASETS == datasets.names()
    for name, spec in REGISTRY.items():
        assert spec.name == name


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_entry_has_every_field(name):
    spec = REGISTRY[name]
    assert spec.split_file.endswith(".json") and "/" not in spec.split_file
    assert spec.image_folders and all(isinstance(f, str) and f for f in spec.image_folders)
    assert isinstance(spec.id_key, str) and spec.id_key
    assert spec.folder_key is None or (isinstance(spec.folder_key, str) and spec.folder_key)
    assert spec.heldout_id in datasets.HELDOUT_IDS
    assert isinstance(spec.vg_key, str) and spec.vg_key.endswith("_id")  # both real ones have one
    assert spec.gold_entities is None or isinstance(spec.gold_entities, GoldEntities)
    train, val, test = spec.split_sizes  # both real ones are in the disk table
    assert train > val > 0 and test > 0 and spec.example_stem


def test_the_real_entries_say_what_the_downloads_are():
    f, c = REGISTRY["flickr30k"], REGISTRY["coco"]
    assert (f.split_file, f.image_folders, f.id_key, f.folder_key) == (
        "dataset_flickr30k.json",
        ("flickr30k-images",),
        "imgid",
        None,
    )
    assert (f.heldout_id, f.vg_key, f.gold_entities) == (
        "stem",
        "flickr_id",
        GoldEntities("flickr30k_entities"),
    )
    assert (c.split_file, c.image_folders, c.id_key, c.folder_key) == (
        "dataset_coco.json",
        ("train2014", "val2014"),
        "cocoid",
        "filepath",
    )
    assert (c.heldout_id, c.vg_key, c.gold_entities) == ("id", "coco_id", None)
    # Karpathy's splits (COCO: train + restval); file stems as the downloads name them
    assert f.split_sizes == (29_000, 1_014, 1_000) and c.split_sizes == (113_287, 5_000, 5_000)
    assert (f.example_stem, c.example_stem) == ("1000092795", "COCO_train2014_000000391895")


def test_the_disk_table_has_every_entry_with_published_sizes(monkeypatch):
    script = load_script("scripts/disk_usage.py")
    rows = script.table(224)
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| flickr30k"] * 5 + ["| coco"] * 5
    monkeypatch.setitem(REGISTRY, TOY.name, TOY)  # no published sizes: not in the table
    assert script.table(224) == rows

    def toy_rows(stem: str) -> list[str]:
        sized = dataclasses.replace(TOY, split_sizes=(100_000, 10, 20), example_stem=stem)
        monkeypatch.setitem(REGISTRY, TOY.name, sized)
        return [r.split(" | ") for r in script.table(224) if r.startswith("| toy |")]

    short, long = toy_rows("1" * 10), toy_rows("1" * 40)
    assert short[0][1] == "train + val + test images (100,030)"
    assert short[1][1] == "grounding masks (at most 500,000)"
    assert short[0] == long[0]  # image archives: keys are ids, not stems
    # a mask-box line holds its key "<stem>_<label>": 30 more characters on 500,000 lines
    grow = float(long[1][3].split()[0]) - float(short[1][3].split()[0])
    assert abs(grow - 30 * 500_000 / 2**20) < 0.15


def test_an_unknown_dataset_names_the_flag_and_the_choices():
    with pytest.raises(
        InputError, match=r"--dataset: unknown dataset 'nope' \(choose from flickr30k, coco\)"
    ):
        get_dataset("nope")


def _prepare_and_check(spec: Dataset, base: Path) -> None:
    """Raw files written from the entry alone -> prepare -> every id, folder and exclusion as the entry says."""
    info = make_registered(base / "raw", spec)
    images = info["images"]
    heldout = [im for im in images if im.split != "train"]

    def test_id(im):
        return im.source_id if spec.heldout_id == "id" else int(im.stem)

    marked = [test_id(im) for im in heldout[:2]]
    vg = make_vg(base / "vg", {spec.vg_key: marked} if spec.vg_key else {})
    marked_vg = {e["image_id"] for e in vg["image_data"] if e.get(spec.vg_key) is not None}
    assert len(marked_vg) == (2 if spec.vg_key else 0)
    report = prepare(
        PrepareConfig(
            spec.name,
            base / "raw",
            base / "vg",
            base / "out",
            resolution=R,
            storage="uint8",
            workers=0,
            progress=False,
            log=lambda _: None,
        )
    )
    lay = report.layout
    assert lay == Layout.under(base / "out", spec.name)
    assert lay.train_jsonl.name == f"{spec.name}_train_pred.jsonl"
    records = _jsonl(lay.train_jsonl)
    train = [im for im in images if im.split == "train"]
    assert sorted({r["image_id"] for r in records}) == sorted(im.source_id for im in train)
    folders = {r["image"].split("/")[0] for r in records}
    assert folders <= set(spec.image_folders)
    tests = [im for im in images if im.split == "test"]
    assert [g["image_id"] for g in _jsonl(lay.test_images)] == [test_id(im) for im in tests]
    assert np.load(lay.test_npz).files == [str(test_id(im)) for im in tests]
    assert report.counts["vg_images_excluded_heldout"] == len(marked_vg)
    assert not {str(g) for g in marked_vg} & set(np.load(lay.vg_images).files)
    if spec.gold_entities is not None:
        # gold phrases and boxes: the labels are head words of the gold phrases ("Two dogs" -> "dogs")
        assert lay.grounding_boxes.is_file()  # --masks boxes, the default: no masked copies
        assert not lay.grounding.exists()
        assert any(r["preds"] for r in records)
        words = {w for im in train for o in im.objects for w in (o.word, o.word + "s")}
        assert {label for r in records for p in r["preds"] for label in p} <= words
    else:
        assert not lay.grounding.exists() and not lay.grounding_boxes.exists()
        assert all(r["preds"] == [] for r in records)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_dataset_prepares_from_its_entry(name, tmp_path):
    _prepare_and_check(REGISTRY[name], tmp_path)


def test_a_new_dataset_is_one_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, TOY.name, TOY)
    _prepare_and_check(TOY, tmp_path)
    lay = Layout.under(tmp_path / "out", "toy")
    assert lay.data_dir == tmp_path / "out" / "datasets" / "toy_images"
    assert lay.test_texts.name == "toy_test_texts.jsonl"


def test_a_toy_dataset_with_a_folder_key_and_gold_entities(tmp_path, monkeypatch):
    spec = Dataset(
        name="toy2",
        split_file="toy2.json",
        image_folders=("a", "b"),
        id_key="photo",
        folder_key="where",
        heldout_id="stem",
        vg_key="toy2_id",
        gold_entities=GoldEntities("toy2_entities"),
    )
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    _prepare_and_check(spec, tmp_path)


def test_split_file_errors_name_the_entrys_keys(tmp_path):
    path = tmp_path / "dataset_toy.json"
    path.write_text(
        json.dumps({"images": [{"filename": "1.jpg", "split": "train", "sentences": []}]})
    )
    with pytest.raises(InputError, match=r"images\[0\]: missing key 'toyid'"):
        read_split_file(path, TOY, SkipLog(0.0))
    path.write_text(
        json.dumps({"images": [{"filename": "1.jpg", "split": "x", "toyid": 1, "sentences": []}]})
    )
    with pytest.raises(InputError, match="unknown split 'x'"):
        read_split_file(path, TOY, SkipLog(0.0))


def test_missing_raw_files_are_named_from_the_entry(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, TOY.name, TOY)
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(
        InputError, match=r"--raw: Karpathy's split file not found: .*dataset_toy\.json"
    ):
        datasets.check_raw(TOY, raw)
    (raw / "dataset_toy.json").write_text("{}")
    with pytest.raises(InputError, match=r"--raw: image folder not found: .*toy-images"):
        datasets.check_raw(TOY, raw)
