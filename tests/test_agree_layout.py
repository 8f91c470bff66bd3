"""The id schemes of the layout, defined once in agree.layout, and the splits that read them."""

import json

import pytest

from agree.layout import CAPTIONS_PER_IMAGE, Layout, caption_query_id, val_image_key
from experiments.measure import val_split


def test_caption_query_ids_are_five_per_image():
    assert CAPTIONS_PER_IMAGE == 5
    assert [caption_query_id(0, j) for j in range(5)] == [0, 1, 2, 3, 4]
    assert caption_query_id(3, 2) == 17
    with pytest.raises(ValueError, match="caption index 5"):
        caption_query_id(1, 5)


def test_val_image_keys_are_list_positions():
    assert val_image_key(0) == "0" and val_image_key(12) == "12"


def test_val_split_ground_truth_follows_the_schemes(tmp_path):
    lay = Layout.under(tmp_path)
    lay.annotation.mkdir(parents=True)
    records = [{"image": f"{k}.jpg", "caption": [f"c{k}{j}" for j in range(5)]} for k in range(3)]
    lay.val_json.write_text(json.dumps(records))
    split = val_split(lay)
    assert split.captions[7] == (caption_query_id(1, 2), "c12")
    assert split.t2i_gt.get(caption_query_id(2, 4)) == [val_image_key(2)]
    assert split.i2t_gt.get(val_image_key(1)) == [5, 6, 7, 8, 9]
    records[1]["caption"] = records[1]["caption"][:4]
    lay.val_json.write_text(json.dumps(records))
    with pytest.raises(Exception, match="same number of captions"):
        val_split(lay)
