"""The recipes in ``recipes/``: each loads and validates, says how to run it, and refers only to
files that exist and models the registry knows. Fast: no model is loaded or downloaded.

Every ``recipes/*.yaml`` must start with a comment block holding:

- a ``Run`` line followed by the commands, one per line, indented (``#   opcd train ...``);
  at least one ``opcd train`` (or ``opcd extract``) command names the recipe's own path;
- ``Time on this 2-core CPU:`` with a figure cited from ``docs/`` or the README, or the words
  "not yet timed on this machine";
- ``Should show`` (then a colon, optionally after a citation): what the run should show.

A new recipe without such a header fails :func:`test_header`. A recipe that quotes a measured
time must be listed in :data:`MEASURED_WITH` with the config that was measured, and must equal
it (:func:`test_measured_recipes_match_the_measured_config`); any other says "not yet timed".
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from opcd.cli import build_parser
from opcd.config import Config, config_from_dict, flatten, load_config, read_yaml
from opcd.errors import ConfigError
from opcd.models.registry import registry_names
from opcd.tasks import build_task
from opcd.tasks.system_prompt import load_prompts

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
DATA = RECIPES / "data"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))
NOT_TIMED = "not yet timed on this machine"
TIME_LABEL = "Time on this 2-core CPU:"
SHOW_LABEL = "Should show"
TOOLS = ("train", "extract", "eval")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


# --------------------------------------------------------------------------- header parsing
def header_lines(path: Path) -> list[str]:
    """The comment block at the top of ``path``, each line without its ``#`` and one space."""
    out: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        out.append(text[1:] if text.startswith(" ") else text)
    return out


@dataclass
class Command:
    """One ``opcd`` command of a recipe's header, parsed by opcd's own argument parser."""

    line: str
    args: argparse.Namespace
    launcher_config: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def tool(self) -> str:
        return str(self.args.command)


def run_block(lines: list[str]) -> list[str]:
    """The indented command lines that follow the ``Run`` line."""
    start = next((i for i, text in enumerate(lines) if text.startswith("Run")), None)
    if start is None:
        return []
    block: list[str] = []
    for text in lines[start + 1:]:
        if not text.startswith("  ") or not text.strip():
            break
        block.append(text.strip())
    return block


def parse_command(line: str) -> Command:
    """``[ENV=v ...] [accelerate launch --config_file F -m] opcd TOOL ...`` -> :class:`Command`."""
    tokens = shlex.split(line)
    env: dict[str, str] = {}
    while tokens and "=" in tokens[0] and not tokens[0].startswith("-"):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    launcher_config = None
    if tokens[:2] == ["accelerate", "launch"]:
        at = tokens.index("-m")
        launch = tokens[2:at]
        if "--config_file" in launch:
            launcher_config = launch[launch.index("--config_file") + 1]
        tokens = tokens[at + 1:]
    if not tokens or tokens[0] != "opcd" or len(tokens) < 2 or tokens[1] not in TOOLS:
        raise AssertionError(f"not an `opcd train/extract/eval` command: {line!r}")
    args = build_parser().parse_args(tokens[1:])
    return Command(line, args, launcher_config, env)


def header_problems(path: Path) -> list[str]:
    """What the header of ``path`` lacks (empty: a complete header)."""
    lines = header_lines(path)
    if not lines:
        return ["no comment block at the top of the file"]
    problems: list[str] = []
    text = "\n".join(lines)
    commands = run_block(lines)
    if not commands:
        problems.append("no `Run` line followed by indented commands")
    own = f"recipes/{path.name}"
    names_itself = False
    for line in commands:
        try:
            cmd = parse_command(line)
        except (AssertionError, SystemExit, ValueError) as e:
            problems.append(f"command {line!r} does not parse: {e}")
            continue
        if cmd.tool in ("train", "extract") and cmd.args.config == own:
            names_itself = True
    if commands and not names_itself:
        problems.append(f"no `opcd train {own}` (or extract) command")
    for label in (TIME_LABEL, SHOW_LABEL):
        if label not in text:
            problems.append(f"no {label!r} line")
    if TIME_LABEL in text:
        timing = text.split(TIME_LABEL, 1)[1].split(SHOW_LABEL, 1)[0]
        if NOT_TIMED not in timing and "docs/" not in timing and "README" not in timing:
            problems.append(f"the time neither cites docs/ or the README nor says {NOT_TIMED!r}")
    return problems


def recipe_commands(path: Path) -> list[Command]:
    return [parse_command(line) for line in run_block(header_lines(path))]


def own_commands(path: Path) -> list[Command]:
    """The header's ``opcd train`` / ``opcd extract`` commands that run this recipe."""
    own = f"recipes/{path.name}"
    return [c for c in recipe_commands(path) if c.tool in ("train", "extract") and c.args.config == own]


