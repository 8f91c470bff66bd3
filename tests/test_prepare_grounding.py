"""dataprep's grounding rules (preds and masked labels) and odd-input accounting, on hand-made cases."""

import numpy as np
import pytest
from PIL import Image

from agree.io import InputError
from dataprep.geometry import Geometry
from dataprep.grounding import (
    Detection,
    from_detections,
    from_gold,
    head_label,
    masked_labels,
    mentions,
    through_crop,
)
from dataprep.images import mask_pixels
from dataprep.item import ItemTask, TextSettings, prepare_item
from dataprep.karpathy import ImageEntry
from dataprep.skips import SkipLog
from tests._raw_data import COLOURS, Obj, draw, jpeg_bytes

G = Geometry(200, 100, 100)  # short side already 100: no scaling; crop x in [50, 150)


def test_detector_preds_follow_the_caption_the_threshold_and_the_scores():
    dets = [
        Detection("dog", (60, 10, 120, 60), 0.7),
        Detection("man", (110, 0, 180, 90), 0.9),
        Detection("dog", (140, 20, 190, 80), 0.8),
        Detection("tree", (90, 0, 100, 20), 0.3),
        Detection("red ball", (100, 50, 130, 80), 0.6),
        Detection("cat", (100, 10, 150, 50), 0.95),
    ]
    captions = ["A man and his dog.", "Dogs playing with a red  ball near a tree.", "Nothing here."]
    g = from_detections(captions, dets, threshold=0.5)
    preds, boxes = through_crop(g, G)
    # whole words only ("Dogs" is not "dog"), below-threshold "tree" never, highest score first; the 0.8 dog
    # box has only 20% of its area inside the crop (< MIN_VISIBLE): dropped, so "dog" scores 0.7
    assert preds == [[{"man": 0.9}, {"dog": 0.7}], [{"red ball": 0.6}], []]
    assert masked_labels(preds) == ["man", "red ball"]
    assert boxes["dog"] == [(10.0, 10.0, 70.0, 60.0)] and boxes["man"] == [(60.0, 0.0, 100.0, 90.0)]
    assert "tree" not in boxes and "cat" in boxes  # not in any caption, but kept for its box


def test_a_label_cut_off_by_the_crop_leaves_the_preds_and_scores_come_from_surviving_boxes():
    dets = [
        Detection("dog", (0, 0, 40, 50), 0.99),
        Detection("dog", (100, 0, 140, 50), 0.6),
        Detection("kite", (0, 0, 30, 30), 0.9),
    ]
    preds, boxes = through_crop(from_detections(["A dog and a kite."], dets, 0.5), G)
    assert preds == [[{"dog": 0.6}]] and set(boxes) == {"dog"}


def test_gold_preds_keep_phrase_order_and_union_the_boxes_of_a_label():
    chain_boxes = {"1": [(100, 0, 120, 50)], "2": [(130, 0, 150, 50)], "3": [(120, 50, 140, 90)]}
    caption_segs = [
        [("A man", "1"), ("a tree", "9"), ("a dog", "3")],
        [("The man", "2")],
        [("each other", "0")],
    ]
    preds, boxes = through_crop(from_gold(caption_segs, chain_boxes), G)
    assert preds == [[{"man": 1.0}, {"dog": 1.0}], [{"man": 1.0}], []]  # "a tree" has no box
    assert boxes["man"] == [
        (50.0, 0.0, 70.0, 50.0),
        (80.0, 0.0, 100.0, 50.0),
    ]  # both men masked together
    assert head_label("a man's arm") == "arm" and head_label("Two young , White males") == "males"
    assert head_label(" , ") == ""


def test_mentions_is_whole_word_and_case_blind():
    assert mentions("A Red  Ball.", "red ball") and not mentions("a redball", "red ball")
    assert not mentions("hotdogs", "dog") and mentions("dog-walker", "dog")


def test_skip_budget_counts_each_kind_against_its_total():
    log: list[str] = []
    s = SkipLog(0.25, log.append)
    s.total("images", 8)  # 2 may be skipped
    s.skip("images", "a.jpg: missing")
    s.skip("images", "b.jpg: missing")
    s.skip("boxes", "x.xml: outside")  # total not known yet: counted, checked later
    with pytest.raises(
        InputError,
        match=r"c.jpg: corrupt\n3 of 8 images skipped, more than --max-missing-fraction "
        r"0.25 allows \(2\)",
    ):
        s.skip("images", "c.jpg: corrupt")
    with pytest.raises(InputError, match="x.xml: outside\n1 of 3 boxes skipped"):
        s.total("boxes", 3)
    assert log == [
        "warning: skipped: a.jpg: missing",
        "warning: skipped: b.jpg: missing",
        "warning: skipped: x.xml: outside",
        "warning: skipped: c.jpg: corrupt",
    ]
    with pytest.raises(InputError, match="between 0 and 1"):
        SkipLog(1.5)


@pytest.mark.parametrize("annotated", ["upright", "stored", "rescaled"])
def test_entities_boxes_follow_exif_rotation_and_rescaled_annotations(tmp_path, annotated):
    """An Entities box file may describe the image as shown (EXIF applied), as stored, or a rescaled copy: the
    masked region is the same in each case."""
    dog = Obj(1, "dog", (5, 10, 30, 40))
    upright = draw((60, 80), [dog], 0)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 shows it upright again
    exif = Image.Exif()
    exif[274] = 6
    (tmp_path / "7.jpg").write_bytes(jpeg_bytes(stored, exif=exif.tobytes()))
    if annotated == "upright":
        size, box = (60, 80), dog.box
    elif annotated == "stored":
        ys, xs = np.nonzero((np.abs(np.asarray(stored, int) - COLOURS["dog"]).max(-1) < 40))
        size, box = (80, 60), (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    else:
        size, box = (120, 160), tuple(2 * v for v in dog.box)
    (tmp_path / "7.xml").write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size><object><name>1</name>"
        f"<bndbox><xmin>{box[0] + 1}</xmin><ymin>{box[1] + 1}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax>"
        "</bndbox></object></annotation>"
    )
    (tmp_path / "7.txt").write_text("[/EN#1/animals A dog] runs .\n")
    entry = ImageEntry("train", "flickr30k-images/7.jpg", "7", 0, ("A dog runs.",), 0, 0)
    task = ItemTask(
        entry,
        str(tmp_path / "7.jpg"),
        32,
        TextSettings(),
        str(tmp_path / "7.txt"),
        str(tmp_path / "7.xml"),
        grounding="gold",
    )
    res = prepare_item(task)
    assert res.error is None and res.segs == [["A dog"]] and res.preds == [[{"dog": 1.0}]]
    assert res.masks["dog"] == mask_pixels([Geometry(60, 80, 32).crop_box(dog.box)], 32)
