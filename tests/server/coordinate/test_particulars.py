"""A goal's particulars and the re-binding of a past goal's subtasks to a new goal, as plain Python:
only whole particulars of the same kind are replaced, and a reuse that would leave the past goal's
particulars behind in another form is refused."""

from __future__ import annotations

from tierstack.core.values import to_struct
from tierstack.server.coordinate.memory import _adapted
from tierstack.server.coordinate.particulars import MAX_REBOUND, Kind, rebinding, shape, tokens
from tierstack.v1 import coordinator_service_pb2 as pb


def adapt(past: str, new: str, *texts: str, **parameters: object) -> list[str] | None:
    """Returns the descriptions of ``texts`` (learnt for ``past``) re-bound to ``new``; None when refused."""
    subtasks = [pb.Subtask(id=f"s{n}", description=text) for n, text in enumerate(texts)]
    if parameters:
        subtasks[0].parameters.CopyFrom(to_struct(parameters))
    found = _adapted(tokens(new), [(past, subtasks)])
    return None if found is None else [s.description for s in found.subtasks]


def test_particulars_are_told_by_kind() -> None:
    kinds = {t.text: t.kind for t in tokens("Fetch https://x.org/a for Alice in French on March 3, 2024: 'draft' Q2")}
    assert kinds["https://x.org/a"] is Kind.URL and kinds["Alice"] is Kind.NAME and kinds["French"] is Kind.LANGUAGE
    assert kinds["March 3, 2024"] is Kind.DATE and kinds["'draft'"] is Kind.QUOTED and kinds["Q2"] is Kind.NUMBER
    assert kinds["Fetch"] is Kind.WORD  # a capital that begins a sentence names nothing
    assert shape(tokens("Fetch the https://x.org/a for Alice!")) == "fetch <url> for <name>"


def test_goals_apart_in_more_than_particulars_have_no_rebinding() -> None:
    assert rebinding(tokens("write a report"), tokens("write a report in French")) is None
    assert rebinding(tokens("compare Alice and Bob"), tokens("compare Alice and 7")) is None  # a name is no number
    assert rebinding(tokens("mail Ann and Ann"), tokens("mail Ann and Eve")) is None  # one stands for two


def test_only_whole_particulars_of_the_same_kind_are_rebound() -> None:
    # "us" is not "US" re-cased: left as it is, it stands where the past goal's particular could.
    assert adapt("report the US sales", "report the UK sales", "report the US sales", "write us a summary") is None
    assert adapt("report the US sales", "report the UK sales", "report the US sales") == ["report the UK sales"]
    # A number inside a URL that did not change stays as it is.
    past, new = "check https://a.com/2024 for 2024", "check https://a.com/2024 for 2025"
    assert adapt(past, new, "open https://a.com/2024 and count 2024") == ["open https://a.com/2024 and count 2025"]
    # A word that spells the name at the start of a sentence is not the name: the reuse is refused.
    assert adapt("send the report to Mark", "send the report to Jane", "Mark the report as final; send to Mark") is None
    assert adapt("send the report to Mark", "send the report to Jane", "send it to Mark") == ["send it to Jane"]


def test_a_particular_left_in_another_form_refuses_the_reuse() -> None:
    assert adapt("pay invoice 1,000", "pay invoice 2,000", "pay invoice 1,000", amount=1000) is None
    assert adapt("say 'hello'", "say 'goodbye'", "say 'hello'", "then hello again") is None
    assert adapt("say 'hello'", "say 'goodbye'", "say 'hello'") == ["say 'goodbye'"]
    assert adapt("summarise the report for Alice", "summarise the report for Bob", "summarise it") is None  # unnamed


def test_swapped_particulars_are_swapped_in_the_subtasks() -> None:
    assert adapt("compare Alice with Bob", "compare Bob with Alice", "Alice vs Bob") is None  # "Alice" begins it
    assert adapt("compare Alice with Bob", "compare Bob with Alice", "compare Alice with Bob") == [
        "compare Bob with Alice"
    ]


def test_goals_far_apart_in_particulars_are_planned_afresh() -> None:
    many = MAX_REBOUND + 1
    past = " ".join(f"n{i}x" for i in range(many))
    new = " ".join(f"m{i}y" for i in range(many))
    assert adapt(past, new, past) is None
