"""Tier 1, coordination intelligence: goal decomposition, team formation and goal pursuit."""

from tierstack.server.coordinate.decompose import LocalProvider, SubtaskSpec
from tierstack.server.coordinate.decomposer import Decomposer
from tierstack.server.coordinate.engine import Coordinator, WorkflowRunner
from tierstack.server.coordinate.journal import GoalJournal
from tierstack.server.coordinate.memory import GoalMemory
from tierstack.server.coordinate.similarity import EmbeddingIndex, GoalIndex, NgramIndex
from tierstack.server.coordinate.store import GoalStore, MemoryGoalStore, SqliteGoalStore, Written
from tierstack.server.coordinate.team import AgentSpec, Need, Team, form_team
from tierstack.server.coordinate.templates import GoalTemplate, load_templates

__all__ = [
    "AgentSpec",
    "Coordinator",
    "Decomposer",
    "EmbeddingIndex",
    "GoalIndex",
    "GoalJournal",
    "GoalMemory",
    "GoalStore",
    "GoalTemplate",
    "LocalProvider",
    "MemoryGoalStore",
    "Need",
    "NgramIndex",
    "SqliteGoalStore",
    "SubtaskSpec",
    "Team",
    "WorkflowRunner",
    "Written",
    "form_team",
    "load_templates",
]
