"""A caption's entity texts (prompts, masked captions, slots) and the grounding label, shared by all stages."""

from agree.entities import EVAL_SLOTS, entity_slots, grounding_label, training_slots


def _texts(caption, segs):
    slots = training_slots(caption, segs)
    return slots.prompts, slots.masked


def test_entity_texts_filters_long_segs_takes_five_and_pads():
    caption = "two men and a dog play with a ball while two men watch"
    segs = ["two men", "a b c d e f g h", "a dog", "a ball", "x", "y", "z"]
    prompts, masked = _texts(caption, segs)
    assert prompts == [
        "a photo containing two men",
        "a photo containing a dog",
        "a photo containing a ball",
        "a photo containing x",
        "a photo containing y",
    ]
    # every occurrence is replaced
    assert masked[0] == "[MASK] and a dog play with a ball while [MASK] watch"
    assert masked[1] == "two men and [MASK] play with a ball while two men watch"
    assert _texts("a cat", ["a cat"]) == (
        ["a photo containing a cat", "", "", "", ""],
        ["[MASK]", "", "", "", ""],
    )
    # exactly seven words is kept, eight is not
    seven, eight = "a b c d e f g", "a b c d e f g h"
    assert _texts("c", [eight, seven])[0][0] == f"a photo containing {seven}"


def test_grounding_label_skips_object():
    assert grounding_label([{"object": 0.9}, {"men": 0.6}, {"top": 0.5}]) == "men"
    assert grounding_label([{"object": 0.9}]) is None
    assert grounding_label([]) is None


def test_extraction_slots_take_entities_as_given_and_count_real_ones():
    long_entity = "a b c d e f g h"  # longer than training allows: extraction keeps it (release)
    slots = entity_slots("x a b c d e f g h y", [long_entity, "y"], EVAL_SLOTS)
    assert len(slots.prompts) == len(slots.masked) == EVAL_SLOTS and slots.n_real == 2
    assert slots.masked[:2] == ["x [MASK] y", "x a b c d e f g h [MASK]"]
    assert slots.prompts[2:] == [""] * 8
    assert entity_slots("c", [str(i) for i in range(12)], EVAL_SLOTS).n_real == EVAL_SLOTS
