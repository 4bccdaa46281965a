"""Goal similarity: character n-gram TF-IDF (no dependencies, the default) or a model's embeddings
(any OpenAI-compatible ``/embeddings`` endpoint), compared by cosine."""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol

import numpy as np
from scipy import sparse

_SPACES = re.compile(r"\s+")


class GoalIndex(Protocol):
    """Finds the stored goals most like a new one."""

    async def add(self, entries: Sequence[tuple[str, str]]) -> None:
        """Stores each (key, text) pair (a key added again replaces its text)."""

    async def remove(self, keys: Collection[str]) -> None:
        """Forgets the given keys; keys not stored are ignored."""

    async def similar(self, text: str, *, limit: int = 5, prefix: str = "") -> list[tuple[str, float]]:
        """Returns up to ``limit`` (key, similarity in [0, 1]) pairs of the keys starting with
        ``prefix``, most similar first."""
        ...


def _grams(text: str, n: int) -> Counter[str]:
    normal = f" {_SPACES.sub(' ', text.lower()).strip()} "
    return Counter(normal[i : i + n] for i in range(max(len(normal) - n + 1, 1)))


class _Growing:
    """A numpy array that grows along its first axis by doubling, so that appends cost amortised O(1)."""

    def __init__(self, dtype: Any, width: int = 0) -> None:
        self._array = np.zeros((16, width) if width else 16, dtype=dtype)
        self.size = 0

    @property
    def values(self) -> np.ndarray:
        """Returns the filled part, a view (valid until the next append)."""
        return self._array[: self.size]

    def extend(self, values: Any) -> None:
        """Appends ``values`` along the first axis."""
        values = np.asarray(values, dtype=self._array.dtype)
        end = self.size + len(values)
        if end > len(self._array):
            grown = np.zeros((max(end, 2 * len(self._array)), *self._array.shape[1:]), dtype=self._array.dtype)
            grown[: self.size] = self._array[: self.size]
            self._array = grown
        self._array[self.size : end] = values
        self.size = end


class _Rows:
    """Which row of an index's matrix holds which key. A removed key's row stays, dead, until the
    dead rows outnumber the live ones; then the index compacts, so the matrix never holds more than
    twice the live rows (and at least 64)."""

    def __init__(self) -> None:
        self.keys: list[str] = []  # by row
        self.by_key: dict[str, int] = {}
        self._alive = _Growing(np.bool_)

    def append(self, key: str) -> int:
        """Returns the row given to ``key`` (after the last)."""
        row = self.by_key[key] = len(self.keys)
        self.keys.append(key)
        self._alive.extend([True])
        return row

    def release(self, key: str) -> int | None:
        """Returns the row ``key`` held, now dead; None when it held none."""
        row = self.by_key.pop(key, None)
        if row is not None:
            self._alive.values[row] = False
        return row

    @property
    def alive(self) -> np.ndarray:
        """Returns, by row, whether it is live."""
        return self._alive.values

    @property
    def crowded(self) -> bool:
        """Returns whether the dead rows outnumber the live ones (and are worth compacting)."""
        return len(self.keys) > max(2 * len(self.by_key), 64)

    def compact(self) -> None:
        """Renumbers the live rows from 0, in order (the caller drops the dead rows likewise)."""
        self.keys = [key for key, alive in zip(self.keys, self.alive.tolist(), strict=True) if alive]
        self.by_key = {key: row for row, key in enumerate(self.keys)}
        self._alive = _Growing(np.bool_)
        self._alive.extend(np.ones(len(self.keys), dtype=np.bool_))


def _best(rows: _Rows, scores: np.ndarray, limit: int, prefix: str) -> list[tuple[str, float]]:
    """Returns the ``limit`` live rows whose keys start with ``prefix`` with the highest scores (ties in
    row order), with their keys."""
    live = np.flatnonzero(rows.alive)
    if prefix:
        live = live[[rows.keys[row].startswith(prefix) for row in live.tolist()]]
    ranked = live[np.argsort(-scores[live], kind="stable")[:limit]]
    return [(rows.keys[row], float(scores[row])) for row in ranked.tolist()]


#: How much of a goal's text is compared: its first characters. A goal of the longest kind costs the
#: index no more than this.
INDEXED_CHARACTERS = 512
#: How many columns n-grams are hashed into: the index's width, whatever the vocabulary of its goals.
COLUMNS = 1 << 18


def _columns(text: str, n: int) -> Counter[int]:
    """Returns the n-gram counts of a goal's compared prefix, by the column each n-gram hashes to (a
    stable hash: the same text gets the same columns in every process)."""
    grams = _grams(text[:INDEXED_CHARACTERS], n)
    columns: Counter[int] = Counter()
    for gram, count in grams.items():
        columns[zlib.crc32(gram.encode()) & (COLUMNS - 1)] += count
    return columns


