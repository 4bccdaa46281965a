"""Goal similarity without dependencies: character n-gram TF-IDF vectors compared by cosine."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Protocol

_SPACES = re.compile(r"\s+")


class GoalIndex(Protocol):
    """Finds the stored goals most like a new one; a pluggable seam (an embedding index fits too)."""

    def add(self, key: str, text: str) -> None:
        """Stores ``text`` under ``key`` (a key added again replaces its text)."""

    def similar(self, text: str, *, limit: int = 5) -> list[tuple[str, float]]:
        """Returns up to ``limit`` (key, similarity in [0, 1]) pairs, most similar first."""
        ...


def _grams(text: str, n: int) -> Counter[str]:
    normal = f" {_SPACES.sub(' ', text.lower()).strip()} "
    return Counter(normal[i : i + n] for i in range(max(len(normal) - n + 1, 1)))


class NgramIndex:
    """Character n-gram TF-IDF with cosine similarity; IDF is computed over the stored goals.

    Args:
        n: The n-gram length.
    """

    def __init__(self, *, n: int = 3) -> None:
        self._n = n
        self._texts: dict[str, Counter[str]] = {}
        self._document_frequency: Counter[str] = Counter()

    def add(self, key: str, text: str) -> None:
        previous = self._texts.get(key)
        if previous is not None:
            self._document_frequency.subtract(previous.keys())
        grams = _grams(text, self._n)
        self._texts[key] = grams
        self._document_frequency.update(grams.keys())

    def _vector(self, grams: Counter[str]) -> dict[str, float]:
        # Smoothed IDF with one added (as scikit-learn does), so that with few stored goals a
        # near-duplicate is not pushed apart by the handful of n-grams it adds.
        documents = len(self._texts)
        frequency = self._document_frequency
        vector = {g: count * (math.log((1 + documents) / (1 + frequency[g])) + 1) for g, count in grams.items()}
        norm = math.sqrt(sum(weight * weight for weight in vector.values())) or 1.0
        return {g: weight / norm for g, weight in vector.items()}

    def similar(self, text: str, *, limit: int = 5) -> list[tuple[str, float]]:
        query = self._vector(_grams(text, self._n))
        scored = []
        for key, grams in self._texts.items():
            vector = self._vector(grams)
            score = sum(weight * vector.get(g, 0.0) for g, weight in query.items())
            scored.append((key, min(score, 1.0)))
        scored.sort(key=lambda pair: pair[1], reverse=True)
        return scored[:limit]