def override(cmd: Command, key: str) -> str | None:
    """The value a command's ``key=value`` override gives ``key`` (None: not overridden)."""
    for item in cmd.args.overrides:
        k, _, v = item.partition("=")
        if k == key:
            return v
    return None


def check_models(cfg: Config, where: str) -> None:
    names = registry_names()
    for key, value in (("model", cfg.model), ("teacher.model", cfg.teacher.model),
                       ("extract.model", cfg.extract.model)):
        if value is not None:
            assert value in names, f"{where}: {key}={value!r} is not a registry name ({names})"


# --------------------------------------------------------------------------- the tests
def test_recipes_exist() -> None:
    assert len(RECIPE_FILES) >= 10, f"expected the recipes in {RECIPES}"
    stray = sorted(p.name for p in RECIPES.glob("*.yml"))
    assert not stray, f"name recipes *.yaml so that these tests see them: {stray}"


def test_header_checker_rejects_a_recipe_without_header(tmp_path: Path) -> None:
    bare = tmp_path / "new.yaml"
    bare.write_text("model: qwen2.5-coder-0.5b-instruct\ntask: {name: french}\n", encoding="utf-8")
    assert header_problems(bare) == ["no comment block at the top of the file"]
    wrong = tmp_path / "other.yaml"
    wrong.write_text("# Something.\n#\n# Run:\n#   opcd train recipes/lora.yaml\n"
                     "# Time on this 2-core CPU: 5 min.\n# Should show: it works.\nmodel: x\n",
                     encoding="utf-8")
    problems = header_problems(wrong)
    assert any("opcd train recipes/other.yaml" in p for p in problems)
    assert any("neither cites" in p for p in problems)


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_header(path: Path) -> None:
    assert header_problems(path) == []


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_recipe_validates(path: Path) -> None:
    try:
        cfg = load_config(path)
    except ConfigError as e:
        pytest.fail(f"{_rel(path)} does not validate: {e}")
    check_models(cfg, _rel(path))


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_header_commands_validate(path: Path) -> None:
    """Every train/extract command's overrides validate on the recipe; eval commands read a
    config that exists, a known task and a model the header's training writes (or a registry
    model); a launcher config exists."""
    trained: set[str] = set()
    for cmd in recipe_commands(path):
        if cmd.launcher_config is not None:
            launcher = ROOT / cmd.launcher_config
            assert launcher.is_file(), f"{cmd.line}: {cmd.launcher_config} does not exist"
            assert isinstance(yaml.safe_load(launcher.read_text(encoding="utf-8")), dict)
        if cmd.tool in ("train", "extract"):
            config = ROOT / cmd.args.config
            assert config.is_file(), f"{cmd.line}: {cmd.args.config} does not exist"
            try:
                cfg = load_config(config, cmd.args.overrides)
            except ConfigError as e:
                pytest.fail(f"{cmd.line}: {e}")
            check_models(cfg, cmd.line)
            if cmd.tool == "train":
                trained.add(f"{cfg.run.dir}/final")
        else:
            assert cmd.args.config is not None, f"{cmd.line}: give --config {_rel(path)}"
            assert (ROOT / cmd.args.config).is_file(), f"{cmd.line}: no {cmd.args.config}"
            data: dict[str, Any] = read_yaml(ROOT / cmd.args.config)
            data.setdefault("task", {})["name"] = cmd.args.task
            config_from_dict(data, cmd.args.overrides)  # as `opcd eval --config` reads it
            assert cmd.args.model in trained or cmd.args.model in registry_names(), (
                f"{cmd.line}: --model is neither a run this header trains ({sorted(trained)}) "
                "nor a registry name"
            )


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_referenced_files_exist(path: Path) -> None:
    """Files the recipe reads exist; an experience file is what the header's extract writes."""
    cfg = load_config(path)
    for key, value in (("task.prompts", cfg.task.prompts), ("task.context_file", cfg.task.context_file)):
        if value is not None:
            assert not PurePosixPath(value).is_absolute(), f"{key}={value}: use a repository path"
            assert (ROOT / value).is_file(), f"{_rel(path)}: {key}={value} does not exist"
    extracted: set[str] = set()
    for cmd in own_commands(path):
        run_cfg = load_config(ROOT / cmd.args.config, cmd.args.overrides)
        if cmd.tool == "extract":
            extracted.add(f"{run_cfg.extract.dir}/experience.txt")
            continue
        context_file = override(cmd, "task.context_file")
        if context_file is not None and not (ROOT / context_file).is_file():
            assert context_file in extracted, (
                f"{cmd.line}: task.context_file={context_file} neither exists nor is written by "
                f"an earlier `opcd extract` in the header (it writes {sorted(extracted)})"
            )


