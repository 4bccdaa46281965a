"""The ``tierstack`` command line: serve the tiers, bring the stack up, run workflows and goals."""

from tierstack.cli.main import main

__all__ = ["main"]
