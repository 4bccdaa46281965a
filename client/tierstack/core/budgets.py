"""Budgets as people read them: the warnings a run or a goal gives as it uses up its limits."""

from __future__ import annotations

from tierstack.v1 import common_pb2


def describe_warning(warning: common_pb2.BudgetWarning) -> str:
    """Describes a budget warning, such as ``80 % of the tokens used: 85 of 100``."""
    if warning.budget == "duration":
        return f"{warning.percent} % of the time used: {warning.used:.3g} s of {warning.limit:g} s"
    return f"{warning.percent} % of the {warning.budget.replace('_', ' ')} used: {warning.used:g} of {warning.limit:g}"
