"""Language identification for scoring behaviour.

Some distillation tasks teach a behaviour whose success is the language of the answer:
the system-prompt demo distils "Always answer in French, whatever the language of the
question." into the weights, and is scored by the fraction of answers (to English
questions) that come out in French. This module provides that check, built on the
`langid <https://github.com/saffsd/langid.py>`_ library (an offline n-gram Naive Bayes
classifier shipped with its own model).

Model answers are not clean prose, so :func:`detect_language` first removes what carries
no language signal -- fenced code blocks (including one left unclosed by a truncated
generation), inline code, URLs and numbers -- and refuses to guess (returns ``None``) when
fewer than :data:`MIN_WORDS` alphabetic words remain. langid is restricted to
:data:`LANGUAGES`, a small set of common languages; on short texts the full 97-language
model often picks an obscure neighbour (Galician for Portuguese, Occitan for French, ...),
and a restricted set makes its decisions far more reliable for our purpose.

Building a langid identifier decodes and unpickles its model, which takes a few seconds,
so one identifier is built lazily on first use and cached for the process.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from langid.langid import LanguageIdentifier

__all__ = [
    "LANGUAGES",
    "MIN_WORDS",
    "detect_language",
    "is_language",
    "language_rate",
    "strip_non_prose",
]

#: ISO 639-1 codes langid may answer with.
LANGUAGES: tuple[str, ...] = ("en", "fr", "es", "de", "it", "pt", "nl", "zh", "ja", "ru")

#: Fewest alphabetic words (after stripping) for which a language is reported.
MIN_WORDS = 3

# A fenced block: ```lang ... ``` (or ~~~), or an opening fence with no closing one (a
# generation cut off inside a code block), which runs to the end of the text.
_FENCED = re.compile(r"(```|~~~).*?(?:\1|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_URL = re.compile(r"(?:\b[a-z][a-z0-9+.-]*://|\bwww\.)\S+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
# Numbers, including 3.14, 1,000, 25%, 2nd, 10x (digits glued to a short unit or suffix).
_NUMBER = re.compile(r"[+-]?\d[\d.,:/]*(?:%|[^\W\d_]{1,2}\b)?")
# A run of letters, optionally joined by apostrophes or hyphens (l'eau, peut-être).
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
# Scripts written without spaces between words: count each character as a word.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")

_identifier: LanguageIdentifier | None = None
_identifier_lock = threading.Lock()


def _get_identifier() -> LanguageIdentifier:
    """Return the cached langid identifier restricted to :data:`LANGUAGES`, building it once."""
    global _identifier
    if _identifier is None:
        with _identifier_lock:
            if _identifier is None:
                from langid.langid import LanguageIdentifier, model

                identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
                identifier.set_languages(list(LANGUAGES))
                _identifier = identifier
    return _identifier


def strip_non_prose(text: str) -> str:
    """Remove code blocks, inline code, URLs, e-mail addresses and numbers from ``text``."""
    text = _FENCED.sub(" ", text)
    text = _INLINE_CODE.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _EMAIL.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def _count_words(text: str) -> int:
    """Count alphabetic words; each CJK character counts as one word."""
    count = 0
    for word in _WORD.findall(text):
        cjk = len(_CJK.findall(word))
        count += cjk if cjk else 1
        if cjk and cjk < len(word):
            # Mixed run such as "Python的": count the non-CJK letters as one more word.
            count += 1
    return count


def detect_language(text: str) -> str | None:
    """Return the ISO 639-1 code of the language ``text`` is written in, or ``None``.

    Code, URLs and numbers are removed first; ``None`` means fewer than :data:`MIN_WORDS`
    alphabetic words remain (an empty, code-only or numeric answer), so no language can be
    identified. Otherwise the answer is one of :data:`LANGUAGES`.
    """
    prose = strip_non_prose(text)
    if _count_words(prose) < MIN_WORDS:
        return None
    lang, _ = _get_identifier().classify(prose)
    return str(lang)


def is_language(text: str, lang: str) -> bool:
    """Whether ``text`` is identified as language ``lang`` (``False`` when undetectable)."""
    return detect_language(text) == lang


def language_rate(texts: Iterable[str], lang: str) -> float:
    """Fraction of ``texts`` identified as ``lang``; undetectable texts count as misses.

    Returns ``0.0`` for an empty collection.
    """
    items = list(texts)
    if not items:
        return 0.0
    return sum(is_language(text, lang) for text in items) / len(items)
