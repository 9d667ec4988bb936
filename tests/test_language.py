"""Tests for :mod:`opcd.tasks.language` and the general-questions prompt set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from opcd.tasks import language
from opcd.tasks.language import detect_language, is_language, language_rate, strip_non_prose

DATA = Path(language.__file__).parent / "data" / "general_questions.jsonl"

FRENCH = [
    "Le ciel est bleu parce que l'air diffuse davantage la lumière bleue du soleil.",
    "Je vous propose de l'appeler Caramel, car ce nom évoque bien sa couleur orangée.",
    "Pour enlever une tache de café, rincez le tissu à l'eau froide puis frottez avec du savon.",
    "Une variable est un nom qui désigne une valeur stockée dans la mémoire de l'ordinateur.",
    "Oui, la tomate est un fruit.",
    "Non, le chocolat est toxique pour les chiens.",
    "Paris est la capitale de la France.",
    "C'est une bonne question.",
    "Buvez un verre d'eau lentement.",
    "Multipliez 40 par 0,75 : le prix soldé est de 30 dollars.",
    "Le Titanic a coulé en 1912 après avoir heurté un iceberg.",
    "Les chats ronronnent quand ils sont contents.",
    "Oui, bien sûr.",
]

ENGLISH = [
    "The sky looks blue because air scatters blue sunlight more than red sunlight.",
    "You could call her Marmalade, since the name matches her orange fur.",
    "A variable is a name that refers to a value stored in memory.",
    "Yes, a tomato is botanically a fruit.",
    "Try going to bed at the same time every night.",
    "Yes, of course.",
]


@pytest.mark.parametrize("text", FRENCH)
def test_french_answers_are_french(text: str) -> None:
    assert detect_language(text) == "fr"
    assert is_language(text, "fr")
    assert not is_language(text, "en")


@pytest.mark.parametrize("text", ENGLISH)
def test_english_answers_are_english(text: str) -> None:
    assert detect_language(text) == "en"
    assert is_language(text, "en")
    assert not is_language(text, "fr")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t",
        "42",
        "3.14159 + 2 = 5.14",
        "!!! ??? ...",
        "`x = 1`",
        "https://example.com/docs/index.html?lang=fr",
        "```python\nfor i in range(10):\n    print(i)\n```",
        "```\ndef add(a, b):\n    return a + b\n```\n\n```js\nconsole.log('bonjour le monde');\n```",
        # A generation cut off inside its code block: the unclosed fence runs to the end.
        "```python\ndef somme(liste):\n    return sum(liste)",
        "Bonjour !",
    ],
)
def test_undetectable_texts_are_none(text: str) -> None:
    assert detect_language(text) is None
    assert not is_language(text, "fr")
    assert not is_language(text, "en")


def test_code_block_does_not_decide_language() -> None:
    french_prose = (
        "Voici une fonction simple :\n"
        "```python\n"
        "def add(first_number, second_number):\n"
        "    # Return the sum of both numbers, the simplest possible example here.\n"
        "    return first_number + second_number\n"
        "```\n"
        "Elle renvoie la somme des deux nombres."
    )
    assert detect_language(french_prose) == "fr"

    english_prose = (
        "Here is a simple function:\n"
        "```python\n"
        "def ajoute(premier, second):\n"
        "    # Renvoie la somme des deux nombres, c'est l'exemple le plus simple.\n"
        "    return premier + second\n"
        "```\n"
        "It returns the sum of both numbers."
    )
    assert detect_language(english_prose) == "en"


def test_inline_code_and_urls_are_ignored() -> None:
    text = (
        "Utilisez `git commit --message 'update the README file'` pour enregistrer vos "
        "changements ; la documentation est sur https://git-scm.com/docs/git-commit."
    )
    assert detect_language(text) == "fr"
    stripped = strip_non_prose(text)
    assert "git" not in stripped
    assert "https" not in stripped


def test_other_languages() -> None:
    assert detect_language("Das ist ein kleines Haus am Rande der Stadt.") == "de"
    assert detect_language("Esto es una casa pequeña cerca del mar.") == "es"
    assert detect_language("地球是圆的，我们住在上面。") == "zh"
    assert detect_language("東京は日本の首都です。") == "ja"


def test_detection_is_restricted_to_common_languages() -> None:
    # Unrestricted langid calls this Maltese; restricted to LANGUAGES it is French.
    assert detect_language("Oui, bien sûr.") in language.LANGUAGES
    for text in FRENCH + ENGLISH:
        assert detect_language(text) in language.LANGUAGES


def test_language_rate() -> None:
    texts = [FRENCH[0], FRENCH[1], ENGLISH[0], "```\nprint(1)\n```"]
    assert language_rate(texts, "fr") == pytest.approx(0.5)
    assert language_rate(texts, "en") == pytest.approx(0.25)
    assert language_rate([], "fr") == 0.0
    assert language_rate(FRENCH, "fr") == 1.0


def test_identifier_is_cached() -> None:
    detect_language(FRENCH[0])
    first = language._identifier
    assert first is not None
    detect_language(ENGLISH[0])
    assert language._identifier is first


# --- the general-questions prompt set -------------------------------------------------


def _load_rows() -> list[dict[str, str]]:
    with DATA.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_general_questions_shape() -> None:
    rows = _load_rows()
    assert len(rows) == 320
    for row in rows:
        assert set(row) == {"id", "prompt"}
        assert re.fullmatch(r"gq-\d{4}", row["id"])
        assert row["prompt"] == row["prompt"].strip()
    ids = [row["id"] for row in rows]
    assert len(set(ids)) == 320
    assert ids == [f"gq-{i:04d}" for i in range(1, 321)]
    normalized = {re.sub(r"\W+", " ", row["prompt"].lower()).strip() for row in rows}
    assert len(normalized) == 320


def test_general_questions_lengths() -> None:
    for row in _load_rows():
        words = len(row["prompt"].split())
        assert 5 <= words <= 25, (row["id"], words, row["prompt"])


def test_general_questions_are_english() -> None:
    not_english = [
        (row["id"], detect_language(row["prompt"]), row["prompt"])
        for row in _load_rows()
        if detect_language(row["prompt"]) != "en"
    ]
    assert not_english == []


def test_general_questions_do_not_name_a_language() -> None:
    pattern = re.compile(r"\b(french|english|spanish|german|italian|translate)\b", re.IGNORECASE)
    offenders = [row["prompt"] for row in _load_rows() if pattern.search(row["prompt"])]
    assert offenders == []
