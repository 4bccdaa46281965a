"""Strategy selection: the strategy asked for, then policy overrides, then graduation by the step's
track record. Plain Python; every substitution carries its reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from cachetools import LRUCache

from tierstack.core.values import JSON
from tierstack.v1 import common_pb2

DETERMINISTIC = common_pb2.STRATEGY_DETERMINISTIC
CONVERSATIONAL = common_pb2.STRATEGY_CONVERSATIONAL
REASONING = common_pb2.STRATEGY_REASONING

#: Conversational steps move to reasoning once this share of at least this many runs succeeded.
TO_REASONING = (0.80, 10)
#: Reasoning steps of low complexity move to deterministic once this share of this many succeeded.
TO_DETERMINISTIC = (0.95, 50)
#: The highest complexity counted as low.
LOW_COMPLEXITY = 3
#: Steps that must finish sooner than this many seconds run deterministically.
QUICK_SECONDS = 5.0
#: Steps whose budget is below this many credits reason instead of conversing.
FRUGAL_CREDITS = 0.01
#: How many track records (a step and prompt under one strategy) are kept; the least recently used go.
KEPT_RECORDS = 10_000

Routine = tuple[tuple[str, dict[str, JSON]], ...]
StrategyType: TypeAlias = common_pb2.Strategy.ValueType


def name(strategy: StrategyType) -> str:
    """Returns a strategy's name in lower case, such as ``conversational``."""
    return common_pb2.Strategy.Name(strategy).removeprefix("STRATEGY_").lower()


@dataclass(slots=True)
class TrackRecord:
    """How a step has fared under one strategy, and the tool calls of its latest success."""

    runs: int = 0
    successes: int = 0
    routine: Routine = ()

    def add(self, *, success: bool, routine: Routine = ()) -> None:
        """Records one run."""
        self.runs += 1
        if success:
            self.successes += 1
            if routine:
                self.routine = routine

    def earned(self, threshold: tuple[float, int]) -> bool:
        """Returns whether at least ``threshold[1]`` runs succeeded at the rate ``threshold[0]``."""
        rate, runs = threshold
        return self.runs >= runs and self.successes >= rate * self.runs


@dataclass(frozen=True, slots=True)
class Selection:
    """The strategy a step runs with, and why it differs from the one asked for ("" when it does not)."""

    requested: StrategyType
    chosen: StrategyType
    reason: str = ""
    routine: Routine = ()


@dataclass(slots=True)
class StrategySelector:
    """Chooses strategies and keeps each step's track record per strategy (the
    :data:`KEPT_RECORDS` most recently used)."""

    records: LRUCache[tuple[str, StrategyType], TrackRecord] = field(default_factory=lambda: LRUCache(KEPT_RECORDS))

    def record(self, step_key: str, strategy: StrategyType) -> TrackRecord:
        """Returns the track record of ``step_key`` under ``strategy``."""
        return self.records.setdefault((step_key, strategy), TrackRecord())

    def select(
        self,
        *,
        step_key: str,
        requested: StrategyType,
        has_calls: bool,
        sensitive: bool,
        max_seconds: float | None,
        max_credits: float,
        complexity: int,
    ) -> Selection:
        """Returns the strategy for a step.

        The request's strategy stands (unspecified means deterministic for a step with tool calls,
        conversational for one with only a prompt) unless, in order: the step handles sensitive data
        (deterministic, always), must finish in under 5 s (deterministic, when its calls are known),
        may spend under 0.01 credits (reasoning instead of conversing), or its track record has earned a graduation
        (conversational → reasoning at ≥ 80 % of ≥ 10 runs; reasoning → deterministic at ≥ 95 % of
        ≥ 50 runs for complexity ≤ 3, replaying the tool calls of its latest success).
        """
        asked: StrategyType = requested or (DETERMINISTIC if has_calls else CONVERSATIONAL)
        reasoning_record = self.records.get((step_key, REASONING))
        routine = reasoning_record.routine if reasoning_record is not None else ()
        runnable = has_calls or bool(routine)
        chosen, reason = asked, ""
        if chosen != DETERMINISTIC and sensitive:  # never a model, even without known calls
            chosen, reason = DETERMINISTIC, "the step handles sensitive data"
        elif chosen != DETERMINISTIC and runnable and max_seconds is not None and max_seconds < QUICK_SECONDS:
            chosen, reason = DETERMINISTIC, f"the step must finish within {max_seconds:g} s"
        elif chosen == CONVERSATIONAL and 0 < max_credits < FRUGAL_CREDITS:
            chosen, reason = REASONING, f"the step may spend only {max_credits:g} credits"
        elif chosen == CONVERSATIONAL and self.record(step_key, CONVERSATIONAL).earned(TO_REASONING):
            found = self.record(step_key, CONVERSATIONAL)
            chosen, reason = REASONING, f"graduated: {found.successes} of {found.runs} conversational runs succeeded"
        elif (
            chosen == REASONING
            and (complexity or 5) <= LOW_COMPLEXITY
            and routine
            and self.record(step_key, REASONING).earned(TO_DETERMINISTIC)
        ):
            found = self.record(step_key, REASONING)
            chosen = DETERMINISTIC
            reason = f"graduated: {found.successes} of {found.runs} reasoning runs succeeded; replaying their plan"
        return Selection(asked, chosen, reason, routine if chosen == DETERMINISTIC and not has_calls else ())
