"""Output folders: a command deletes only what it recorded as written, and refuses folders holding anything else."""

import pytest

from agree.io import InputError
from agree.ownership import MARKER, OutputFolder


def test_replace_deletes_only_claimed_paths(tmp_path):
    out = OutputFolder(tmp_path / "out", "demo")
    out.replace()
    out.claim("results.md")
    out.claim(out.path / "runs" / "a", folder=True)
    (out.path / "results.md").write_text("r")
    (out.path / "runs" / "a").mkdir(parents=True)
    (out.path / "runs" / "a" / "log.txt").write_text("l")
    assert out.foreign() == []
    again = OutputFolder(tmp_path / "out", "demo")
    again.replace()
    assert sorted(p.name for p in again.path.iterdir()) == [MARKER]
    assert again.claims == []


def test_foreign_file_is_refused_and_survives(tmp_path):
    out = OutputFolder(tmp_path / "out", "demo")
    out.replace()
    out.claim("results.md")
    (out.path / "results.md").write_text("r")
    (out.path / "notes.txt").write_text("mine")
    with pytest.raises(
        InputError, match=r"out: holds 1 file\(s\) that demo did not write \(notes\.txt\)"
    ):
        OutputFolder(tmp_path / "out", "demo").replace()
    assert (out.path / "notes.txt").read_text() == "mine"
    assert (out.path / "results.md").is_file()


def test_folder_without_record_is_foreign(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "world.json").write_text("{}")
    with pytest.raises(InputError, match="world.json"):
        OutputFolder(tmp_path / "data", "demo").replace()
    assert (tmp_path / "data" / "world.json").is_file()


def test_remove_owned_keeps_foreign_files_and_kept_claims(tmp_path):
    out = OutputFolder(tmp_path / "out", "tables")
    out.claim("logs/a.log", "results.md")
    (out.path / "logs").mkdir()
    (out.path / "logs" / "a.log").write_text("x")
    (out.path / "logs" / "user.txt").write_text("y")
    (out.path / "results.md").write_text("z")
    removed = out.remove_owned(keep=["results.md"])
    assert removed == ["logs/a.log"]
    assert (out.path / "logs" / "user.txt").is_file() and (out.path / "results.md").is_file()
    assert out.foreign() == ["logs/user.txt"]


def test_another_owner_is_refused(tmp_path):
    OutputFolder(tmp_path / "out", "demo").replace()
    with pytest.raises(InputError, match="written by 'demo'"):
        OutputFolder(tmp_path / "out", "tables").claim("x")


def test_claims_outside_the_folder_are_rejected(tmp_path):
    out = OutputFolder(tmp_path / "out", "demo")
    with pytest.raises(ValueError, match="not a path inside"):
        out.claim(tmp_path / "elsewhere.txt")
    with pytest.raises(ValueError, match="not a path inside"):
        out.claim("../x")


def test_empty_foreign_folder_counts(tmp_path):
    out = OutputFolder(tmp_path / "out", "demo")
    out.replace()
    (out.path / "empty").mkdir()
    assert out.foreign() == ["empty/"]


def test_foreign_under_a_sub_folder_and_forget(tmp_path):
    out = OutputFolder(tmp_path / "out", "gen")
    out.claim("raw/a.jpg", "raw/b.jpg", "VG/x.npz")
    for rel in ("raw/a.jpg", "raw/b.jpg", "VG/x.npz", "VG/user.txt", "other/y"):
        (out.path / rel).parent.mkdir(parents=True, exist_ok=True)
        (out.path / rel).write_text(rel)
    assert out.foreign(under="raw") == []
    assert out.foreign(under="VG") == ["VG/user.txt"]
    assert out.foreign(under="missing") == []
    with pytest.raises(InputError, match=r"out/VG: holds 1 file\(s\) that gen did not write"):
        out.check_no_foreign(under="VG")
    out.forget("raw/b.jpg", "never/claimed")
    assert OutputFolder(tmp_path / "out", "gen").claims == ["VG/x.npz", "raw/a.jpg"]  # sorted
    assert out.foreign(under="raw") == ["raw/b.jpg"]


def test_scratch_folder_is_claimed_whole_and_a_foreign_one_refused(tmp_path):
    out = OutputFolder(tmp_path / "work", "bench")
    files = out.scratch("files")
    (files / "big.npy").write_text("x")
    (out.path / "mine.txt").write_text("user")
    assert OutputFolder(tmp_path / "work", "bench").owns("files/big.npy")
    assert OutputFolder(tmp_path / "work", "bench").remove_owned() == ["files/"]
    assert sorted(p.name for p in out.path.iterdir()) == [MARKER, "mine.txt"]
    (out.path / "files").mkdir()
    (out.path / "files" / "theirs.txt").write_text("t")
    with pytest.raises(InputError, match="work/files: exists and was not written by bench"):
        OutputFolder(tmp_path / "work", "bench").scratch("files")
    assert (out.path / "files" / "theirs.txt").is_file()


def test_benchmark_workdir_keeps_what_the_benchmark_did_not_write(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    argv = [sys.executable, "scripts/bench_retrieval.py", "--items", "2000", "--queries", "300"]
    argv += ["--dim", "8", "--methods", "numpy", "--workdir", str(work)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in work.iterdir()) == [MARKER, "notes.txt"]