@pytest.mark.parametrize("path", RECIPE_FILES, ids=_ids(RECIPE_FILES))
def test_task_builds(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task section builds (prompt files read, behaviour specs and suite entries parsed,
    keys a task does not read refused); generated data is drawn lazily, nothing downloads."""
    cfg = load_config(path)
    if cfg.task.name in ("math", "gsm8k"):
        pytest.importorskip("reasoning_gym")
    monkeypatch.chdir(ROOT)  # recipes name files relative to the repository root
    task = build_task(cfg.task)
    if cfg.task.name in ("french", "system_prompt", "suite"):
        assert task.examples("train") and task.examples("eval")


def test_data_files_are_used_and_load() -> None:
    """Every file in recipes/data is read by some recipe; prompt files load as opcd reads them."""
    used: set[str] = set()
    for path in RECIPE_FILES:
        cfg = load_config(path)
        used.update(v for v in (cfg.task.prompts, cfg.task.context_file) if v is not None)
    data_files = sorted(_rel(p) for p in DATA.iterdir()) if DATA.is_dir() else []
    assert sorted(set(data_files) - used) == [], "data files no recipe reads"
    for rel in data_files:
        if rel.endswith(".jsonl"):
            examples = load_prompts(ROOT / rel)
            assert len(examples) >= 8, f"{rel}: too few prompts to hold some out"


def test_privileged_context_rows_carry_their_own_context() -> None:
    """The per-example recipe's rows each hold the context only the teacher sees."""
    cfg = load_config(RECIPES / "privileged_context.yaml")
    assert cfg.task.prompts is not None
    examples = load_prompts(ROOT / cfg.task.prompts)
    assert all(ex.context and ex.context not in ex.prompt for ex in examples)


# Recipes whose header quotes a time or result measured with a study or demo config: the
# config those figures came from, and the overrides its script added. Only the output folders,
# and keys the recipe's method does not read, may differ; if a study config changes, the
# recipe's quoted figures no longer apply to it.
MEASURED_WITH: dict[str, tuple[str, list[str], set[str]]] = {
    "safety_cross_size.yaml": ("scripts/study/safety_opcd.yaml",
                               ["teacher.mode=model", "teacher.model=qwen2.5-coder-1.5b-instruct"],
                               set()),
    "offpolicy.yaml": ("scripts/study/safety_opcd.yaml", ["method=offpolicy"],
                       {"loss.objective"}),  # offpolicy.loss is its objective
    "ovd.yaml": ("scripts/study/safety_opcd.yaml",
                 ["method=ovd", "train.batch_size=4", "rollout.n=2"],
                 {"loss.objective", "loss.top_k"}),  # the OVD update reads neither
    "math_experience.yaml": ("scripts/study/math.yaml", [], set()),
    "frozenlake_experience.yaml": ("scripts/study/frozenlake.yaml", [], set()),
    "lora.yaml": ("src/opcd/configs/demo.yaml", [], set()),
}
# Recipes timed as they are by scripts/recipes/time.sh, which keeps each run's saved config
# as docs/results/recipes/NAME.config.yaml beside its figures (docs/results/recipes.md).
MEASURED_WITH.update({
    f"{p.name.removesuffix('.config.yaml')}.yaml": (_rel(p), [], set())
    for p in sorted((ROOT / "docs" / "results" / "recipes").glob("*.config.yaml"))
})
SYSTEM_PROMPT_TASKS = ("french", "system_prompt", "suite")


def _with_context(cfg: Config) -> bool:
    """``eval.with_context`` as the trainer resolves None (yes for system-prompt tasks)."""
    if cfg.eval.with_context is not None:
        return cfg.eval.with_context
    return cfg.task.name in SYSTEM_PROMPT_TASKS


@pytest.mark.parametrize("name", sorted(MEASURED_WITH))
def test_measured_recipes_match_the_measured_config(name: str) -> None:
    source, overrides, unread = MEASURED_WITH[name]
    recipe = load_config(RECIPES / name)
    measured = load_config(ROOT / source, overrides)
    assert _with_context(recipe) == _with_context(measured)
    a, b = flatten(recipe.to_dict()), flatten(measured.to_dict())
    skip = {"run.dir", "extract.dir", "eval.with_context"} | unread
    differ = {k: (a[k], b[k]) for k in a if k not in skip and a[k] != b[k]}
    assert differ == {}, f"{name} differs from {source} {overrides}: {differ}"
    header = "\n".join(header_lines(RECIPES / name))
    assert source in header or "demo" in header, f"{name}: name the measured config in the header"


def test_unmeasured_recipes_say_so() -> None:
    """A recipe not measured with a known config quotes no time."""
    for path in RECIPE_FILES:
        if path.name in MEASURED_WITH:
            continue
        text = "\n".join(header_lines(path))
        timing = text.split(TIME_LABEL, 1)[1].split(SHOW_LABEL, 1)[0]
        assert NOT_TIMED in timing, f"{path.name}: quotes a time for settings nobody measured"
