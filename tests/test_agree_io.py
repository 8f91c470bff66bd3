"""Shared I/O: located JSONL errors, atomic outputs, CLI error reporting."""

import subprocess
import sys

import pytest

from agree.io import InputError, atomic_write, iter_jsonl, read_jsonl, write_jsonl


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"x": 1}\n\n   \n{"x": 2}\n')
    assert [(n, r["x"]) for n, r in iter_jsonl(path)] == [(1, 1), (4, 2)]


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"x": 1}\n{"x": \n', r"a.jsonl:2: malformed JSON"),
        ('{"x": 1}\n[1, 2]\n', r"a.jsonl:2: expected a JSON object, got list"),
        ('{"x": 1}\n{"y": 2}\n', r"a.jsonl:2: missing key 'x'"),
        ("\n\n", r"a.jsonl: file is empty"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "a.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_jsonl(path, required=["x"])


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="input file not found: .*nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_atomic_write_leaves_old_file_and_no_temp_on_failure(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"a": 1}])
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert path.read_text() == '{"a":1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_run_cli_reports_input_errors_without_traceback(tmp_path):
    code = (
        "from agree.io import InputError, run_cli\n"
        "def main():\n    raise InputError('data.jsonl:3: missing key \\'caption\\'')\n"
        "run_cli(main)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: data.jsonl:3: missing key 'caption'"
