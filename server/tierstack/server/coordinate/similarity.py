"""Goal similarity: character n-gram TF-IDF (no dependencies, the default) or a model's embeddings
(any OpenAI-compatible ``/embeddings`` endpoint), compared by cosine."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import numpy as np

_SPACES = re.compile(r"\s+")


class GoalIndex(Protocol):
    """Finds the stored goals most like a new one."""

    async def add(self, entries: Sequence[tuple[str, str]]) -> None:
        """Stores each (key, text) pair (a key added again replaces its text)."""

    async def similar(self, text: str, *, limit: int = 5) -> list[tuple[str, float]]:
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

    async def add(self, entries: Sequence[tuple[str, str]]) -> None:
        for key, text in entries:
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

    async def similar(self, text: str, *, limit: int = 5) -> list[tuple[str, float]]:
        query = self._vector(_grams(text, self._n))
        scored = []
        for key, grams in self._texts.items():
            vector = self._vector(grams)
            score = sum(weight * vector.get(g, 0.0) for g, weight in query.items())
            scored.append((key, min(score, 1.0)))
        scored.sort(key=lambda pair: pair[1], reverse=True)
        return scored[:limit]


Embed = Callable[[Sequence[str]], Awaitable[list[list[float]]]]


class EmbeddingIndex:
    """Goals as a model's embeddings, compared by cosine similarity.

    Args:
        embed: Returns one vector per text (``OpenAICompatibleModel.embed``, say).
    """

    def __init__(self, embed: Embed) -> None:
        self._embed = embed
        self._keys: list[str] = []
        self._rows: dict[str, int] = {}
        self._vectors = np.zeros((0, 0))

    async def add(self, entries: Sequence[tuple[str, str]]) -> None:
        if not entries:
            return
        vectors = _unit(np.asarray(await self._embed([text for _, text in entries]), dtype=float))
        if not self._keys:
            self._vectors = np.zeros((0, vectors.shape[1]))
        fresh: list[tuple[str, np.ndarray]] = []
        for (key, _), vector in zip(entries, vectors, strict=True):
            row = self._rows.get(key)
            if row is None:
                self._rows[key] = len(self._keys) + len(fresh)
                fresh.append((key, vector))
            else:
                self._vectors[row] = vector
        if fresh:
            self._keys += [key for key, _ in fresh]
            self._vectors = np.vstack([self._vectors, [vector for _, vector in fresh]])

    async def similar(self, text: str, *, limit: int = 5) -> list[tuple[str, float]]:
        if not self._keys:
            return []
        query = _unit(np.asarray(await self._embed([text]), dtype=float))[0]
        scores = np.clip(self._vectors @ query, 0.0, 1.0)
        best = np.argsort(-scores)[:limit]
        return [(self._keys[i], float(scores[i])) for i in best.tolist()]


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)
