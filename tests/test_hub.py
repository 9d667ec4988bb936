"""``opcd.tools.hub``: the model card made from a run folder, pushing with a stand-in for
``huggingface_hub.HfApi`` (never the network), ``run.push_to_hub`` and ``opcd push``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_trainer import tiny_config

from opcd.cli import main
from opcd.config import config_from_dict
from opcd.errors import ConfigError, HubError, RunFolderError
from opcd.tasks.system_prompt import FRENCH_SYSTEM_PROMPT
from opcd.tools import hub
from opcd.training.loop import train

EVALS = [  # as a real french run writes them: the in-context reference first
    {"type": "eval", "step": 0, "score": 0.9166666666666666, "stderr": 0.057630339567343716, "n": 24,
     "with_context": True, "quality": 0.028813182143494487, "quality_stderr": 0.08018609632224308},
    {"type": "eval", "step": 0, "score": 0.0, "stderr": 0.0, "n": 24, "with_context": False,
     "quality": 0.0032483567483723164, "quality_stderr": 0.07924299958034109},
    {"type": "train", "step": 1, "loss": 0.287, "grad_norm": 0.97, "skipped": False},
    {"type": "eval", "step": 4, "score": 0.625, "stderr": 0.10094660663590603, "n": 24,
     "with_context": False, "quality": -0.6117024635896087, "quality_stderr": 0.1051680319351959},
    {"type": "eval", "step": 8, "score": 1.0, "stderr": 0.0, "n": 24, "with_context": False,
     "quality": -0.03482441398470352, "quality_stderr": 0.09837637920229388},
]
SETTINGS = {
    "model": "qwen2.5-coder-0.5b-instruct",
    "task": {"name": "french"},
    "loss": {"objective": "forward_kl", "top_k": 256},
    "train": {"steps": 8, "batch_size": 8, "lr": 4e-4},
    "lora": {"enabled": True, "r": 16},
}


def make_run(root: Path, *, metrics: list[dict[str, Any]] | None = EVALS, final: bool = True,
             **sections: Any) -> Path:
    """A run folder as `opcd train` leaves it: config.yaml, metrics.jsonl, final/."""
    run = root / "run"
    run.mkdir(parents=True)
    data = {**SETTINGS, **sections}
    cfg = config_from_dict(data)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    if metrics is not None:
        lines = [json.dumps(r) for r in metrics] + ["{not json"]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if final:
        (run / "final").mkdir()
        (run / "final" / "model.safetensors").write_bytes(b"weights" * 10)
        (run / "final" / "config.json").write_text("{}", encoding="utf-8")
    return run


def front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


class FakeApi:
    """Records what an ``HfApi`` would be asked; ``fail`` makes a call raise."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.uploaded: list[str] = []

    def create_repo(self, *args: Any, **kw: Any) -> str:
        self.calls.append(("create_repo", args, kw))
        if self.fail == "create_repo":
            raise OSError("Token is required (`token=True`), but no token found.")
        return f"https://huggingface.co/{args[0]}"

    def upload_folder(self, *args: Any, **kw: Any) -> None:
        self.calls.append(("upload_folder", args, kw))
        if self.fail == "upload_folder":
            raise ConnectionError("[Errno -3] Temporary failure in name resolution")
        self.uploaded = sorted(p.name for p in Path(kw["folder_path"]).iterdir())


