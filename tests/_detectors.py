"""Tiny randomly initialised open-vocabulary detectors, saved with save_pretrained into a folder (nothing is
downloaded): Grounding DINO (a 4-stage Swin of width 8, a one-layer BERT of width 16, d_model 32, 12
queries) and OWLv2 (one-layer ViT and text transformer of width 16), each with its processor. The
tokenizers are built from vocabularies written here: a BERT WordPiece vocabulary that keeps BERT's
ids for [CLS], [SEP], "." and "?" (Grounding DINO finds its phrase separators by those ids) and a
CLIP byte-level BPE vocabulary.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

WORDS = (
    "a an the two of with and at is near plays stands outside young smiling picture "
    "man woman dog ball shirt car tree hat somebody each other"
).split()


def tiny_grounding_dino(folder: Path, seed: int = 0) -> Path:
    """Write a tiny Grounding DINO and its processor to `folder`."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 1012 - len(vocab) + 99)]
    vocab += ["."] + [f"[unused{i}]" for i in range(1012, 1028)] + ["?"]
    assert (vocab.index("[CLS]"), vocab.index("[SEP]"), vocab.index("."), vocab.index("?")) == (
        101,
        102,
        1012,
        1029,
    )
    chars = [
        c for c in string.punctuation + string.digits + string.ascii_lowercase if c not in ".?"
    ]
    vocab += chars + ["##" + c for c in string.ascii_lowercase + string.digits + "'"]
    vocab += [w for w in WORDS if w not in vocab]
    tok_dir = folder / "_tokenizer"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(tok_dir, do_lower_case=True)
    swin = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_indices=[2, 3, 4],
    )
    bert = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=swin,
        text_config=bert,
        d_model=32,  # GroupNorm(32, d_model)
        encoder_layers=1,
        decoder_layers=2,  # the tied box heads need more than one decoder layer
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=12,
        max_text_len=64,
        encoder_n_points=1,
        decoder_n_points=1,
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(
            size={"shortest_edge": 96, "longest_edge": 128}
        ),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_owlv2(folder: Path, seed: int = 0) -> Path:
    """Write a tiny OWLv2 and its processor to `folder`."""
    import torch
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab, merges = base + [c + "</w>" for c in base], []
    for w in WORDS:  # each word merged letter by letter
        if len(w) < 2:
            continue
        cur = w[0]
        for ch in w[1:-1]:
            merges.append(f"{cur} {ch}")
            cur += ch
            vocab.append(cur)
        merges.append(f"{cur} {w[-1]}</w>")
        vocab.append(w + "</w>")
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    tok_dir = folder / "_tokenizer"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
    config = Owlv2Config(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=len(vocab) - 2,
            eos_token_id=len(vocab) - 1,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return folder
