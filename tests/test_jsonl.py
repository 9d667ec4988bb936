"""opcd.runtime.jsonl: the one append-only JSONL store (torn lines, headers, write errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opcd.runtime.jsonl import HeaderMismatch, JsonlFile


def test_torn_and_foreign_lines_are_skipped(tmp_path: Path) -> None:
    f = JsonlFile(tmp_path / "a.jsonl")
    assert f.read() == [] and f.is_clean(0)
    f.append([{"step": 1}, {"step": 2, "text": "é"}])
    with f.path.open("a") as h:
        h.write('[1, 2]\n\n{"step": 3, "lo')  # not an object, a blank line, a torn record
    assert f.read() == [{"step": 1}, {"step": 2, "text": "é"}]
    assert not f.is_clean(2)
    f.rewrite([line for line, _ in f.lines()])
    assert f.is_clean(2) and f.path.read_text().endswith("\n")
    f.path.write_bytes(f.path.read_bytes() + b'{"x": "\xff"}\n')  # undecodable: replaced, kept
    assert len(f.read()) == 3


def test_header_is_written_then_checked(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    f = JsonlFile(path, kind="opcd_test", settings={"k": 4, "t": (1, 2)})
    assert f.load() == []
    assert json.loads(path.read_text()) == {"opcd_test": 1, "settings": {"k": 4, "t": [1, 2]}}
    f.append([{"id": "a"}])
    assert [rec for _, rec in f.load()] == [{"id": "a"}]  # tuples compare as read back
    with pytest.raises(HeaderMismatch) as e:
        JsonlFile(path, kind="opcd_test", settings={"k": 8, "t": (1, 2), "new": 1}).load()
    assert not e.value.foreign and e.value.changed == ["k", "new"] and e.value.old["k"] == 4
    with pytest.raises(HeaderMismatch) as e:
        JsonlFile(path, kind="opcd_other").load()
    assert e.value.foreign


def test_write_errors_become_the_stores_own(tmp_path: Path) -> None:
    class Full(Exception):
        pass

    f = JsonlFile(tmp_path / "missing-folder" / "a.jsonl", on_write_error=lambda e: Full(str(e)))
    with pytest.raises(Full):
        f.append([{"a": 1}])
    with pytest.raises(Full):
        f.rewrite([{"a": 1}])
