"""Workflow checks, templates and the planner, as plain Python."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.server.orchestrate.workflows import dags, step, workflow
from tierstack.core.errors import InvalidArgumentError
from tierstack.core.templates import Budget, TemplateError, lookup, render
from tierstack.core.values import JSON
from tierstack.core.workflow import check_workflow
from tierstack.server.orchestrate.planner import Planner
from tierstack.v1 import orchestrator_service_pb2 as pb


def violations(wf: object) -> dict[str, str]:
    with pytest.raises(InvalidArgumentError) as caught:
        check_workflow(wf)  # type: ignore[arg-type]
    return {v.field: v.description for v in caught.value.violations}


def test_a_cycle_is_named_step_by_step() -> None:
    found = violations(
        workflow(step("a", depends_on=("c",)), step("b", depends_on=("a",)), step("c", depends_on=("b",)))
    )
    assert list(found) == ["workflow.steps"]
    assert found["workflow.steps"] == "dependency cycle: a -> b -> c -> a"


def test_every_problem_is_reported_at_once() -> None:
    found = violations(
        workflow(
            step("a", depends_on=("ghost",)),
            step("a"),
            step("b", tool=""),
            step("c", depends_on=("c",)),
            step("d", value="{{steps.b.output}}"),
        )
    )
    assert found == {
        "workflow.steps[0].depends_on[0]": "unknown step 'ghost'",
        "workflow.steps[1].id": "duplicates the name of steps[0]",
        "workflow.steps[2].tool": "a step names a tool or holds a nested workflow, exactly one of them",
        "workflow.steps[3].depends_on[0]": "step 'c' depends on itself",
        "workflow.steps[4].parameters.value": "reads the output of 'b', not among the step's dependencies",
    }


def test_templates_may_read_transitive_ancestors() -> None:
    spec = check_workflow(
        workflow(step("a"), step("b", depends_on=("a",)), step("c", depends_on=("b",), value="{{steps.a.output}}"))
    )
    assert spec.dependents == {"a": ("b",), "b": ("c",), "c": ()}


def test_render_keeps_types_and_interpolates_text() -> None:
    scope = {"inputs": {"city": "Lisbon", "days": 3}, "steps": {"fetch": {"output": {"items": [{"t": 21}]}}}}
    rendered = render(
        {
            "days": "{{inputs.days}}",
            "first": "{{ steps.fetch.output.items[0].t }}",
            "also": "{{steps.fetch.output.items.0.t}}",
            "text": "{{inputs.city}} in {{inputs.days}} days",
            "jinja": "{{ name }} passes through",
        },
        functools.partial(lookup, scope),
        "parameters",
        Budget(1 << 20),
    )
    assert rendered == {
        "days": 3,
        "first": 21,
        "also": 21,
        "text": "Lisbon in 3 days",
        "jinja": "{{ name }} passes through",
    }


def test_a_template_repeating_a_large_value_fails_before_it_fills_memory() -> None:
    scope = {"inputs": {"big": "y" * 5000}}
    with pytest.raises(TemplateError) as caught:  # 100,000 copies would be 500 MB
        render({"v": "{{inputs.big}}" * 100_000}, functools.partial(lookup, scope), "parameters", Budget(1 << 20))
    assert (caught.value.field, caught.value.message) == (
        "parameters.v",
        "the templates fill in more than 1048576 bytes",
    )
    whole: JSON = {f"k{index}": "{{inputs.big}}" for index in range(1000)}  # each a whole value, not text
    with pytest.raises(TemplateError):
        render(whole, functools.partial(lookup, scope), "parameters", Budget(1 << 20))


def test_render_names_the_missing_path() -> None:
    with pytest.raises(TemplateError) as caught:
        render({"x": ["{{inputs.missing.deep}}"]}, functools.partial(lookup, {"inputs": {}}), "parameters", Budget(64))
    assert caught.value.field == "parameters.x[0]"
    assert "inputs.missing does not exist" in caught.value.message


@given(dags())
def test_plan_batches_respect_every_dependency(graph: list[tuple[str, tuple[str, ...]]]) -> None:
    spec = check_workflow(workflow(*(step(sid, depends_on=deps) for sid, deps in graph)))
    plan, cached = Planner(lambda _: 1.0).plan(spec)
    assert not cached
    batch_of = {sid: index for index, batch in enumerate(plan.batches) for sid in batch}
    assert sorted(batch_of) == sorted(sid for sid, _ in graph)
    for sid, deps in graph:
        assert all(batch_of[dep] < batch_of[sid] for dep in deps)
    assert plan.max_parallelism == max(len(batch) for batch in plan.batches)
    # With unit estimates the critical path is a dependency chain as long as the number of batches.
    assert len(plan.critical_path) == len(plan.batches) == plan.estimated_seconds
    for before, after in zip(plan.critical_path, plan.critical_path[1:], strict=False):
        assert before in spec.by_id[after].depends_on


@given(dags(), st.data())
def test_a_back_edge_is_always_rejected(graph: list[tuple[str, tuple[str, ...]]], data: st.DataObject) -> None:
    edges = [(sid, dep) for sid, deps in graph for dep in deps]
    if not edges:
        return
    child, parent = data.draw(st.sampled_from(edges))
    steps = [step(sid, depends_on=deps + ((child,) if sid == parent else ())) for sid, deps in graph]
    with pytest.raises(InvalidArgumentError) as caught:
        check_workflow(workflow(*steps))
    assert any("dependency cycle" in v.description for v in caught.value.violations)


def test_identical_workflows_are_planned_once() -> None:
    planner = Planner(lambda _: 0.5)
    wf = workflow(step("a"), step("b", depends_on=("a",)), step("c", depends_on=("a",)))
    first, cached_first = planner.plan(check_workflow(wf))
    second, cached_second = planner.plan(check_workflow(wf))
    assert (cached_first, cached_second) == (False, True)
    assert first == second
    assert first.batches == (("a",), ("b", "c"))


def _ancestors(graph: dict[str, tuple[str, ...]], step_id: str) -> set[str]:
    found: set[str] = set()
    stack = list(graph[step_id])
    while stack:
        parent = stack.pop()
        if parent not in found:
            found.add(parent)
            stack.extend(graph[parent])
    return found


@given(dags(), st.data())
def test_a_step_reads_exactly_its_ancestors_directly_or_through_variables(
    graph: list[tuple[str, tuple[str, ...]]], data: st.DataObject
) -> None:
    names = [sid for sid, _ in graph]
    targets = st.sampled_from([*names, "ghost"])
    variables = {f"v{i}": data.draw(st.sets(targets, min_size=1, max_size=4)) for i in range(3)}
    reads = [data.draw(st.one_of(targets, st.sampled_from(sorted(variables)))) for _ in graph]
    values = [f"{{{{vars.{read}}}}}" if read in variables else f"{{{{steps.{read}.output}}}}" for read in reads]
    wf = workflow(*(step(sid, depends_on=deps, value=value) for (sid, deps), value in zip(graph, values, strict=True)))
    for name, read_steps in variables.items():
        wf.variables[name] = " ".join(f"{{{{steps.{target}.output}}}}" for target in sorted(read_steps))
    expected = {}
    parents = dict(graph)
    for index, ((sid, _), read) in enumerate(zip(graph, reads, strict=True)):
        allowed = _ancestors(parents, sid)
        if read in variables and variables[read] - allowed:
            missing = ", ".join(sorted(variables[read] - allowed))
            expected[f"workflow.steps[{index}].parameters.value"] = (
                f"reads variable {read!r}, which reads {missing}, not among the step's dependencies"
            )
        elif read not in variables and read not in allowed:
            expected[f"workflow.steps[{index}].parameters.value"] = (
                f"reads the output of {read!r}, not among the step's dependencies"
            )
    if expected:
        assert violations(wf) == expected
    else:
        check_workflow(wf)


def test_a_variable_over_many_steps_names_ten_of_those_missing() -> None:
    wf = workflow(*(step(f"s{i:02}") for i in range(12)), step("last", value="{{vars.all}}"))
    wf.variables["all"] = "".join(f"{{{{steps.s{i:02}.output}}}}" for i in range(12))
    names = ", ".join(f"s{i:02}" for i in range(10))
    assert violations(wf) == {
        "workflow.steps[12].parameters.value": (
            f"reads variable 'all', which reads {names} and 2 more, not among the step's dependencies"
        )
    }


def test_a_long_chain_reading_its_first_step_is_valid() -> None:
    chain = [step(f"s{i}", depends_on=(f"s{i - 1}",), value="{{steps.s0.output}}") for i in range(1, 10_000)]
    spec = check_workflow(workflow(step("s0"), *chain))
    assert len(spec.steps) == 10_000


def test_text_that_only_looks_like_a_template_is_accepted_unchanged() -> None:
    # An unclosed `{{inputs` before a megabyte of spaces: a backtracking pattern took minutes here.
    spec = check_workflow(workflow(step("a", text="{{inputs" + " " * (1 << 20), other="{{steps" + " x" * 500_000)))
    assert spec.steps[0].parameters["text"] == "{{inputs" + " " * (1 << 20)


def test_a_condition_nested_too_deeply_and_a_huge_index_are_named() -> None:
    found = violations(
        workflow(
            pb.WorkflowStep(id="a", tool="core.echo", when="(" * 5000 + "a" + ")" * 5000),
            step("b", value="{{inputs.list[" + "9" * 5000 + "]}}"),
        )
    )
    assert found == {
        "workflow.steps[0].when": "is not a JMESPath expression: it nests too deeply",
        "workflow.steps[1].parameters.value": "cannot read {{inputs.list["
        + "9" * 5000
        + "]}}: the index at 11 is too large",
    }


BUILDS = "a `when` condition may not build lists or objects ([a, b], {k: v}); it selects and compares"


def test_a_condition_that_builds_lists_or_objects_is_refused() -> None:
    exploding = "length(inputs.a" + "|[@,@,@,@][]" * 10 + ") > `0`"  # each level four times the last
    for condition in (exploding, "{k: inputs.a}.k"):
        found = violations(workflow(pb.WorkflowStep(id="s", tool="core.echo", when=condition)))
        assert found == {"workflow.steps[0].when": BUILDS}
    fine = "length(inputs.a[?ok]) > `0` && contains(inputs.tags, 'x')"
    assert check_workflow(workflow(pb.WorkflowStep(id="s", tool="core.echo", when=fine))).steps[0].when is not None
