"""The manual cannot go stale: every shell block of README.md and docs/*.md is run on synthetic data with a
tiny model, or marked as needing what the CPU cannot give (real data, GPUs, the network); every script a
block names exists and every flag it passes is one of that script's flags; every flag the manual names
in backticks exists in some script of the project (or is another tool's, listed below).

A block is marked by an HTML comment on the line above its opening fence:

    <!-- doc-test: run -->                  run by test_run_blocks (after the substitutions below)
    <!-- doc-test: skip: <why> -->          not run; its scripts and flags are still checked
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*doc-test:\s*(run|skip:\s*(?P<why>.+?))\s*-->")
FENCE = re.compile(r"^\s*```(\w*)\s*$")
SHELLS = {"bash", "sh", "shell"}
# a flag in prose: not a prefix such as `--lock-*-unlocked-groups`
FLAG_IN_TEXT = re.compile(r"(?<![\w-])(--[a-zA-Z](?:[\w-]*\w)?)(?![\w*-])")

# Flags of other programs that the manual names (torchrun's rendezvous, pip, pytest, shell tools), and
# flags of the released code that the manual names only to say what they did there.
OTHER_TOOLS = {
    "--nproc_per_node",
    "--nnodes",
    "--node_rank",
    "--master_addr",
    "--master_port",
    "--rdzv_backend",
    "--rdzv_endpoint",
    "--rdzv_id",
    "--standalone",
    "--logs-specs",
    "--check",  # ruff format --check
}
RELEASE_ONLY = {
    "--dp",  # the release's DataParallel switch (differences.md)
    "--train-img",  # parsed and unused by the release (differences.md)
    "--val-img",
}


@dataclass
class Block:
    page: Path
    line: int  # line of the opening fence, 1-based
    lang: str
    text: str
    mode: str | None  # "run", "skip" or None (unmarked)
    why: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page with their markers."""
    lines = page.read_text(encoding="utf-8").split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            j = i + 1
            while j < len(lines) and not FENCE.match(lines[j]):
                j += 1
            prev = lines[i - 1] if i else ""
            mk = MARKER.search(prev)
            mode = None if mk is None else ("run" if mk.group(1) == "run" else "skip")
            why = (mk.group("why") or "") if mk else ""
            out.append(Block(page, i + 1, m.group(1), "\n".join(lines[i + 1 : j]), mode, why))
            i = j + 1
        else:
            i += 1
    return out


def shell_blocks() -> list[Block]:
    return [b for p in PAGES for b in blocks(p) if b.lang in SHELLS]


# --------------------------------------------------------------------------- scripts and flags
@lru_cache(maxsize=None)
def script_flags(script: str) -> frozenset[str]:
    """The long options a project script's --help lists."""
    path = ROOT / script
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert res.returncode == 0, f"{script} --help failed:\n{res.stderr[-2000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--[a-zA-Z][\w-]*)", res.stdout))


def project_scripts() -> list[str]:
    """Every entry script of the project (python files with a command line)."""
    found = []
    for folder in ("training", "eval", "scripts"):
        for p in sorted((ROOT / folder).glob("*.py")):
            if "__main__" in p.read_text(encoding="utf-8"):
                found.append(f"{folder}/{p.name}")
    return found


