"""``benchmarks/_results.py``: each benchmark rewrites its own section of RESULTS.md and nothing else.

No benchmark runs here: the helper is fed tables by hand.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pytest
from _benchmarks import load_benchmark

results = load_benchmark("_results")

WHEN = datetime.datetime(2024, 5, 6, 7, 8, tzinfo=datetime.timezone.utc)


def _record(path: Path, name: str, table: str, command: str = "python benchmarks/x.py") -> None:
    results.record(name, command, table, path, when=WHEN, where="Test CPU, 2 logical cores; torch 0.0")


def test_a_section_is_replaced_and_the_others_kept(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro kept\n")
    _record(path, "alpha", "| a |\n|---|\n| 1 |")
    _record(path, "beta", "| b |\n|---|\n| 2 |")
    before = path.read_text()
    _record(path, "alpha", "| a |\n|---|\n| 3 |", "python benchmarks/alpha.py --fast")
    text = path.read_text()
    assert "| 3 |" in text and "| 1 |" not in text
    assert text.count("<!-- bench:alpha -->") == 1 and text.count("<!-- /bench:alpha -->") == 1
    assert text.startswith("# Results\n\nintro kept\n")
    beta = before[before.index("<!-- bench:beta -->") :]
    assert text.endswith(beta)  # beta's section, byte for byte
    assert text.index("bench:alpha") < text.index("bench:beta")  # replaced in place, not moved


def test_a_new_section_is_appended(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n<!-- bench:alpha -->\nold\n<!-- /bench:alpha -->\n\n## Older figures\n\nkept\n")
    _record(path, "gamma", "| g |\n|---|\n| 7 |")
    text = path.read_text()
    assert text.index("## Older figures") < text.index("<!-- bench:gamma -->")
    assert "<!-- bench:alpha -->\nold\n<!-- /bench:alpha -->" in text
    assert text.rstrip().endswith("<!-- /bench:gamma -->")


def test_a_missing_file_gets_the_header(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    _record(path, "alpha", "| a |\n|---|\n| 1 |")
    assert path.read_text().startswith(results.HEADER)


def test_the_stamp_has_date_machine_and_command(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    _record(path, "alpha", "| a |\n|---|\n| 1 |", "python benchmarks/alpha.py --steps 10")
    text = path.read_text()
    assert "- date: 2024-05-06 07:08 UTC" in text
    assert "- machine: Test CPU, 2 logical cores; torch 0.0" in text
    assert "- command: `python benchmarks/alpha.py --steps 10`" in text


def test_the_default_stamp_describes_this_machine() -> None:
    where = results.machine()
    assert results.cpu_model() in where and "logical cores" in where and "torch " in where and "CUDA device:" in where
    assert results.command_line(["benchmarks/x.py", "--only", "a b"]) == "python benchmarks/x.py --only 'a b'"


def test_a_name_that_prefixes_another_is_its_own_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    _record(path, "cost", "| a |\n|---|\n| 1 |")
    _record(path, "cost_extra", "| b |\n|---|\n| 2 |")
    _record(path, "cost", "| a |\n|---|\n| 5 |")
    text = path.read_text()
    assert "| 5 |" in text and "| 2 |" in text and text.count("<!-- bench:") == 2


def test_table_as_text_and_markdown() -> None:
    table = results.Table("Title", ["model", "ms"], [["vgg", "12.5"], ["a|b", "3.0"]], ["a note"])
    assert table.markdown().splitlines() == [
        "**Title**",
        "",
        "| model | ms |",
        "|:---|---:|",
        "| vgg | 12.5 |",
        "| a\\|b | 3.0 |",
        "",
        "a note",
    ]
    assert table.text().splitlines() == ["Title", "model    ms", "vgg    12.5", "a|b     3.0", "a note"]


@pytest.mark.parametrize("no_record", [True, False])
def test_finish_writes_unless_told_not_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_record: bool) -> None:
    monkeypatch.setattr(results, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(results, "machine", lambda: "Test CPU")
    monkeypatch.setattr(sys, "argv", ["benchmarks/alpha.py", "--quick"])
    results.finish("alpha", [results.Table("", ["a"], [["1"]])], no_record)
    assert (tmp_path / "RESULTS.md").exists() is not no_record
    if not no_record:
        assert "- command: `python benchmarks/alpha.py --quick`" in (tmp_path / "RESULTS.md").read_text()
