"""The code's shape, held by tests: functions a reader can take in at once, and a training loop that takes its
state and one hooks object rather than callbacks."""

import ast
import inspect
from pathlib import Path

import qlora_kit
from qlora_kit import loop

PACKAGE = Path(qlora_kit.__file__).parent
LONGEST = 80  # lines, from `def` to the last line
# One term per component, in docs/memory.md's order: split up, each term would need the same dozen shape variables.
ALLOWED_LONGER = {"estimate_peak_memory"}
LOOP_MODULES = ("loop.py", "train.py")
MOST_PARAMETERS = 8


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_is_longer_than_a_screen():
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in functions(path)
        if node.end_lineno - node.lineno + 1 > LONGEST and node.name not in ALLOWED_LONGER
    ]
    assert not long, long


def test_the_training_loop_s_functions_take_few_parameters():
    many = []
    for name in LOOP_MODULES:
        for node in functions(PACKAGE / name):
            a = node.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - any(p.arg == "self" for p in a.args[:1])
            if count > MOST_PARAMETERS:
                many.append(f"{name}:{node.lineno} {node.name} ({count})")
    assert not many, many


def test_the_loop_is_told_nothing_but_its_state_data_and_hooks():
    """No callbacks: what the loop tells the run goes through the Hooks object alone."""
    parameters = inspect.signature(loop.train_loop).parameters
    assert list(parameters) == ["state", "examples", "recipe", "hooks", "pad_id", "eval_examples"]
    assert parameters["hooks"].annotation in ("Hooks", loop.Hooks)
