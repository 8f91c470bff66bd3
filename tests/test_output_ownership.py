"""No command deletes a file it did not write: prepare_data.py (with --overwrite too), make_synthetic_dataset.py
and the demo refuse, naming the folder, to replace a folder that holds a file they did not write, and the
file survives."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agree.io import InputError
from agree.layout import Layout
from agree.ownership import MARKER, OutputFolder
from dataprep.pipeline import PrepareConfig, prepare
from dataprep.staging import MANIFEST, Target, commit
from experiments.demo import OWNER as DEMO_OWNER
from experiments.demo import PRESETS, build_world, world_dir
from synth.writer import SynthConfig, SynthLayout, generate
from tests._raw_data import make_flickr30k, make_vg

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
R = 64
TINY = dict(train_images=6, val_images=3, test_images=3, pretrain_images=4, vg_per_object=2)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


# --------------------------------------------------------------------------- prepare_data.py
@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    base = tmp_path_factory.mktemp("raw")
    info = make_flickr30k(base / "raw", n_train=6, odd=False)
    heldout = [int(im.stem) for im in info["images"] if im.split != "train"]
    make_vg(base / "vg", {"flickr_id": heldout[:2]})
    return base


def _prepare_argv(raw: Path, out: Path, *extra: str) -> list[str]:
    return [
        "scripts/prepare_data.py",
        "--no-progress",
        "--raw",
        str(raw / "raw"),
        "--vg-raw",
        str(raw / "vg"),
        "--out",
        str(out),
        "--resolution",
        str(R),
        "--workers",
        "0",
        *extra,
    ]


def _prepare(raw: Path, out: Path, overwrite: bool = False):
    return prepare(
        PrepareConfig(
            "flickr30k",
            raw / "raw",
            raw / "vg",
            out,
            resolution=R,
            workers=0,
            progress=False,
            overwrite=overwrite,
            log=lambda _: None,
        )
    )


def test_overwrite_refuses_a_prepared_folder_holding_a_foreign_file(raw, tmp_path):
    out = tmp_path / "out"
    lay = _prepare(raw, out).layout
    # every file of each folder is in its record
    assert OutputFolder(lay.data_dir, "scripts/prepare_data.py").foreign() == []
    assert OutputFolder(lay.vg_dir, "scripts/prepare_data.py").foreign() == []
    for folder in (lay.data_dir, lay.vg_dir):
        (folder / "notes.txt").write_text("mine")
        before = _files(out)
        proc = _script(*_prepare_argv(raw, out, "--overwrite"))
        assert proc.returncode == 2, proc.stderr
        assert (
            f"error: {folder}: holds 1 file(s) that scripts/prepare_data.py did not write (notes.txt)"
            in (proc.stderr)
        )
        assert _files(out) == before  # nothing deleted, nothing replaced
        (folder / "notes.txt").unlink()
    # with nothing foreign in them, --overwrite rebuilds both folders (same bytes)
    before = _files(out)
    assert _script(*_prepare_argv(raw, out, "--overwrite")).returncode == 0
    assert _files(out) == before


def test_overwrite_never_replaces_a_folder_without_a_manifest(raw, tmp_path):
    out = tmp_path / "out"
    mine = out / "datasets" / "flickr30k_images" / "annotation" / "my_annotations.jsonl"
    mine.parent.mkdir(parents=True)
    mine.write_text("{}\n")
    proc = _script(*_prepare_argv(raw, out, "--overwrite"))
    assert proc.returncode == 2
    assert f"{out}/datasets/flickr30k_images exists and was not written by prepare_data.py" in (
        proc.stderr
    )
    assert "not even with --overwrite" in proc.stderr
    assert mine.read_text() == "{}\n"
    assert sorted(p.name for p in out.iterdir()) == ["datasets"]  # no VG folder, no staging left


def test_a_folder_prepared_without_a_record_is_not_replaced(raw, tmp_path):
    lay = _prepare(raw, tmp_path / "out").layout
    (lay.data_dir / MARKER).unlink()  # as an older prepare_data.py left it
    with pytest.raises(InputError, match="older prepare_data.py, which kept no record"):
        _prepare(raw, tmp_path / "out", overwrite=True)
    assert (lay.data_dir / MANIFEST).is_file() and lay.train_jsonl.is_file()


def test_commit_checks_every_target_before_moving_any(tmp_path):
    """A rebuild without --overwrite (e.g. VG/ for one more dataset) replaces only folders holding nothing else."""
    stage = tmp_path / "out" / ".stage"
    finals = [tmp_path / "out" / "VG", tmp_path / "out" / "datasets" / "x"]
    for k, final in enumerate(finals):
        staged = stage / str(k)
        staged.mkdir(parents=True)
        (staged / "new.txt").write_text("new")
        final.mkdir(parents=True)
        (final / MANIFEST).write_text(json.dumps({"format": "agree-prepare-data"}))
        OutputFolder(final, "scripts/prepare_data.py").claim(MANIFEST)
    (finals[1] / "foreign.txt").write_text("mine")
    targets = [Target(stage / str(k), f, "x") for k, f in enumerate(finals)]
    with pytest.raises(InputError, match=r"datasets/x: holds 1 file\(s\) .*\(foreign\.txt\)"):
        commit(targets, stage)
    assert (finals[1] / "foreign.txt").read_text() == "mine"
    assert not (finals[0] / "new.txt").exists()  # the first target was not replaced either


# --------------------------------------------------------------------------- make_synthetic_dataset.py
def test_synthetic_generator_replaces_only_what_it_wrote(tmp_path):
    out = tmp_path / "syn"
    generate(SynthConfig(out=out, seed=1, **TINY), progress=False)
    assert OutputFolder(out, "scripts/make_synthetic_dataset.py").foreign() == []
    lay = SynthLayout.under(out)
    # regenerating over its own files works and keeps the record exact
    generate(SynthConfig(out=out, seed=2, **{**TINY, "pretrain_images": 0}), progress=False)
    record = OutputFolder(out, "scripts/make_synthetic_dataset.py")
    assert record.foreign() == [] and not lay.pretrain_jsonl.exists()
    assert all((out / c).is_file() for c in record.claims)
    # a foreign file inside a part it would replace: refused, naming the part, before any work
    (lay.raw.raw / "notes.txt").write_text("mine")
    before = _files(out)
    proc = _script(
        "scripts/make_synthetic_dataset.py",
        "--out",
        str(out),
        "--num-train-images",
        "6",
        "--num-val-images",
        "3",
        "--num-test-images",
        "3",
        "--quiet",
    )
    assert proc.returncode == 2
    assert (
        f"error: {lay.raw.raw}: holds 1 file(s) that scripts/make_synthetic_dataset.py did not write"
        in (proc.stderr)
    )
    assert _files(out) == before


def test_synthetic_generator_refuses_a_foreign_folder_in_its_place(tmp_path):
    out = tmp_path / "tmp"
    vg = out / "VG" / "VG_images.224.npz"  # e.g. a real Visual Genome preparation
    vg.parent.mkdir(parents=True)
    vg.write_bytes(b"real data")
    with pytest.raises(InputError, match=f"{out / 'VG'}: holds 1 file"):
        generate(SynthConfig(out=out, **TINY), progress=False)
    assert vg.read_bytes() == b"real data"
    assert sorted(p.name for p in out.iterdir()) == ["VG"]


# --------------------------------------------------------------------------- the demo
def test_demo_refuses_an_output_folder_holding_a_foreign_file(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "world.json").write_text("{}")  # e.g. make_synthetic_dataset.py --out tmp/demo
    proc = _script("scripts/demo.py", "--out", str(out), "--cache", str(tmp_path / "cache"))
    assert proc.returncode == 2
    assert f"error: {out}: holds 1 file(s) that scripts/demo.py did not write (world.json)" in (
        proc.stderr
    )
    assert sorted(p.name for p in out.iterdir()) == ["world.json"]
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_demo_cache_keeps_a_foreign_folder_where_its_world_goes(tmp_path):
    recipe = PRESETS["quick"]
    target = world_dir(tmp_path / "cache", recipe)
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="did not record writing; it is not replaced"):
        build_world(tmp_path / "cache", recipe)
    assert (target / "keep.txt").read_text() == "mine"
    assert DEMO_OWNER == "scripts/demo.py"


def test_layout_under_a_synthetic_root_is_a_prepare_data_layout(tmp_path):
    """The synthetic dataset's folders carry prepare_data's records too (it is built by prepare_data)."""
    out = tmp_path / "syn"
    generate(SynthConfig(out=out, seed=3, **TINY), progress=False)
    lay = Layout.under(out)
    assert OutputFolder(lay.data_dir, "scripts/prepare_data.py").foreign() == []
    shutil.rmtree(out)
