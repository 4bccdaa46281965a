"""Tier 1, coordination intelligence: goal decomposition, team formation and goal pursuit."""

from tierstack.server.coordinate.decompose import LocalProvider, SubtaskSpec
from tierstack.server.coordinate.engine import Coordinator, WorkflowRunner
from tierstack.server.coordinate.service import CoordinateService
from tierstack.server.coordinate.team import AgentSpec, Need, Team, form_team

__all__ = [
    "AgentSpec",
    "CoordinateService",
    "Coordinator",
    "LocalProvider",
    "Need",
    "SubtaskSpec",
    "Team",
    "WorkflowRunner",
    "form_team",
]
