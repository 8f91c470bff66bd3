"""dataprep's text side: Flickr30k Entities files, gold phrases on raw captions, the offline extractors,
objects from segs, and the streaming JSON reader."""

import json

import pytest

from agree.io import InputError
from dataprep.entities_files import parse_sentence, read_annotation, read_sentences
from dataprep.jsonstream import iter_array
from dataprep.objects import head_word, image_objects, singulars
from dataprep.textual import get_extractor, gold_segs, locate, match_sentence, tokenize

# Sentences as the official files write them (tokenised), with Karpathy's raw captions of the same images.
PAIRS = [
    (
        "[/EN#255543/people A woman] holds [/EN#255545/bodyparts/people a man 's arm] at "
        "[/EN#255549/scene a formal event] .",
        "A woman holds a man's arm at a formal event.",
        ["A woman", "a man's arm", "a formal event"],
    ),
    (
        "[/EN#1/people Two young , White males] are outside near [/EN#4/scene many bushes] .",
        "Two young, White males are outside near many bushes.",
        ["Two young, White males", "many bushes"],
    ),
    (
        "[/EN#137644/people A group of friends] playing [/EN#137645/other cards] and trying to bluff "
        "[/EN#0/notvisual each other] into making [/EN#137650/other a terrible mistake] .",
        "A group of friends playing cards and trying to bluff each other into making a terrible mistake.",
        ["A group of friends", "cards", "a terrible mistake"],
    ),
    (
        "[/EN#279867/people A man] doing [/EN#279867/other gymnastic stunts]",
        "a man doing gymnastic stunts",
        ["a man", "gymnastic stunts"],
    ),
    (
        "[/EN#9/people The man] wears [/EN#10/clothing a `` I love NY '' shirt] .",
        'The man wears a "I love NY" shirt.',
        ["The man", 'a "I love NY" shirt'],
    ),
]


def test_sentence_markup_is_parsed():
    s = parse_sentence(PAIRS[0][0])
    assert s.text == "A woman holds a man 's arm at a formal event ."
    assert [(p.text, p.chain, p.types) for p in s.phrases] == [
        ("A woman", "255543", ("people",)),
        ("a man 's arm", "255545", ("bodyparts", "people")),
        ("a formal event", "255549", ("scene",)),
    ]
    notvisual = parse_sentence(PAIRS[2][0]).phrases[2]
    assert notvisual.text == "each other" and not notvisual.visual
    with pytest.raises(InputError, match="f.txt:3: unbalanced"):
        parse_sentence("[/EN#1/people A man walks .", "f.txt:3")


@pytest.mark.parametrize("marked, raw, expected", PAIRS)
def test_gold_phrases_land_on_the_raw_caption_as_substrings(marked, raw, expected):
    segs = gold_segs(raw, parse_sentence(marked))
    assert [s for s, _ in segs] == expected
    assert all(s in raw for s, _ in segs)


def test_sentence_matching_ignores_tokenisation_but_not_words():
    sentences = [parse_sentence(m) for m, _, _ in PAIRS]
    assert match_sentence(PAIRS[1][1], 1, sentences) is sentences[1]
    assert match_sentence(PAIRS[1][1], 0, sentences) is sentences[1]  # found elsewhere in the file
    assert match_sentence("A woman holds a dog's arm at a formal event.", 0, sentences) is None
    assert locate("a man 's arm", "THE MAN'S ARM, A MAN'S ARM") == (15, 26)  # case ignored
    assert locate("man", "a woman and a man") == (14, 17)  # whole words only