class NgramIndex:
    """Character n-gram TF-IDF with cosine similarity; IDF is computed over the stored goals.

    Each goal's n-gram counts (of its first ``INDEXED_CHARACTERS`` characters, hashed into
    ``COLUMNS`` columns, so that neither long goals nor an odd alphabet can grow the index) are kept
    once, as a row of a sparse matrix; a search weighs them by the current IDF and scores every goal
    with one sparse product (and their norms with another), so it costs time linear in the stored
    n-grams, with no Python work per goal. Memory is at most about 16 bytes per indexed character.

    Args:
        n: The n-gram length.
    """

    def __init__(self, *, n: int = 3) -> None:
        self._n = n
        self._rows = _Rows()
        self._frequency = np.zeros(COLUMNS, dtype=np.int64)  # by column: how many live goals have it
        self._row_starts = _Growing(np.int64)  # by row, then one past the last: CSR ``indptr``
        self._row_starts.extend([0])
        self._columns = _Growing(np.int64)  # CSR ``indices``
        self._counts = _Growing(np.float64)  # CSR ``data``: each column's count in its goal

    async def add(self, entries: Sequence[tuple[str, str]]) -> None:
        for key, text in entries:
            self._forget(key)
            found = _columns(text, self._n)
            columns = np.fromiter(found.keys(), dtype=np.int64, count=len(found))
            self._frequency[columns] += 1
            self._rows.append(key)
            self._columns.extend(columns)
            self._counts.extend(list(found.values()))
            self._row_starts.extend([self._columns.size])
        if self._rows.crowded:
            self._compact()

    async def remove(self, keys: Collection[str]) -> None:
        for key in keys:
            self._forget(key)
        if self._rows.crowded:
            self._compact()

    def _forget(self, key: str) -> None:
        row = self._rows.release(key)
        if row is not None:
            start, end = self._row_starts.values[row : row + 2]
            self._frequency[self._columns.values[start:end]] -= 1
            self._counts.values[start:end] = 0  # a dead row scores 0 until it is compacted away

    def _compact(self) -> None:
        """Drops the dead rows."""
        alive = self._rows.alive.copy()
        lengths = np.diff(self._row_starts.values)
        keep = np.repeat(alive, lengths)
        self._rows.compact()
        columns, counts = self._columns.values[keep], self._counts.values[keep]
        self._columns, self._counts = _Growing(np.int64), _Growing(np.float64)
        self._columns.extend(columns)
        self._counts.extend(counts)
        self._row_starts = _Growing(np.int64)
        self._row_starts.extend(np.concatenate([[0], np.cumsum(lengths[alive])]))

    async def similar(self, text: str, *, limit: int = 5, prefix: str = "") -> list[tuple[str, float]]:
        documents = len(self._rows.by_key)
        if not documents:
            return []
        # Smoothed IDF with one added (as scikit-learn does), so that with few stored goals a
        # near-duplicate is not pushed apart by the handful of n-grams it adds.
        idf = np.log((1 + documents) / (1 + self._frequency)) + 1
        found = _columns(text, self._n)
        columns = np.fromiter(found.keys(), dtype=np.int64, count=len(found))
        weights = np.fromiter(found.values(), dtype=np.float64, count=len(found)) * idf[columns]
        shape = (len(self._rows.keys), COLUMNS)
        counts = sparse.csr_array((self._counts.values, self._columns.values, self._row_starts.values), shape=shape)
        squares = sparse.csr_array((self._counts.values**2, self._columns.values, self._row_starts.values), shape=shape)
        query = np.zeros(COLUMNS)
        query[columns] = weights * idf[columns]
        dots = counts @ query
        norms = np.sqrt(squares @ (idf * idf)) * math.sqrt(float(weights @ weights))
        scores = np.minimum(dots / np.where(norms == 0, 1.0, norms), 1.0)
        return _best(self._rows, scores, limit, prefix)


Embed = Callable[[Sequence[str]], Awaitable[list[list[float]]]]


class EmbeddingIndex:
    """Goals as a model's embeddings, compared by cosine similarity.

    Args:
        embed: Returns one vector per text (``OpenAICompatibleModel.embed``, say).
    """

    def __init__(self, embed: Embed) -> None:
        self._embed = embed
        self._rows = _Rows()
        self._vectors: _Growing | None = None  # unit vectors by row; sized by the first embedding

    async def add(self, entries: Sequence[tuple[str, str]]) -> None:
        if not entries:
            return
        vectors = _unit(np.asarray(await self._embed([text for _, text in entries]), dtype=float))
        if self._vectors is None:
            self._vectors = _Growing(np.float64, vectors.shape[1])
        for (key, _), vector in zip(entries, vectors, strict=True):
            row = self._rows.by_key.get(key)
            if row is None:
                self._rows.append(key)
                self._vectors.extend([vector])
            else:
                self._vectors.values[row] = vector

    async def remove(self, keys: Collection[str]) -> None:
        for key in keys:
            self._rows.release(key)
        if self._vectors is not None and self._rows.crowded:
            vectors = self._vectors.values[self._rows.alive]
            self._rows.compact()
            self._vectors = _Growing(np.float64, vectors.shape[1])
            self._vectors.extend(vectors)

    async def similar(self, text: str, *, limit: int = 5, prefix: str = "") -> list[tuple[str, float]]:
        if self._vectors is None or not self._rows.by_key:
            return []
        query = _unit(np.asarray(await self._embed([text]), dtype=float))[0]
        return _best(self._rows, np.clip(self._vectors.values @ query, 0.0, 1.0), limit, prefix)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)
