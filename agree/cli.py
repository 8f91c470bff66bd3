"""Command-line conventions shared by every entry script: help that states each default once, names of
the model configs, hidden aliases for renamed flags.

Every entry script builds its flags in a module-level `build_parser()` with `formatter_class=HelpFormatter`
(tests/test_cli_flags.py checks every script: each flag has help, states its default once, and the
flags a run cannot do without are marked required).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "clip" / "model_configs"
# how a help text states its default: "default: X", "Default: X" or "(default X)"
STATES_DEFAULT = re.compile(r"\bdefault\s*:|\(default\b", re.IGNORECASE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; appends "(default: X)" to a flag's help unless the help
    already says its default, the flag is required, or it has no default to state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            STATES_DEFAULT.search(text)
            or action.required
            or not action.option_strings
            or action.default in (None, False, "", argparse.SUPPRESS)
            or isinstance(action.default, (list, tuple))
            and not action.default
        ):
            return text
        return f"{text} (default: %(default)s)"


def model_names() -> list[str]:
    """The model configs every --model accepts (clip/model_configs; '/' spellings too, e.g. ViT-L/14),
    read without importing clip (and so torch)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_help(what: str = "model config") -> str:
    """Help text listing the configs: OpenAI's (QuickGELU) and OpenCLIP's GELU variants."""
    names = model_names()
    quick = [n for n in names if not n.endswith("-gelu")]
    gelu = [n for n in names if n.endswith("-gelu")]
    return (
        f"{what}: {', '.join(quick)} (OpenAI's architectures, QuickGELU; '/' spellings such as "
        f"ViT-L/14 too) or {', '.join(gelu)} (OpenCLIP's GELU models)"
    )


def add_hidden_alias(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, alias: str, dest: str, **kwargs
) -> None:
    """`alias` sets `dest` like the flag that replaced it, without showing in --help (old names keep
    working)."""
    parser.add_argument(
        alias, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs
    )