def test_entities_files_are_read(tmp_path):
    (tmp_path / "1.txt").write_text(PAIRS[0][0] + "\n\n" + PAIRS[1][0] + "\n")
    assert len(read_sentences(tmp_path / "1.txt")) == 2
    (tmp_path / "1.xml").write_text(
        "<annotation><filename>1.jpg</filename><size><width>500</width><height>375</height><depth>3</depth></size>"
        "<object><name>1</name><name>6</name><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>100</xmax><ymax>200</ymax>"
        "</bndbox></object><object><name>1</name><bndbox><xmin>300</xmin><ymin>20</ymin><xmax>350</xmax>"
        "<ymax>90</ymax></bndbox></object><object><name>10</name><scene>0</scene><nobndbox>1</nobndbox></object>"
        "</annotation>"
    )
    ann = read_annotation(tmp_path / "1.xml")
    assert (ann.width, ann.height) == (500, 375)
    assert ann.boxes == {
        "1": [(0.0, 10.0, 100.0, 200.0), (299.0, 19.0, 350.0, 90.0)],
        "6": [(0.0, 10.0, 100.0, 200.0)],
    }
    assert ann.no_box == {"10"}
    (tmp_path / "bad.xml").write_text("<annotation><object>")
    with pytest.raises(InputError, match="bad.xml: cannot parse"):
        read_annotation(tmp_path / "bad.xml")


def test_tokenizer_keeps_character_spans():
    caption = "The dog doesn't like the man's \"red\" ball."
    tokens = tokenize(caption)
    assert [t for t, _, _ in tokens] == [
        "The",
        "dog",
        "does",
        "n't",
        "like",
        "the",
        "man",
        "'s",
        '"',
        "red",
        '"',
        "ball",
        ".",
    ]
    assert all(caption[a:b] == t for t, a, b in tokens)


def test_textblob_extractor_works_offline_and_returns_caption_substrings():
    extract = get_extractor("textblob")
    cases = {
        "A little girl in a pink dress going into a wooden cabin.": [
            "A little girl",
            "a pink dress",
            "a wooden cabin",
        ],
        "A woman holds a man's arm at a formal event.": [
            "A woman",
            "a man's arm",
            "a formal event",
        ],
        "A group of friends playing cards.": ["A group of friends", "cards"],
        "Two dogs  run   through the snow": ["Two dogs", "the snow"],
        "It is what it is.": [],
        "": [],
    }
    for caption, expected in cases.items():
        segs = extract(caption)
        assert segs == expected, caption
        assert all(s in caption for s in segs)


def test_spacy_extractor_needs_an_installed_pipeline():
    try:
        extract = get_extractor("spacy", "en_core_web_sm")
    except InputError as e:
        assert "nothing is downloaded" in str(e)
        pytest.skip("no spaCy English pipeline installed (optional)")
    caption = "A little girl in a pink dress going into a wooden cabin."
    segs = extract(caption)
    assert "a pink dress" in segs and all(s in caption for s in segs)


def test_objects_are_vocabulary_words_named_by_segs():
    vocab = {"man", "dress", "tennis racket", "child", "leaf", "bush", "shirt"}
    assert (
        singulars("men") == ["man"]
        and "bush" in singulars("bushes")
        and "leaf" in singulars("leaves")
    )
    assert head_word("two young men", vocab) == "man"
    assert head_word("a tennis racket", vocab) == "tennis racket"
    assert head_word("a red car", vocab) is None
    assert image_objects(
        ["A little girl", "a pink dress", "three children", "many bushes", "the dress"], vocab
    ) == ["dress", "child", "bush"]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_json_arrays_stream_across_chunk_boundaries(tmp_path, chunk):
    data = {
        "dataset": "x",
        "images": [{"id": i, "v": [1.5, -2e-3, None, True], "s": 'a\\"b]},'} for i in range(30)]
        + [12345678901234567890, "tail"],
        "more": {"k": [1, 2]},
    }
    p = tmp_path / "d.json"
    p.write_text(json.dumps(data, indent=1))
    assert list(iter_array(p, "images", chunk=chunk)) == data["images"]
    q = tmp_path / "a.json"
    q.write_text(json.dumps(data["images"]))
    assert list(iter_array(q, chunk=chunk)) == data["images"]


def test_json_stream_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"a": 1}, {"a": 2,}]')
    it = iter_array(p)
    assert next(it) == {"a": 1}
    with pytest.raises(InputError, match="bad.json: malformed JSON near character 19"):
        next(it)
    p.write_text('{"dataset": "coco"}')
    with pytest.raises(InputError, match="no 'images' list"):
        list(iter_array(p, "images"))
    p.write_text("[1, 2")
    with pytest.raises(InputError, match="bad.json: malformed JSON"):
        list(iter_array(p))
    with pytest.raises(InputError, match="not found"):
        list(iter_array(tmp_path / "none.json"))
