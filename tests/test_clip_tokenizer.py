"""Token ids must equal OpenCLIP's (= OpenAI's) for every input."""

import random

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from clip.clip import get_tokenizer, tokenize  # noqa: E402
from clip.simple_tokenizer import SimpleTokenizer  # noqa: E402

BASE = [
    "",
    " ",
    "[MASK]",
    "a photo containing [MASK]",
    "A man in a red shirt.",
    "Four men on top of a tall structure.",
    "naïve café résumé",
    "Ünïcödé ÀÉÎÕÜ façade",
    "東京タワーの写真",
    "一只猫坐在椅子上",
    "서울의 거리",
    "Привет, мир!",
    "مرحبا بالعالم",
    "שלום עולם",
    "γειά σου κόσμε",
    "नमस्ते दुनिया",
    "🙂🐶🚀 emoji party 🎉",
    "👨‍👩‍👧‍👦 family",
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39;apos&#39;",
    "&amp;amp; double escaped",
    "Tom &amp; Jerry",
    "don't won't shouldn't it's we're they've I'm you'll he'd",
    "DON'T SHOUT IT'S LOUD",
    "rock'n'roll o'clock",
    "3.14159 2,000,000 1e-5 42nd 0x1F",
    "phone: +1 (555) 123-4567",
    "2023-02-22 03:44:02",
    "!!!???...,,,;;;::: ---___",
    "(((nested))) [[brackets]] {{braces}}",
    "a -- b — c – d",
    "x/y\\z|w",
    "tabs\tand\nnewlines\r\nand   spaces",
    "   leading and trailing   ",
    "ALL CAPS SENTENCE HERE",
    "mIxEd CaSe WoRdS",
    "camelCaseWords and snake_case_words",
    "https://example.com/path?q=1&r=2#frag",
    "user@example.com",
    "#hashtag @mention $100 50% ^caret* ~tilde`",
    "a" * 100,
    "supercalifragilisticexpialidocious",
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "ﬁﬂ ligatures and ½ fractions ² superscripts",
    "â€œmojibakeâ€\x9d text",
    "zero\u200bwidth\u200bspace",
    "non\u00a0breaking\u00a0space",
    "a\x00null",
    "\u3000ideographic space",
    "<b>html tags</b> <|not special|> <start of text>",
]
# Text containing the special-token markup itself: OpenAI's tokenizer (ours, as the release's) maps
# '<|startoftext|>' / '<|endoftext|>' to the special ids; OpenCLIP names them '<start_of_text>' /
# '<end_of_text>' instead. Same ids, different spelling, so compare after swapping the spelling.
MARKUP = [
    "<|startoftext|>",
    "<|endoftext|> in the middle <|endoftext|>",
    "ends with <|endoftext|>",
    "a<|endoftext|>b",
]
WORDS = [
    "a",
    "the",
    "red",
    "blue",
    "small",
    "large",
    "circle",
    "star",
    "man",
    "woman",
    "dog",
    "playing",
    "on",
    "in",
    "left",
    "of",
    "right",
    "above",
    "below",
    "shirt",
    "grass",
    "café",
    "über",
    "日本",
    "🙂",
    "'s",
    "n't",
    "3",
    "42",
    "...",
    "!",
    ",",
    "&amp;",
    "[MASK]",
    "-",
    "2nd",
    "x",
    "Ω",
    "ß",
    "straße",
    "rôle",
]


def _corpus() -> list[str]:
    rng = random.Random(1234)
    texts = list(BASE)
    while len(texts) < 220:
        n = rng.randint(1, 40)
        sep = rng.choice([" ", " ", "", "  ", "\t"])
        texts.append(sep.join(rng.choice(WORDS) for _ in range(n)))
    texts.append(" ".join(rng.choice(WORDS) for _ in range(300)))  # far longer than 77 tokens
    texts.append("very long caption " * 60)
    return texts


def test_token_ids_equal_openclip():
    texts = _corpus()
    assert len(texts) >= 200
    ours = tokenize(texts)
    peer = open_clip.tokenize(texts)
    mismatched = [t for t, a, b in zip(texts, ours, peer) if not torch.equal(a, b)]
    assert not mismatched, mismatched[:5]


def test_special_token_markup_matches_openai_convention():
    ours = tokenize(MARKUP)
    as_openclip = [
        t.replace("<|startoftext|>", "<start_of_text>").replace("<|endoftext|>", "<end_of_text>")
        for t in MARKUP
    ]
    assert torch.equal(ours, open_clip.tokenize(as_openclip))
    assert ours[0][:3].tolist() == [49406, 49406, 49407]


def test_vocabulary():
    tok = get_tokenizer()
    assert tok.vocab_size == 49408
    assert (tok.sot_token, tok.eot_token) == (49406, 49407)


def test_truncation_keeps_end_token():
    text = "red circle " * 100
    tokens = tokenize([text])[0]
    assert tokens.shape == (77,)
    assert tokens[0] == 49406 and tokens[-1] == 49407
    assert (tokens != 0).all()
    with pytest.raises(ValueError, match="too long"):
        tokenize([text], truncate=False)


def test_empty_and_mask_strings():
    empty, mask = tokenize(["", "[MASK]"])
    assert empty[:3].tolist() == [49406, 49407, 0]
    assert mask[0] == 49406 and 49407 in mask.tolist()
    assert int(mask.argmax()) == mask.tolist().index(49407)


def test_decode_round_trip():
    tok = SimpleTokenizer()
    text = "a small red circle left of a blue star, 42 times!"
    assert (
        tok.decode(tok.encode(text)).strip()
        == "a small red circle left of a blue star , 4 2 times !"
    )