# --------------------------------------------------------------------------- the card
def test_model_card_figures_and_front_matter(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    card = hub.model_card(run, "alice/qwen-french")
    assert front_matter(card) == {"base_model": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
                                  "tags": ["opcd", "context-distillation"],
                                  "library_name": "transformers"}
    assert FRENCH_SYSTEM_PROMPT in card  # the context (short: quoted whole)
    assert "| before training, without the context | 0 | 0.000 ± 0.000 | 0.003 ± 0.079 | 24 |" in card
    assert "| after training, without the context | 8 | 1.000 ± 0.000 | -0.035 ± 0.098 | 24 |" in card
    assert "| before training, with the context (reference) | 0 | 0.917 ± 0.058 | 0.029 ± 0.080 |" in card
    assert "0.625" not in card  # only the first and the last evaluation
    for text in ("forward_kl over the top-256", "| steps | 8 |", "| batch | 8 prompts x 1",
                 "| learning rate | 0.0004 |", "LoRA r=16", "| method | opcd |",
                 "qwen2.5-coder-0.5b-instruct", 'from_pretrained("alice/qwen-french")'):
        assert text in card, text


def test_model_card_cuts_a_long_context_and_handles_missing_parts(tmp_path: Path) -> None:
    long = "Start here. " + "word " * 100 + "SECRET-END"
    run = make_run(tmp_path / "a", metrics=None, model="alice/base-model",
                   task={"name": "french", "context": long}, lora={"enabled": False})
    card = hub.model_card(run)
    assert front_matter(card)["base_model"] == "alice/base-model"  # a hub id: as it is
    assert "> Start here. word" in card and "SECRET-END" not in card and "…" in card
    assert "No evaluation was recorded" in card and "full fine-tuning" in card
    assert 'from_pretrained("path/to/final")' in card
    # a local base model has no hub id: no base_model key; a plain run folder name as title
    local = make_run(tmp_path / "b", model=str(tmp_path))
    matter = front_matter(hub.model_card(local))
    assert "base_model" not in matter and matter["library_name"] == "transformers"
    with pytest.raises(RunFolderError, match="not an opcd run folder"):
        hub.model_card(tmp_path)


# --------------------------------------------------------------------------- pushing
def test_push_writes_the_card_and_uploads_final(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    api = FakeApi()
    url = hub.push(run, "alice/qwen-french", api=api)
    assert url == "https://huggingface.co/alice/qwen-french"
    (create, c_args, c_kw), (upload, _, u_kw) = api.calls
    assert (create, c_args, c_kw) == ("create_repo", ("alice/qwen-french",),
                                      {"private": True, "exist_ok": True, "repo_type": "model"})
    assert upload == "upload_folder" and u_kw["repo_id"] == "alice/qwen-french"
    assert Path(u_kw["folder_path"]) == run / "final" and u_kw["repo_type"] == "model"
    assert api.uploaded == ["README.md", "config.json", "model.safetensors"]
    card = (run / "final" / "README.md").read_text(encoding="utf-8")
    assert card == hub.model_card(run, "alice/qwen-french")
    # public on request; repo and visibility default to the run's config
    api = FakeApi()
    hub.push(run, "alice/other", private=False, api=api)
    assert api.calls[0][2]["private"] is False
    configured = make_run(tmp_path / "c", run={"push_to_hub": "org/from-config", "hub_private": False})
    api = FakeApi()
    assert hub.push(configured, api=api).endswith("/org/from-config")
    assert api.calls[0][1] == ("org/from-config",) and api.calls[0][2]["private"] is False


@pytest.mark.parametrize("fail", ["create_repo", "upload_folder"])
def test_failed_push_is_clear_and_keeps_final(tmp_path: Path, fail: str) -> None:
    run = make_run(tmp_path)
    before = (run / "final" / "model.safetensors").read_bytes()
    with pytest.raises(HubError) as info:
        hub.push(run, "alice/qwen-french", api=FakeApi(fail=fail))
    msg = str(info.value)
    assert "saved locally" in msg and str(run / "final") in msg
    assert f"opcd push {run} alice/qwen-french" in msg and "hf auth login" in msg
    assert ("no token found" if fail == "create_repo" else "name resolution") in msg
    assert (run / "final" / "model.safetensors").read_bytes() == before
    assert (run / "final" / "README.md").is_file()


def test_push_refuses_bad_input_before_the_hub(tmp_path: Path) -> None:
    api = FakeApi()
    with pytest.raises(RunFolderError, match="not an opcd run folder"):
        hub.push(tmp_path, "alice/x", api=api)
    unfinished = make_run(tmp_path / "u", final=False)
    with pytest.raises(RunFolderError, match=r"no final/ model yet.*--resume"):
        hub.push(unfinished, "alice/x", api=api)
    run = make_run(tmp_path / "r")
    with pytest.raises(RunFolderError, match="No repo to push"):
        hub.push(run, api=api)
    with pytest.raises(ConfigError, match="The repo id 'alice' is not a Hugging Face repo id"):
        hub.push(run, "alice", api=api)
    assert api.calls == [] and not (run / "final" / "README.md").exists()


def test_push_after_training_reports_instead_of_raising(tmp_path: Path, monkeypatch) -> None:
    run = make_run(tmp_path)
    said: list[str] = []
    monkeypatch.setattr(hub, "_default_api", lambda: FakeApi(fail="upload_folder"))
    assert hub.push_after_training(run, "alice/x", True, said.append) is None
    assert said[0].startswith("warning: Could not push") and "opcd push" in said[0]

    def broken(*a: Any, **k: Any) -> str:
        raise OSError("No space left on device")

    monkeypatch.setattr(hub, "model_card", broken)
    assert hub.push_after_training(run, "alice/x", True, said.append) is None
    assert "No space left on device" in said[1] and "saved locally" in said[1]
    monkeypatch.undo()
    monkeypatch.setattr(hub, "_default_api", FakeApi)
    assert hub.push_after_training(run, "alice/x", True, said.append) == "https://huggingface.co/alice/x"
    assert said[2].startswith("pushed ")


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("repo", ["alice/qwen-french-opcd", "Org_1/m.v2", "a/b", "a" * 96 + "/" + "b" * 96])
def test_push_to_hub_accepts_repo_ids(repo: str) -> None:
    cfg = config_from_dict({"run": {"push_to_hub": repo}})
    assert cfg.run.push_to_hub == repo and cfg.run.hub_private is True


@pytest.mark.parametrize("repo", ["alice", "alice/", "/name", "a/b/c", "alice/-x", "alice/x.",
                                  "alice/x--y", "alice/x..y", "alice/ x", "alice/x\n",
                                  "alice/" + "x" * 97, "alice/qwen french"])
def test_push_to_hub_refuses_bad_repo_ids(repo: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.push_to_hub .* is not a Hugging Face repo id.*user/name"):
        config_from_dict({"run": {"push_to_hub": repo}})


def test_hub_private_must_be_a_bool() -> None:
    assert config_from_dict({"run": {"hub_private": False}}).run.hub_private is False
    with pytest.raises(ConfigError, match="run.hub_private"):
        config_from_dict({"run": {"hub_private": "sometimes"}})


# --------------------------------------------------------------------------- opcd push
def test_push_command(tmp_path: Path, monkeypatch, capsys) -> None:
    run = make_run(tmp_path)
    apis: list[FakeApi] = []

    def fake(fail: str | None = None) -> FakeApi:
        apis.append(FakeApi(fail))
        return apis[-1]

    monkeypatch.setattr(hub, "_default_api", fake)
    assert main(["push", str(run), "alice/qwen-french", "--public"]) == 0
    assert "https://huggingface.co/alice/qwen-french" in capsys.readouterr().out
    assert apis[-1].calls[0][2]["private"] is False and (run / "final" / "README.md").is_file()
    assert main(["push", str(run), "alice/qwen-french"]) == 0
    assert apis[-1].calls[0][2]["private"] is True
    capsys.readouterr()

    monkeypatch.setattr(hub, "_default_api", lambda: FakeApi(fail="create_repo"))
    assert main(["push", str(run), "alice/qwen-french"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opcd: error: Could not push") and "Traceback" not in err
    assert main(["push", str(run), "not a repo"]) == 2
    assert "is not a Hugging Face repo id" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nowhere"), "alice/x"]) == 2
    assert "not an opcd run folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- the trainer hook
def test_training_pushes_at_the_end_and_survives_a_failed_push(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    apis: list[FakeApi] = []

    def failing() -> FakeApi:
        apis.append(FakeApi(fail="upload_folder"))
        return apis[-1]

    monkeypatch.setattr(hub, "_default_api", failing)
    cfg = tiny_config(tiny_model_dir, tmp_path, train={"steps": 1},
                      run={"push_to_hub": "alice/tiny-opcd", "hub_private": False})
    result = train(cfg, progress=False)  # a failed push does not fail the run
    assert (result.final_model / "config.json").is_file()
    assert any(result.final_model.glob("*.safetensors"))
    card = (result.final_model / "README.md").read_text(encoding="utf-8")
    assert "> Always answer in French." in card
    assert "| after training, without the context | 1 |" in card
    (create, args, kw), (upload, _, u_kw) = apis[0].calls
    assert args == ("alice/tiny-opcd",) and kw["private"] is False
    assert Path(u_kw["folder_path"]) == result.final_model
    err = capsys.readouterr().err
    assert "warning: Could not push" in err and f"opcd push {result.run_dir} alice/tiny-opcd" in err
