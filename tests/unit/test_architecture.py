"""The shape the code keeps (DESIGN.md, "Compute, record, orchestrate"): flows that read as their
diagram, thin Prefect tasks, short signatures. A failure here names the function to reshape."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGE_CODE = sorted([*ROOT.glob("flows/*.py"), *ROOT.glob("tasks/*.py")])
FLOW_BODY_LINES, TASK_BODY_LINES, MAX_PARAMETERS = 40, 10, 6


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def decorated_with(node, name: str) -> bool:
    return any((isinstance(d, ast.Call) and getattr(d.func, "id", None) == name) or getattr(d, "id", None) == name
               for d in node.decorator_list)


def body_lines(node) -> int:
    """Lines of the body without its docstring."""
    body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) else node.body
    return body[-1].end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("path", STAGE_CODE, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_flows_are_short_tasks_thin_and_signatures_small(path):
    problems = []
    for node in functions(path):
        arguments = node.args
        count = len(arguments.posonlyargs) + len(arguments.args) + len(arguments.kwonlyargs)
        count -= bool(arguments.args and arguments.args[0].arg in ("self", "cls"))
        if count > MAX_PARAMETERS:
            problems.append(f"{node.name} takes {count} parameters (> {MAX_PARAMETERS})")
        if decorated_with(node, "flow") and body_lines(node) > FLOW_BODY_LINES:
            problems.append(f"flow {node.name} has {body_lines(node)} lines of body (> {FLOW_BODY_LINES})")
        if decorated_with(node, "task") and body_lines(node) > TASK_BODY_LINES:
            problems.append(f"task {node.name} has {body_lines(node)} lines of body (> {TASK_BODY_LINES})")
        # a stage's task is `<stage>_task` and only it: a function added between a decorator and its
        # wrapper once made the data stage a plain call (no task run, retry or timeout)
        if decorated_with(node, "task") != node.name.endswith("_task"):
            problems.append(f"{node.name}: a Prefect task is named *_task, and a *_task function is a Prefect task")
    assert not problems, "; ".join(problems)
