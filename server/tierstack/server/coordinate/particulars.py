"""A goal's particulars (URLs, addresses, quoted text, dates, numbers and ids, names, languages) and
the re-binding of a past goal's decomposition to a new goal that differs from it in those alone.

Two goals are told apart token by token: words must match (but for case and a few fillers such as
articles and closing punctuation) and each particular of the past goal must face a particular of the
same kind in the new one. Anything else, a word more, a word changed, particulars in another order
or of another kind, is a difference of substance, and the past decomposition is not re-bound.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum

from tierstack.core.values import JSON
from tierstack.server.coordinate.decompose import URL


class Kind(Enum):
    """What a token of a goal is."""

    WORD = "word"
    URL = "url"
    ADDRESS = "address"
    QUOTED = "quoted"
    DATE = "date"
    NUMBER = "number"  # numbers and ids that hold a digit: 42, 3.5, Q2, INV-2024-07
    NAME = "name"  # a capitalised word that does not begin a sentence
    LANGUAGE = "language"


_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
    r"sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)"
)
_DAY = r"(?:mon|tues|wednes|thurs|fri|satur|sun)day"
_TOKEN = re.compile(
    "|".join(
        (
            rf"(?P<url>{URL.pattern})",
            r"(?P<address>[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8})",
            r"(?P<quoted>\"[^\"\n]{0,256}\"|“[^”\n]{0,256}”|(?<!\w)'[^'\n]{0,256}'(?!\w))",
            r"(?P<date>\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?)?|\d{1,2}/\d{1,2}/\d{2,4}"
            rf"|{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?(?!\w)"
            rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTH}(?:\s+\d{{4}})?(?!\w)|{_MONTH}\s+\d{{4}}(?!\w)|{_DAY}(?!\w))",
            r"(?P<number>[-+]?\d+(?:[.,]\d+)*%?(?![\w-])|\w*\d[\w]*(?:[-_/.]\w+)*)",
            r"(?P<word>\w+(?:['\u2019]\w+)*)",
            r"(?P<mark>\S)",
        )
    ),
    re.IGNORECASE,
)
# Months and days written out are dates alone too ("the sales of March"); "may" is a word.
_DATE_WORDS = frozenset(
    [
        "january",
        "february",
        "march",
        "april",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ]
)
_LANGUAGES = frozenset(
    [
        "arabic",
        "bengali",
        "chinese",
        "czech",
        "danish",
        "dutch",
        "english",
        "finnish",
        "french",
        "german",
        "greek",
        "hebrew",
        "hindi",
        "hungarian",
        "indonesian",
        "italian",
        "japanese",
        "korean",
        "malay",
        "mandarin",
        "norwegian",
        "persian",
        "polish",
        "portuguese",
        "romanian",
        "russian",
        "spanish",
        "swahili",
        "swedish",
        "thai",
        "turkish",
        "ukrainian",
        "urdu",
        "vietnamese",
    ]
)
#: The most particulars a past goal's decomposition is re-bound in; goals further apart are planned afresh.
MAX_REBOUND = 32
# Words whose presence or absence changes nothing a decomposition does.
_FILLERS = frozenset({"a", "an", "the", ".", "!", "?", ","})
# Marks after which a capitalised word begins a sentence rather than naming something.
_SENTENCE_ENDS = frozenset({".", "!", "?", ";", ":"})


@dataclass(frozen=True, slots=True)
class Token:
    """One token of a goal: its kind and its text as written."""

    kind: Kind
    text: str

    @property
    def key(self) -> tuple[Kind, str]:
        """What must be equal in two goals that differ in particulars alone."""
        return (self.kind, "" if self.kind is not Kind.WORD else self.text.lower())


def tokens(text: str) -> list[Token]:
    """Returns the tokens of ``text`` that matter, fillers left out."""
    return [token for token, _ in _read(text) if token.kind is not Kind.WORD or token.text.lower() not in _FILLERS]


def _read(text: str) -> Iterator[tuple[Token, re.Match[str]]]:
    """Yields every token of ``text`` with where it stands."""
    sentence_start, end = True, 0
    for match in _TOKEN.finditer(text):
        group, value = match.lastgroup, match.group()
        sentence_start |= "\n" in text[end : match.start()]
        end = match.end()
        if group == "mark":
            sentence_start = value in _SENTENCE_ENDS
            kind = Kind.WORD
        elif group == "word":
            if value.lower() in _LANGUAGES:
                kind = Kind.LANGUAGE
            elif value.lower() in _DATE_WORDS:
                kind = Kind.DATE
            elif value[0].isupper() and not sentence_start:
                kind = Kind.NAME
            else:
                kind = Kind.WORD
            sentence_start = False
        else:
            kind = Kind(group)
            sentence_start = False
        yield Token(kind, value), match


def shape(found: Sequence[Token]) -> str:
    """Returns what two goals that differ in particulars alone have in common: the words of a goal's
    ``found`` tokens (in lower case) with each particular replaced by its kind."""
    return " ".join(token.key[1] if token.kind is Kind.WORD else f"<{token.kind.value}>" for token in found)


def rebinding(past: Sequence[Token], new: Sequence[Token]) -> dict[Token, str] | None:
    """Returns how the particulars of a past goal map onto a new goal's (those that differ), or None
    when the two goals differ in more than particulars."""
    if len(past) != len(new):
        return None
    mapping: dict[Token, str] = {}
    for old, fresh in zip(past, new, strict=True):
        if old.key != fresh.key:
            return None
        if old.kind is Kind.WORD:
            continue
        if mapping.setdefault(old, fresh.text) != fresh.text:
            return None  # one particular of the past goal stands for two of the new one
    changed = {old: fresh for old, fresh in mapping.items() if old.text != fresh}
    return changed if len(changed) <= MAX_REBOUND else None


class Rebinder:
    """Writes a new goal's particulars where a past goal's stood, in every text of a decomposition.

    Texts are read token by token as goals are, and only whole tokens of the same kind are replaced,
    as written: a number inside a URL, a capitalised word that begins a sentence, or a word that
    spells a name in another case stays as it is (and then :meth:`stale` finds it). Particulars
    swapped between the goals are swapped in the subtasks too.
    """

    def __init__(self, mapping: dict[Token, str]) -> None:
        self._mapping = mapping
        self._used: set[Token] = set()
        # The forms a particular of the past goal may stand in without being a whole token of its own.
        self._stale = {_bare(old.text) for old in mapping} - {_bare(fresh) for fresh in mapping.values()}
        numbers = {_number(old.text) for old in mapping} - {_number(fresh) for fresh in mapping.values()}
        self._stale_numbers = numbers - {None}

    @property
    def unused(self) -> set[Token]:
        """Returns the particulars of the past goal not found in any text re-bound so far."""
        return set(self._mapping) - self._used

    def text(self, text: str) -> str:
        """Returns ``text`` re-bound."""
        if not self._mapping:
            return text
        parts, end = [], 0
        for token, match in _read(text):
            fresh = self._mapping.get(token)
            if fresh is not None:
                self._used.add(token)
                parts += [text[end : match.start()], fresh]
                end = match.end()
        return "".join([*parts, text[end:]])

    def value(self, value: JSON) -> JSON:
        """Returns a JSON value with every string in it re-bound."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def stale(self, value: JSON) -> bool:
        """Tells whether a re-bound JSON value still holds a particular of the past goal in another
        form (a quoted text without its quotes, a number as a JSON number or written otherwise)."""
        if isinstance(value, str):
            return any(
                _bare(found.group()) in self._stale or _number(found.group()) in self._stale_numbers
                for found in _TOKEN.finditer(value)
            )
        if isinstance(value, dict):
            return any(self.stale(item) for item in value.values())
        if isinstance(value, list):
            return any(self.stale(item) for item in value)
        return isinstance(value, int | float) and not isinstance(value, bool) and value in self._stale_numbers


def _bare(text: str) -> str:
    return text.strip("\"'“”").lower()


_DECIMAL = re.compile(r"[-+]?\d{1,30}(?:\.\d{1,30})?")


def _number(text: str) -> float | None:
    plain = text.replace(",", "").removesuffix("%")
    return float(plain) if _DECIMAL.fullmatch(plain) else None
