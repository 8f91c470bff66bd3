"""The batch-slot registry (training.slots) is complete, and the pieces of the image and text path behind it:
the augmentation's crop window, its resize, the token cache."""

import dataclasses

import numpy as np
import pytest
import torch
from _train_data import make_dataset, one_torch_thread  # noqa: F401 (autouse fixture)
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop

from clip.clip import tokenize
from clip.transform import MEAN, STD
from training import data as D
from training import dataset as DS
from training import terms
from training.augment import NONE, RANDOM_RESIZED_CROP, crop_window, resize, to_batch_tensor
from training.params import build_parser, parse_args
from training.slots import DATA_FILES, FILES, IMAGE, INPUTS, SLOT_LIST, SLOTS, TEXT
from training.tokens import Tokenizer

R = 64


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_images=4, caps_per_image=1, n_val=2)


def test_every_slot_a_term_reads_is_declared_and_every_declared_slot_is_read():
    read = {s for t in terms.TERMS for s in t.slots}
    assert read <= set(SLOTS)
    assert set(SLOTS) == read  # no slot nobody reads
    assert terms.IMAGE_SLOTS == tuple(s.name for s in SLOT_LIST if s.kind == IMAGE)
    assert terms.TEXT_SLOTS == tuple(s.name for s in SLOT_LIST if s.kind == TEXT)
    assert len(SLOT_LIST) == len(SLOTS)  # names are unique


def test_every_file_a_slot_needs_has_a_flag_a_path_field_and_a_loader():
    parser = build_parser()
    options = {opt: action for action in parser._actions for opt in action.option_strings}
    fields = {f.name for f in dataclasses.fields(D.DataPaths)}
    inputs = {i.name for i in INPUTS}
    input_fields = {f.name for f in dataclasses.fields(DS.TrainInputs)}
    for slot in SLOT_LIST:
        assert slot.inputs and set(slot.inputs) <= inputs, slot.name
    for inp in INPUTS:
        assert inp.dests and set(inp.dests) <= set(FILES), inp.name
        assert callable(getattr(DS._Loading, f"load_{inp.name}", None)), inp.name
        assert set(inp.opens) <= input_fields, inp.name
        assert len(inp.choice) != 1  # a choice is between several files
    for f in DATA_FILES:
        assert f.flag in options and options[f.flag].dest == f.dest, f.flag
        assert options[f.flag].help, f.flag
        assert f.dest in fields, f.dest
        assert f.masks in (None, "boxes", "images")


def test_every_declared_slot_is_built_and_collated(ds):
    args = parse_args(
        ["--train-data", str(ds["train"]), "--model", "tiny", *terms.flags_of(terms.AGREE_TERMS)]
    )
    inputs = DS.load_train_inputs(args, D.resolve_paths(args), terms.enabled_terms(args))
    for inp in INPUTS:  # every input's loader filled what it opens
        assert all(getattr(inputs, name) is not None for name in inp.opens), inp.name
    dset = inputs.dataset(R)
    batch = next(iter(DataLoader(dset, batch_size=3, num_workers=0)))
    assert set(batch) == set(SLOTS)
    for slot in SLOT_LIST:
        value = batch[slot.name]
        if slot.kind == IMAGE:
            assert value.shape == (3, 3, R, R) and value.dtype == torch.float32, slot.name
        elif slot.rows == 1:
            assert value.shape == (3, 77) and value.dtype == torch.long, slot.name
        else:
            assert value.shape == (3, slot.rows, 77), slot.name


def test_crop_window_draws_torchvisions_random_resized_crop():
    for seed in range(300):
        for h, w in ((64, 64), (224, 224), (30, 90)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                expected = RandomResizedCrop.get_params(
                    torch.empty(3, h, w), scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)
                )
            assert crop_window(h, w, torch.Generator().manual_seed(seed)) == tuple(expected)


def test_no_augmentation_is_the_identity_and_resizing_stays_in_the_byte_range():
    x = np.random.default_rng(0).standard_normal((3, R, R)).astype(np.float32)
    assert torch.equal(to_batch_tensor(x, R, NONE, 0), torch.from_numpy(x))
    big = to_batch_tensor(x * 5, 32, NONE, 0)  # beyond the range of any stored image: clamped
    for c in range(3):
        low, high = (0 - MEAN[c]) / STD[c], (1 - MEAN[c]) / STD[c]  # bytes 0 and 255, normalised
        assert big[c].min() == pytest.approx(low, abs=1e-6)
        assert big[c].max() == pytest.approx(high, abs=1e-6)
    assert big.shape == (3, 32, 32)
    a, b = (to_batch_tensor(x, R, RANDOM_RESIZED_CROP, s) for s in (1, 2))
    assert a.shape == (3, R, R) and not torch.equal(a, b)
    assert torch.equal(a, to_batch_tensor(x, R, RANDOM_RESIZED_CROP, 1))
    assert torch.equal(resize(torch.from_numpy(x), R), torch.from_numpy(x))
    with pytest.raises(ValueError, match="unknown augmentation"):
        to_batch_tensor(x, R, "flip", 0)


def test_the_token_cache_gives_clips_ids():
    texts = [
        "",
        "a photo containing a man",
        "Wow! A [MASK] on a bike!!",  # '!' is token id 0
        "a photo containing a man",
        "caf\u00e9 d\u00e9j\u00e0 vu",
        " ".join(["word"] * 100),  # cut to the context, end token kept
    ]
    tok = Tokenizer(cache_texts=2)
    for _ in range(2):
        assert torch.equal(tok(texts), tokenize(texts))
