"""One name per flag, help that says what each flag does and its default once, required flags marked.

Every entry script (training/main_all.py, eval/*.py, scripts/*.py with a command line) exposes
`build_parser()`; this test reads every flag of every script from it."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from _scripts import load_script

from agree.cli import STATES_DEFAULT

ROOT = Path(__file__).resolve().parents[1]


def entry_scripts() -> list[str]:
    found = []
    for folder in ("training", "eval", "scripts"):
        for p in sorted((ROOT / folder).glob("*.py")):
            if "__main__" in p.read_text(encoding="utf-8"):
                found.append(f"{folder}/{p.name}")
    return found


def parser_of(script: str) -> argparse.ArgumentParser:
    module = load_script(script)
    if script == "training/main_all.py":
        from training.params import build_parser

        return build_parser()
    assert hasattr(module, "build_parser"), f"{script} has no build_parser()"
    return module.build_parser()


def visible_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.option_strings
        and a.help != argparse.SUPPRESS
        and not isinstance(a, argparse._HelpAction)
    ]


def rendered_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action) if action.help else ""


@pytest.mark.parametrize("script", entry_scripts())
def test_every_flag_has_help_with_its_default_once(script):
    parser = parser_of(script)
    for action in visible_flags(parser):
        flag = "/".join(action.option_strings)
        text = rendered_help(parser, action)
        assert action.help and len(action.help) > 3, f"{script} {flag}: no help text"
        n = len(STATES_DEFAULT.findall(text))
        assert n <= 1, f"{script} {flag}: the default is stated {n} times: {text!r}"
        meaningful = action.default not in (None, False, "", argparse.SUPPRESS, (), [])
        if meaningful and not action.required:
            assert n == 1, f"{script} {flag}: default {action.default!r} not stated: {text!r}"


# flags without which a script cannot run: argparse must mark them required (shown without [...])
REQUIRED = {
    "training/main_all.py": ["--train-data"],
    "eval/extract_features.py": ["--resume"],
    "eval/extract_features_zs_mask+prompt.py": ["--resume"],
    "eval/make_topk_predictions.py": [
        "--image-feats",
        "--text-feats",
        "--output-images",
        "--output-texts",
    ],
    "scripts/prepare_data.py": ["--raw", "--out"],
    "scripts/make_synthetic_dataset.py": ["--out"],
    "scripts/ground_entities.py": ["--dataset", "--raw", "--detector-path", "--out"],
}


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_required_flags_are_marked(script):
    parser = parser_of(script)
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    for flag in REQUIRED[script]:
        assert by_flag[flag].required, f"{script} {flag} is needed but not marked required"


# one concept, one flag: the name every script uses, and the other names it accepts
SAME_FLAG = {
    "--pretrained": [
        "training/main_all.py",
        "eval/extract_features_zs_mask+prompt.py",
        "scripts/reproduce_tables.py",
    ],
    "--eval-batch-size": [
        "training/main_all.py",
        "eval/extract_features.py",
        "eval/extract_features_zs_mask+prompt.py",
        "eval/make_topk_predictions.py",
        "eval/make_topk_predictions_mask+prompt.py",
        "scripts/reproduce_tables.py",
    ],
    "--lock-image": ["training/main_all.py", "scripts/demo.py"],
    "--num-train-images": ["scripts/demo.py", "scripts/make_synthetic_dataset.py"],
    "--model": [
        "training/main_all.py",
        "eval/extract_features.py",
        "eval/extract_features_zs_mask+prompt.py",
        "scripts/reproduce_tables.py",
    ],
}


@pytest.mark.parametrize("flag", sorted(SAME_FLAG))
def test_one_concept_has_one_flag_everywhere(flag):
    kinds = set()
    for script in SAME_FLAG[flag]:
        by_flag = {s: a for a in parser_of(script)._actions for s in a.option_strings}
        assert flag in by_flag, f"{script} lacks {flag}"
        kinds.add(type(by_flag[flag]).__name__)
    assert len(kinds) == 1, f"{flag} is a different kind of flag in different scripts: {kinds}"


def test_train_images_is_a_path_in_training_only():
    """--train-images names an archive (main_all.py); image counts are --num-*-images."""
    for script in ("scripts/demo.py", "scripts/make_synthetic_dataset.py"):
        shown = {s for a in visible_flags(parser_of(script)) for s in a.option_strings}
        assert "--train-images" not in shown and "--num-train-images" in shown


def test_openclip_names_are_accepted():
    from training.params import parse_args

    a = parse_args(["--train-data", "t.jsonl", "--lock-text", "--lock-text-unlocked-layers", "2"])
    assert a.lock_text_unlocked_groups == 2
    b = parse_args(["--train-data", "t.jsonl", "--pretrained", "w.pt", "--batch-size-eval", "4"])
    assert b.openai_pretrained and b.pretrained_path == "w.pt" and b.eval_batch_size == 4


def test_model_help_lists_every_config():
    from agree.cli import model_names

    names = model_names()
    assert "tiny-rn" in names and "ViT-L-14" in names
    for script in (
        "training/main_all.py",
        "scripts/reproduce_tables.py",
        "eval/extract_features.py",
    ):
        by_flag = {s: a for a in parser_of(script)._actions for s in a.option_strings}
        text = by_flag["--model"].help
        assert all(n in text for n in names), f"{script} --model help misses configs"
