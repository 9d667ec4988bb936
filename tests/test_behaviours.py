"""Tests for :mod:`opcd.tasks.behaviours`: the scorers, their combination, the suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opcd.config import config_from_dict
from opcd.errors import ConfigError, DataError
from opcd.tasks import TASKS, build_task
from opcd.tasks.base import Example
from opcd.tasks.behaviours import (
    BEHAVIOURS,
    SUITE_PATH,
    BehaviourRules,
    build_check,
    count_words,
    load_suite,
    suite_entry,
)
from opcd.tasks.system_prompt import SystemPromptTask, behaviour_scorer

FRENCH = "Le ciel est bleu parce que l'air diffuse davantage la lumière bleue du soleil."
ENGLISH = "The sky looks blue because air scatters blue sunlight more than red sunlight."

# (spec, responses that meet it, responses that do not). Every behaviour appears here.
CASES: list[tuple[str, list[str], list[str]]] = [
    ("language:fr", [FRENCH, f"{FRENCH}\n\n```python\nprint('hello world')\n```"],
     [ENGLISH, "", "```python\nprint('bonjour')\n```"]),
    ("language:en", [ENGLISH], [FRENCH]),
    ("contains:Paris", ["The capital is paris.", "PARIS!"], ["The capital is Lyon.", ""]),
    ("opening:Hello there!",
     ["Hello there! The sky is blue.", "  hello   there!\nThe answer is 4.", "Hello there!"],
     ["Hi! Hello there!", "Hello there, friend.", "", "**Hello there!** Yes."]),
    ("closing:Hope this helps!",
     ["Use cold water. Hope this helps!", "Use cold water.\nhope this  helps!  \n\n",
      "Hope this helps!"],
     ["Hope this helps! Use cold water.", "Use cold water. Hope this helps", "", "   "]),
    ("lowercase",
     ["the sky is blue.", "the answer is 42.", "use `print(Hello)` here.",
      "run this:\n```python\nprint('Hello')\n```\nthat's all.", "l'été est très chaud."],
     ["The sky is blue.", "the sky is blue, says NASA.", "", "42", "```\nx = 1\n```"]),
    ("uppercase",
     ["THE SKY IS BLUE.", "HELLO THERE", "USE `print(x)` NOW.", "L'ÉTÉ EST CHAUD!"],
     ["THE SKY IS Blue.", "the sky", "", "42 !!!"]),
    ("json", ['{"a": 1}', "[1, 2]", '```json\n{"a": 1}\n```', '"text"', "  42  \n"],
     ["Here it is: {\"a\": 1}", "{'a': 1}", "", '```json\n{"a": 1}\n``` done']),
    ("json_keys:answer,confidence",
     ['{"answer": "Paris", "confidence": 0.9}',
      '```json\n{"answer": "Paris", "confidence": 0.9, "source": "atlas"}\n```',
      '```\n{"confidence": 1, "answer": "yes"}\n```\n',
      '  {"answer": "x",\n   "confidence": 0.1}  '],
     ['{"answer": "Paris"}', '["answer", "confidence"]', 'Sure! {"answer": "a", "confidence": 1}',
      '```json\n{"answer": "a", "confidence": 1}\n', "", '{"answer": "a", "confidence": 1'],),
    ("max_words:5",
     ["One two three four five.", "Don't go, well-known fact!", "Yes.", "3.14 is pi"],
     ["One two three four five six.", "", "a b c d e f g h"]),
    ("min_words:3", ["One two three.", "a b c d"], ["One two.", "", "!!! ???"]),
    ("bullets",
     ["- eggs\n- milk", "* eggs\n* milk\n* bread", "Here you go:\n- eggs\n- milk\n",
      "• eggs\n• milk", "- eggs, the\n  large ones\n- milk\n  - whole\n\n- bread"],
     ["- eggs", "Eggs and milk.", "", "Intro.\n- eggs\n- milk\nOutro.",
      "-eggs\n-milk", "1. eggs\n2. milk", "*eggs*\n*milk*"]),
    ("bullets:3", ["- a\n- b\n- c"], ["- a\n- b", "- a\n- b\n- c\n- d"]),
    ("no_commas",
     ["The sky is blue. It is nice.", "Use `f(a, b)` to add.", "```\nx, y = 1, 2\n```\nDone."],
     ["Yes, it is.", "1,000 people", "是的，很好", ""]),
    ("persona:Ada",
     ["Hi, I'm Ada from Northwind Bank.", "ada here: yes.", "— Ada"],
     ["Hi, I'm Adam.", "Nevada is large.", "Canada", ""]),
    ("persona:Mary Jane", ["I am Mary  Jane.", "mary\njane here"], ["I am Mary.", "Maryjane"]),
    ("forbidden_words:basically,literally",
     ["The sky is blue.", "Basic physics explains it."],
     ["Basically, yes.", "It LITERALLY is.", ""]),
    ("end_with_question",
     ["The sky is blue. Does that help?", "Does that help?  \n", "Want more? **Ask me?**",
      'He asked "why?"', "¿Quieres saber más？"],
     ["Does that help? Yes.", "The sky is blue.", "", "?!"]),
    ("plain_text",
     ["The sky is blue because air scatters light.\n\nAsk me anything.",
      "It costs 5 * 3 = 15 dollars.", "Twenty - five people came."],
     ["# Title\nText", "- a\n- b", "1. first\n2. second", "This is **bold**.",
      "Use `ls`.", "```\nls\n```", "| a | b |\n|---|---|", ""]),
]


def test_cases_cover_every_behaviour() -> None:
    covered = {spec.partition(":")[0] for spec, _, _ in CASES}
    assert covered == set(BEHAVIOURS)
    assert len(BEHAVIOURS) >= 10


@pytest.mark.parametrize(("spec", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_scorer_positive_and_negative(spec: str, good: list[str], bad: list[str]) -> None:
    score = behaviour_scorer(spec)
    assert [score(t) for t in good] == [1.0] * len(good)
    assert [score(t) for t in bad] == [0.0] * len(bad)


@pytest.mark.parametrize("spec", [s for s, _, _ in CASES])
def test_blank_response_meets_no_rule(spec: str) -> None:
    check = build_check(spec)
    for text in ("", " ", "\n\t  \n"):
        assert check(text) is False


def test_count_words() -> None:
    assert count_words("") == 0
    assert count_words("Don't split well-known words, OK?") == 5
    assert count_words("l'été est là") == 3
    assert count_words("x = 1; y = 22") == 4


def test_existing_specs_keep_their_meaning() -> None:
    # contains: plain substring, any case (used by configs and other tests).
    assert behaviour_scorer("contains:e")("Yes") == 1.0
    assert behaviour_scorer("contains:la")("LA réponse") == 1.0
    assert behaviour_scorer("contains:la")("Voici") == 0.0
    assert behaviour_scorer("language:fr")(FRENCH) == 1.0
    assert behaviour_scorer("language:fr")(ENGLISH) == 0.0


# -- combination ------------------------------------------------------------------------

RULES = ["lowercase", "max_words:4", "closing:bye."]


def test_rules_all_must_hold() -> None:
    rules = BehaviourRules(RULES)
    assert rules.specs == tuple(RULES)
    assert rules("ok then, bye.") == 1.0
    assert rules.check("OK then, bye.") == {"lowercase": False, "max_words:4": True,
                                            "closing:bye.": True}
    assert rules("ok, this is long, bye.") == 0.0
    assert rules("ok then") == 0.0
    assert rules("") == 0.0


def test_rules_rates() -> None:
    responses = ["ok then, bye.", "OK then, bye.", "one two three four five bye.",
                 "hello there my good old friend"]
    rates = BehaviourRules(RULES).rates(responses)
    assert rates == {"lowercase": 0.75, "max_words:4": 0.5, "closing:bye.": 0.75,
                     "all_rules": 0.25}
    assert BehaviourRules(RULES).rates([]) == {"lowercase": 0.0, "max_words:4": 0.0,
                                               "closing:bye.": 0.0, "all_rules": 0.0}


def _task(behaviour: str | list[str]) -> SystemPromptTask:
    examples = [Example(id=str(i), prompt=f"q{i}") for i in range(8)]
    return SystemPromptTask("t", "Be brief.", examples, behaviour, eval_fraction=0.5)


def test_score_details_per_rule() -> None:
    task = _task(RULES)
    examples = task.examples("eval")
    responses = ["ok then, bye.", "OK then, bye.", "one two three four five bye.",
                 "hello there my good old friend"]
    details = task.score_details(examples, responses)
    assert details == {"score": 0.25, "n": 4.0, "lowercase": 0.75, "max_words:4": 0.5,
                       "closing:bye.": 0.75, "all_rules": 0.25}
    assert [task.score(ex, r) for ex, r in zip(examples, responses, strict=True)] == [
        1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="4 examples but 1 responses"):
        task.score_details(examples, responses[:1])


def test_score_details_single_rule_unchanged() -> None:
    task = _task("lowercase")
    examples = task.examples("eval")[:2]
    assert task.score_details(examples, ["yes", "No"]) == {"score": 0.5, "n": 2.0}
    assert task.describe() == "t (behaviour lowercase)"
    assert _task(["lowercase", "no_commas"]).describe() == "t (behaviour lowercase & no_commas)"


def test_behaviour_list_through_config() -> None:
    cfg = config_from_dict({"task": {"name": "system_prompt", "behaviour": RULES}})
    assert cfg.task.behaviour == RULES
    cfg = config_from_dict({}, ["task.behaviour=[lowercase, 'json_keys:a,b']"])
    assert cfg.task.behaviour == ["lowercase", "json_keys:a,b"]
    # A single string is one spec, commas and all (not split into a list).
    cfg = config_from_dict({}, ["task.behaviour=json_keys:a,b"])
    assert cfg.task.behaviour == "json_keys:a,b"
    assert behaviour_scorer(cfg.task.behaviour)('{"a": 1, "b": 2}') == 1.0


# -- bad input --------------------------------------------------------------------------


def test_unknown_behaviour_lists_every_valid_form() -> None:
    with pytest.raises(ConfigError) as e:
        behaviour_scorer("lowercse")
    msg = str(e.value)
    assert "Unknown behaviour 'lowercse'" in msg
    assert "Did you mean 'lowercase'?" in msg
    for behaviour in BEHAVIOURS.values():
        assert behaviour.form in msg
    assert "max_words:<N>" in msg and "json_keys:<key1,key2,...>" in msg
    assert "bullets[:<N>]" in msg


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("max_words:abc", "'abc' is not a whole number of 1 or more. Write it as max_words:<N>"),
        ("max_words:0", "max_words:<N>"),
        ("max_words:-3", "'-3' is not a whole number"),
        ("max_words", "the argument is missing. Write it as max_words:<N>"),
        ("min_words:2.5", "'2.5' is not a whole number"),
        ("bullets:none", "bullets[:<N>]"),
        ("json_keys:", "the argument is missing. Write it as json_keys:<key1,key2,...>"),
        ("json_keys:a,,b", "an item of the comma-separated list is empty"),
        ("json_keys:a, a", "'a' is listed twice"),
        ("forbidden_words: ,", "an item of the comma-separated list is empty"),
        ("closing:", "e.g. closing:Hope this helps!"),
        ("opening:   ", "the argument is missing"),
        ("contains", "the argument is missing"),
        ("persona:...", "the name has no letters"),
        ("language:klingon", "'klingon' is not one of en, fr, es"),
        ("lowercase:yes", "lowercase takes no argument"),
        ("", "Unknown behaviour ''"),
    ],
)
def test_bad_argument_names_the_fix(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        behaviour_scorer(spec)
    assert needle in str(e.value)


def test_bad_rule_lists() -> None:
    with pytest.raises(ConfigError, match="empty list"):
        behaviour_scorer([])
    with pytest.raises(ConfigError, match="lists 'lowercase' twice"):
        behaviour_scorer(["lowercase", "lowercase"])
    with pytest.raises(ConfigError, match="Did you mean 'no_commas'"):
        behaviour_scorer(["lowercase", "no_comma"])
    with pytest.raises(ConfigError, match="must be a string"):
        behaviour_scorer(["lowercase", 3])  # type: ignore[list-item]


def test_optional_bullet_count() -> None:
    assert build_check("bullets:")("- a\n- b") is True
    assert build_check("bullets:2")("- a\n- b\n- c") is False


# -- the suite --------------------------------------------------------------------------


def test_suite_file_loads_and_every_entry_scores() -> None:
    assert SUITE_PATH.suffix == ".jsonl"  # shipped by the package-data glob tasks/data/*.jsonl
    suite = load_suite()
    assert len(suite) >= 10
    lines = [json.loads(line) for line in SUITE_PATH.read_text(encoding="utf-8").splitlines()]
    assert [row["name"] for row in lines] == list(suite)
    used = set()
    for entry in suite.values():
        assert 20 < len(entry.system_prompt) < 400
        rules = BehaviourRules(entry.behaviour)
        used.update(spec.partition(":")[0] for spec in rules.specs)
        assert rules("") == 0.0
        assert rules("A plain answer, in English, with Capitals.") in (0.0, 1.0)
    assert len(used) >= 10
    assert any(len(BehaviourRules(e.behaviour).specs) > 1 for e in suite.values())


def test_suite_entries_score_a_fitting_answer() -> None:
    suite = load_suite()
    fitting = {
        "lowercase_replies": "the sky is blue because air scatters blue light.",
        "all_caps": "THE SKY IS BLUE BECAUSE AIR SCATTERS BLUE LIGHT.",
        "json_api": '```json\n{"answer": "Paris", "confidence": 0.9}\n```',
        "closing_line": "Rinse it with cold water. Hope this helps!",
        "support_bot": "Rosie here. Restart the server. Is there anything else I can help with?",
        "spanish_replies": "El cielo es azul porque el aire dispersa la luz azul del sol.",
    }
    for name, text in fitting.items():
        assert BehaviourRules(suite[name].behaviour)(text) == 1.0, name
        assert BehaviourRules(suite[name].behaviour)(ENGLISH) == 0.0, name


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ('{"name": "x", "system_prompt": "Be nice.", "behaviour": "lowercse"}', "lowercse"),
        ('{"name": "x", "system_prompt": "", "behaviour": "lowercase"}', "system_prompt"),
        ('{"name": "Bad Name", "system_prompt": "Hi.", "behaviour": "lowercase"}', "identifier"),
        ('{"name": "x", "system_prompt": "Hi.", "behaviour": {"a": 1}}', "not dict"),
        ("[1, 2]", "not a JSON object"),
        ("{oops", "not valid JSON"),
    ],
)
def test_bad_suite_file(tmp_path: Path, row: str, needle: str) -> None:
    path = tmp_path / "suite.jsonl"
    path.write_text(row + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 1") as e:
        load_suite(path)
    assert needle in str(e.value)


def test_duplicate_suite_name(tmp_path: Path) -> None:
    row = '{"name": "x", "system_prompt": "Hi.", "behaviour": "lowercase"}\n'
    path = tmp_path / "suite.jsonl"
    path.write_text(row * 2, encoding="utf-8")
    with pytest.raises(DataError, match="line 2: name 'x' appears twice"):
        load_suite(path)


def test_unknown_suite_entry_lists_entries() -> None:
    with pytest.raises(ConfigError) as e:
        suite_entry("lowercase_reply")
    msg = str(e.value)
    assert "Did you mean 'lowercase_replies'?" in msg
    for name in load_suite():
        assert name in msg
    with pytest.raises(ConfigError, match="needs task.behaviour set to the name of a suite entry"):
        suite_entry(None)


# -- the suite task ---------------------------------------------------------------------


def test_build_suite_task() -> None:
    assert "suite" in TASKS
    cfg = config_from_dict({"task": {"name": "suite", "behaviour": "json_api"}})
    task = build_task(cfg.task)
    entry = load_suite()["json_api"]
    ex = task.examples("eval")[0]
    assert task.context(ex) == entry.system_prompt
    assert task.placement == "system"
    assert task.describe() == "suite/json_api (behaviour json_keys:answer,confidence)"
    assert task.score(ex, '{"answer": "4", "confidence": 1}') == 1.0
    assert task.score(ex, "The answer is 4.") == 0.0
    # The same prompts and split as the french task with the same seed and fraction.
    french = build_task(config_from_dict({"task": {"name": "french", "seed": 3,
                                                   "eval_fraction": 0.1}}).task)
    suite = build_task(config_from_dict({"task": {"name": "suite", "behaviour": "json_api",
                                                  "seed": 3, "eval_fraction": 0.1}}).task)
    for split in ("train", "eval"):
        assert [e.id for e in suite.examples(split)] == [e.id for e in french.examples(split)]
    assert len(suite.examples("eval")) == 32


def test_suite_task_combined_entry_and_context_override() -> None:
    cfg = config_from_dict({"task": {"name": "suite", "behaviour": "support_bot",
                                     "context": "You are Rosie. Be short."}})
    task = build_task(cfg.task)
    examples = task.examples("eval")[:2]
    assert task.context(examples[0]) == "You are Rosie. Be short."
    details = task.score_details(
        examples, ["Rosie here. Yes. Is there anything else I can help with?", "Rosie here."])
    assert details["score"] == details["all_rules"] == 0.5
    assert details["persona:Rosie"] == 1.0
    assert details["closing:Is there anything else I can help with?"] == 0.5


@pytest.mark.parametrize(
    ("task", "needle"),
    [
        ({"name": "suite"}, "needs task.behaviour set to the name of a suite entry"),
        ({"name": "suite", "behaviour": "lowercase"}, "Unknown suite entry 'lowercase'"),
        ({"name": "suite", "behaviour": ["json_api"]}, "needs task.behaviour set to the name"),
        ({"name": "suite", "behaviour": "json_api", "train_size": 5}, "task.train_size"),
        ({"name": "suit", "behaviour": "json_api"}, "Did you mean 'suite'"),
    ],
)
def test_suite_task_config_errors(task: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_task(config_from_dict({"task": task}).task)
    assert needle in str(e.value)
