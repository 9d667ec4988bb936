"""Config loading: overrides, types, unknown keys, ranges -- clear ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from opcd.config import Config, config_from_dict, load_config, parse_overrides
from opcd.errors import ConfigError


def test_defaults_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model: m\ntrain:\n  lr: 1e-5\n  steps: 3\n")
    cfg = load_config(f, ["train.lr=2e-5", "teacher.mode=live", "lora.enabled=true",
                          "lora.target_modules=q_proj,v_proj"])
    assert isinstance(cfg, Config)
    assert cfg.model == "m"
    assert cfg.train.lr == pytest.approx(2e-5)
    assert cfg.train.steps == 3
    assert cfg.teacher.mode == "live"
    assert cfg.lora.enabled is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.loss.top_k == 256  # default kept


def test_yaml_11_exponent_string_is_a_float(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 5e-6\n")  # YAML 1.1 reads this as a string
    assert load_config(f).train.lr == pytest.approx(5e-6)


def test_unknown_key_lists_valid_and_suggests_closest() -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": {"learning_rate": 1e-5}})
    msg = str(e.value)
    assert "train.learning_rate" in msg
    assert "Valid keys in train" in msg and "lr" in msg
    with pytest.raises(ConfigError, match="Did you mean 'teacher'"):
        config_from_dict({"teachr": {}})


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.steps=ten"], "train.steps='ten' has the wrong type: expected an integer"),
        (["train.lr=fast"], "train.lr='fast'"),
        (["lora.enabled=maybe"], "true/false"),
        (["teacher.mode=frozn"], "Did you mean 'frozen'"),
        (["train.steps=0"], "must be greater than 0"),
        (["rollout.top_p=1.5"], "(0, 1]"),
        (["teacher.mode=model"], "teacher.model"),
        (["loss.objective=jsd", "loss.beta=1.0"], "strictly between 0 and 1"),
        (["task.user_template=no placeholders"], "{context} and {prompt}"),
        (["train"], "key=value"),
        (["train.steps.x=1"], "train.steps={'x': 1} has the wrong type"),
    ],
)
def test_bad_values_name_the_field(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, overrides)
    assert needle in str(e.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_parse_overrides_nested() -> None:
    assert parse_overrides(["a.b=1", "a.c=x", "d=true"]) == {"a": {"b": 1, "c": "x"}, "d": True}


@pytest.mark.parametrize("method", ["opcd", "offpolicy", "ovd"])
def test_the_method_table_decides_what_a_method_accepts(method: str) -> None:
    from opcd.config import METHODS

    row = METHODS[method]
    base = {"method": method, "rollout": {"n": 2}}
    for mode in ("frozen", "live", "model", "server"):
        teacher: dict = {"mode": mode}
        if mode == "model":
            teacher["model"] = "some-teacher"
        if mode == "server":
            teacher.update(server_url="http://localhost:8000/v1", server_model="m")
        cfg = {**base, "teacher": teacher}
        if mode == "server":
            cfg["loss"] = {"objective": "sampled_token"}
        if mode in row.teacher_modes:
            config_from_dict(cfg)
        else:
            with pytest.raises(ConfigError, match=f"teacher.mode={mode} is not supported by method={method}"):
                config_from_dict(cfg)
    for backend in ("hf", "vllm"):
        cfg = {**base, "rollout": {"n": 2, "backend": backend}}
        if backend in row.rollout_backends:
            config_from_dict(cfg)
        else:
            with pytest.raises(ConfigError, match=f"rollout.backend={backend} is not supported for method={method}"):
                config_from_dict(cfg)
    cfg = {**base, "rollout": {"n": 2, "dtype": "bfloat16"}}
    if row.rollout_dtype:
        config_from_dict(cfg)
    else:
        with pytest.raises(ConfigError, match=f"rollout.dtype=bfloat16 is not supported for method={method}"):
            config_from_dict(cfg)


def test_loss_settings_a_method_does_not_read_are_named() -> None:
    from opcd.config import ignored_settings

    assert ignored_settings(config_from_dict({"loss": {"objective": "jsd", "top_k": 8}})) == []
    cfg = config_from_dict({"method": "ovd", "rollout": {"n": 2},
                            "loss": {"objective": "reverse_kl", "top_k": 64, "reduction": "seq_mean"}})
    assert ignored_settings(cfg) == ["loss.objective=reverse_kl", "loss.top_k=64"]
    cfg = config_from_dict({"method": "offpolicy", "loss": {"objective": "jsd", "top_k": 8}})
    assert ignored_settings(cfg) == ["loss.objective=jsd"]
