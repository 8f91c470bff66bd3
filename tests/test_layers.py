"""The import layers: clip (a leaf) < agree (shared plumbing) < the stages < synth < experiments < scripts.

synth (the synthetic world) sits above the stages: it writes raw downloads and builds its layout with
dataprep's pipeline, as a user would.

An import may go down the layers or stay inside its own package, never up and never sideways between
the stages, so each stage can be read (and changed) on its own. The test reads every module's import
statements; it fails with the importing file, the line and the layers involved.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "clip": 0,
    "agree": 1,
    "training": 2,
    "eval": 2,
    "dataprep": 2,
    "synth": 3,
    "experiments": 4,
    "scripts": 5,
}
THIRD_PARTY_OF_CLIP = {"torch", "torchvision", "numpy", "PIL", "ftfy", "regex"}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def _modules():
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def test_no_import_climbs_a_layer_or_crosses_between_stages():
    bad = []
    for package, path in _modules():
        for line, top in _imports(path):
            if top not in LAYERS or top == package:
                continue
            if LAYERS[top] > LAYERS[package] or (LAYERS[top] == LAYERS[package]):
                bad.append(
                    f"{path.relative_to(ROOT)}:{line}: {package} (layer {LAYERS[package]}) imports "
                    f"{top} (layer {LAYERS[top]})"
                )
    assert not bad, "\n".join(bad)


def test_clip_needs_only_the_standard_library_and_its_own_dependencies():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    bad = [
        f"{path.relative_to(ROOT)}:{line}: imports {top}"
        for package, path in _modules()
        if package == "clip"
        for line, top in _imports(path)
        if top not in stdlib | THIRD_PARTY_OF_CLIP | {"clip"}
    ]
    assert not bad, "\n".join(bad)


def test_every_library_package_is_installed_by_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = set(config["tool"]["setuptools"]["packages"])
    on_disk = {p for p in LAYERS if (ROOT / p / "__init__.py").is_file()}
    assert packages == on_disk


def test_scripts_do_not_edit_the_import_path():
    bad = [f"{path.relative_to(ROOT)}" for _, path in _modules() if "sys.path" in path.read_text()]
    assert not bad, "scripts must import the installed package, not edit sys.path: " + ", ".join(
        bad
    )


def test_the_checker_sees_an_upward_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("import os\nfrom experiments.tables import TableRunner\nimport clip.model\n")
    assert [(line, top) for line, top in _imports(module)] == [
        (1, "os"),
        (2, "experiments"),
        (3, "clip"),
    ]
