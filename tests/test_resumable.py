"""dataprep.resumable: a job killed at any byte of any write continues to exactly the uninterrupted output.

Every write the writer makes is recorded; then for every point of that sequence (each byte of each
write, the creation of each file, the final rename) the files are rebuilt as a kill -9 at that point
leaves them, the job is run again, and its output must equal the uninterrupted run's, byte for byte.
"""

import json
from pathlib import Path

import pytest

from agree.io import InputError
from dataprep import resumable
from dataprep.resumable import ResumableJsonl

SETTINGS = {"detector": "x", "threshold": 0.3}
KEYS = ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
BATCHES = [  # (units, lines): c.jpg has no line
    (2, [b'{"image": "a.jpg", "n": 1}\n', b'{"image": "b.jpg", "n": 2}\n']),
    (1, []),
    (
        2,
        [b'{"image": "d.jpg", "n": 3}\n', b'{"image": "e.jpg", "n": 4}\n', b'{"image": "e.jpg"}\n'],
    ),
]


def _job(out, settings=SETTINGS) -> ResumableJsonl:
    """Run (or continue) the job: skip the batches already done, write the others, finish."""
    w = ResumableJsonl(out, settings, KEYS)
    with w:
        if not w.finished:
            n = 0
            for units, lines in BATCHES:
                if n >= w.done:
                    w.append(lines, units)
                n += units
            w.finish()
    return w


def _recorded_run(tmp_path, monkeypatch):
    """The uninterrupted run's events: ("write", file name, bytes) and ("rename", from, to)."""
    events = []
    real_append, real_replace = resumable._append, resumable.os.replace

    def append(f, data):
        events.append(("write", f.name, data))
        real_append(f, data)

    def replace(a, b):
        events.append(("rename", str(a), str(b)))
        real_replace(a, b)

    monkeypatch.setattr(resumable, "_append", append)
    monkeypatch.setattr(resumable.os, "replace", replace)
    _job(tmp_path / "boxes.jsonl")
    monkeypatch.undo()
    return events


def _kill_points(events):
    """Every state a kill can leave: {file name: bytes} after each prefix of the event sequence."""
    files: dict = {}
    for ev in events:
        if ev[0] == "rename":
            yield dict(files)
            files[ev[2]] = files.pop(ev[1])
            continue
        _, name, data = ev
        base = files.get(name, b"")
        for j in range(len(data) + 1):
            state = dict(files)
            state[name] = base + data[:j]
            yield state
        files[name] = base + data
    yield dict(files)


def test_a_kill_at_any_byte_continues_to_the_same_output(tmp_path, monkeypatch):
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    events = _recorded_run(ref_dir, monkeypatch)
    expected = (ref_dir / "boxes.jsonl").read_bytes()
    assert expected == b"".join(line for _, lines in BATCHES for line in lines)
    states = list(_kill_points(events))
    monkeypatch.setattr(resumable.os, "fsync", lambda fd: None)  # a kill, not a power cut: no need
    assert len(states) > 200
    for k, state in enumerate(states):
        d = tmp_path / f"kill{k}"
        d.mkdir()
        for name, data in state.items():
            (d / Path(name).name).write_bytes(data)
        w = _job(d / "boxes.jsonl")
        assert w.finished and (d / "boxes.jsonl").read_bytes() == expected, (k, state)
        assert sorted(p.name for p in d.iterdir()) == ["boxes.jsonl", "boxes.jsonl.progress"]
        last = json.loads((d / "boxes.jsonl.progress").read_bytes().splitlines()[-1])
        assert last == {"finished": True, "done": 5, "bytes": len(expected)}


def test_a_finished_output_is_left_alone_and_other_settings_are_refused(tmp_path):
    out = tmp_path / "boxes.jsonl"
    _job(out)
    before = out.read_bytes(), (tmp_path / "boxes.jsonl.progress").read_bytes()
    assert _job(out).finished
    assert (out.read_bytes(), (tmp_path / "boxes.jsonl.progress").read_bytes()) == before
    with pytest.raises(InputError, match=r"other settings \(threshold: 0.3 then, 0.5 now\)"):
        _job(out, {**SETTINGS, "threshold": 0.5})


def test_files_it_did_not_write_are_never_touched(tmp_path):
    out = tmp_path / "boxes.jsonl"
    out.write_text("mine\n")
    with pytest.raises(InputError, match="boxes.jsonl.progress does not"):
        _job(out)
    assert out.read_text() == "mine\n" and not (tmp_path / "boxes.jsonl.progress").exists()
    out.unlink()
    (tmp_path / "boxes.jsonl.progress").write_text("something else\n")
    with pytest.raises(InputError, match="not a progress record of this command"):
        _job(out)
    assert (tmp_path / "boxes.jsonl.progress").read_text() == "something else\n"


def test_a_changed_input_order_is_refused(tmp_path):
    out = tmp_path / "boxes.jsonl"
    w = ResumableJsonl(out, SETTINGS, KEYS)
    w.append(BATCHES[0][1], 2)
    w.close()
    with pytest.raises(
        InputError, match="the input changed since the interrupted run: unit 2 was 'b.jpg'"
    ):
        ResumableJsonl(out, SETTINGS, ["a.jpg", "x.jpg", "c.jpg", "d.jpg", "e.jpg"])
