"""Append-only JSONL files: the one store behind every log and record file of opcd.

``metrics.jsonl`` (:class:`opcd.training.trainer.MetricsLog`), the off-policy baseline's
``teacher_responses.jsonl``, a resumable evaluation's records file and the experience
extraction's ``trace.jsonl`` are all the same thing: records appended one write at a time,
flushed and fsynced, so that a crash loses at most the record being written, and read back
tolerantly (a line torn by a crash or a full disk is skipped). Some start with a header line
``{"<kind>": 1, "settings": {...}}`` naming the settings that produced the records: a file
written with other settings is refused (:class:`HeaderMismatch`), since its records are not
the ones these settings give. Each store keeps its own error messages (what the file is and
what to do); the reading, appending, atomic rewriting and header check live here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

OnWriteError = Callable[[OSError], Exception]


class HeaderMismatch(Exception):
    """The file's first record is not this store's header, or names other settings."""

    def __init__(self, foreign: bool, changed: list[str], old: dict[str, Any]) -> None:
        super().__init__("foreign file" if foreign else f"other settings: {changed}")
        self.foreign = foreign
        """The first record is not a header of this kind (another file, or none)."""
        self.changed = changed
        """The settings whose values differ (sorted)."""
        self.old = old
        """The settings the file was written with (empty when foreign)."""


def _raise(e: OSError) -> Exception:
    return e


class JsonlFile:
    """One append-only JSONL file.

    ``what`` names it in messages; ``on_write_error`` turns an OSError of a write into the
    store's own error (default: the OSError itself). With ``kind`` the file starts with the
    header ``{kind: 1, "settings": settings}``, written by :meth:`load` into a new file.
    """

    def __init__(self, path: str | Path, *, kind: str | None = None,
                 settings: dict[str, Any] | None = None,
                 on_write_error: OnWriteError = _raise) -> None:
        self.path = Path(path)
        self.kind = kind
        self.settings = settings if settings is not None else {}
        self.on_write_error = on_write_error

    # ------------------------------------------------------------------ reading
    def lines(self) -> list[tuple[str, dict[str, Any]]]:
        """Every complete record with its line, in order; a missing file has none; blank
        lines, lines torn by a crash and lines that are not JSON objects are skipped.
        Undecodable bytes are replaced (a damaged line is then skipped, not fatal)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").split("\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append((line, rec))
        return out

    def read(self) -> list[dict[str, Any]]:
        """Every complete record (the header included, when there is one)."""
        return [rec for _, rec in self.lines()]

    def load(self) -> list[tuple[str, dict[str, Any]]]:
        """The records after the header, with their lines; a new (or empty) file gets the
        header. Raises :class:`HeaderMismatch` for a file of another kind or settings."""
        assert self.kind is not None, "load() is for files with a header"
        found = self.lines()
        if not found:
            self.rewrite([self.header()])
            return []
        first = found[0][1]
        if first.get(self.kind) != 1:
            raise HeaderMismatch(True, [], {})
        old = first.get("settings") if isinstance(first.get("settings"), dict) else {}
        settings = json.loads(json.dumps(self.settings))  # as read back: tuples are lists
        if old != settings:
            changed = sorted(k for k in {*settings, *old} if old.get(k) != settings.get(k))
            raise HeaderMismatch(False, changed, old)
        return found[1:]

    def header(self) -> dict[str, Any]:
        return {self.kind: 1, "settings": self.settings}

    def is_clean(self, kept: int) -> bool:
        """Whether the file holds exactly ``kept`` non-blank lines and ends with a newline
        (else :meth:`rewrite` it, so that the next append starts on a line of its own)."""
        if not self.path.is_file():
            return kept == 0
        text = self.path.read_text(encoding="utf-8", errors="replace")
        return len([x for x in text.split("\n") if x.strip()]) == kept and (not text or text.endswith("\n"))

    # ------------------------------------------------------------------ writing
    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append the records in one write, flushed and fsynced."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise self.on_write_error(e) from e

    def rewrite(self, records: Iterable[dict[str, Any] | str]) -> None:
        """Replace the file's content atomically by these records (dicts, or lines as read)."""
        from opcd.runtime.checkpoint import atomic_write_text

        text = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                       for r in records)
        try:
            atomic_write_text(self.path, text)
        except OSError as e:
            raise self.on_write_error(e) from e