def commands(text: str) -> list[list[str]]:
    """The simple commands of a shell block, tokenised (comments and line continuations removed)."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.split("\n"):
        line = re.sub(r"(^|\s)#.*$", "", line)
        for part in re.split(r"&&|\|\||;|\|", line):
            try:
                toks = shlex.split(part)
            except ValueError:
                toks = part.split()
            if toks:
                out.append(toks)
    return out


def script_calls(text: str) -> list[tuple[str, list[str]]]:
    """(script path, the flags after it) for every project script a block runs."""
    calls = []
    for toks in commands(text):
        for k, tok in enumerate(toks):
            if re.fullmatch(r"[\w./+-]+\.(py|sh)", tok) and not tok.startswith("-"):
                rel = tok[2:] if tok.startswith("./") else tok
                flags = [t.split("=", 1)[0] for t in toks[k + 1 :] if re.match(r"--[a-zA-Z]", t)]
                calls.append((rel, flags))
                break
    return calls


def test_every_shell_block_is_marked():
    unmarked = [b.where for b in shell_blocks() if b.mode is None]
    assert not unmarked, f"shell blocks without a <!-- doc-test: ... --> marker: {unmarked}"
    for b in shell_blocks():
        assert b.mode == "run" or b.why.strip(), f"{b.where}: a skipped block must say why"


def test_documented_scripts_and_flags_exist():
    calls = [(b, s, f) for b in shell_blocks() for s, f in script_calls(b.text)]
    assert calls, "no script call found in the manual"
    scripts = sorted({s for _, s, _ in calls if s.endswith(".py")})
    missing = [f"{b.where}: {s}" for b, s, _ in calls if not (ROOT / s).is_file()]
    assert not missing, f"the manual runs scripts that do not exist: {missing}"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(script_flags, scripts))
    bad = [
        f"{b.where}: {s} {f}"
        for b, s, flags in calls
        if s.endswith(".py")
        for f in flags
        if f not in script_flags(s)
    ]
    assert not bad, f"the manual passes flags its scripts do not have: {bad}"


def test_flags_named_in_the_manual_exist():
    """Every `--flag` in backticks anywhere in the manual is a flag of some project script."""
    known = set(OTHER_TOOLS | RELEASE_ONLY)
    with ThreadPoolExecutor(4) as pool:
        for flags in pool.map(script_flags, project_scripts()):
            known |= flags
    bad = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for span in re.findall(r"`([^`\n]+)`", text):
            for flag in FLAG_IN_TEXT.findall(span):
                if flag not in known:
                    bad.append(f"{page.relative_to(ROOT)}: {flag}")
    assert not bad, f"the manual names flags that no script has: {sorted(set(bad))}"


# --------------------------------------------------------------------------- running the blocks
@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    """A synthetic dataset in the release layout and a tiny pre-trained checkpoint."""
    import torch

    from clip.clip import create_model

    root = tmp_path_factory.mktemp("docs")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "make_synthetic_dataset.py"),
            "--out",
            str(root / "synthetic"),
            "--num-train-images=16",
            "--num-val-images=8",
            "--num-test-images=24",
            "--num-pretrain-images=0",
            "--vg-per-object=3",
        ],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(create_model("tiny").state_dict(), root / "models" / "tiny.pt")
    return root


def substitute(text: str, root: Path) -> str:
    """The data folder, the checkpoint and the sizes of a real run -> the synthetic data and tiny model."""
    data = root / "synthetic" / "datasets" / "flickr30k_images"
    subs = [
        (r"\./tmp/datasets/flickr30k_images", str(data)),
        (r"\./tmp/pretrained_models", str(root / "models")),
        (r"\./tmp/predictions", str(root / "predictions")),
        (r"ViT-L-14\.pt", "tiny.pt"),
        (r"--model ViT-L[/-]14", "--model tiny"),
        (r"--epochs=50", "--epochs=2"),
        (r'experiment_name="\./logs/[^"]*"', f'experiment_name="{root}/logs/docrun"'),
        (
            r"--openai-pretrained(?=\s*$)",
            f"--openai-pretrained --pretrained-path={root}/models/tiny.pt "
            f"--logs={root}/logs --name=docrun",
        ),
    ]
    for pattern, repl in subs:
        text = re.sub(pattern, repl, text, flags=re.M)
    return text


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if any(b.mode == "run" for b in blocks(p) if b.lang in SHELLS)],
    ids=lambda p: p.name,
)
def test_run_blocks(page, docroot):
    """A page's runnable blocks, in order, in one shell, on the synthetic data: they succeed."""
    script = "\n".join(
        substitute(b.text, docroot) for b in blocks(page) if b.lang in SHELLS and b.mode == "run"
    )
    work = docroot / f"run-{page.stem}"
    work.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, (
        f"{page.name} blocks failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    for out in (docroot / "predictions").rglob("*output*.json"):
        assert '"success": true' in out.read_text().replace('"success":true', '"success": true'), (
            out
        )
