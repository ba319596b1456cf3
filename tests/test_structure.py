"""The code's shape, held by tests: functions a reader can take in at once, and a training loop that takes its
state and one hooks object rather than callbacks."""

import ast
import inspect
from pathlib import Path

import qlora_kit
from qlora_kit.train import loop

PACKAGE = Path(qlora_kit.__file__).parent
LONGEST = 80  # lines, from `def` to the last line
# One term per component, in docs/memory.md's order: split up, each term would need the same dozen shape variables.
ALLOWED_LONGER = {"estimate_peak_memory"}
LOOP_MODULES = ("train/loop.py", "train/run.py")
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


# The flow, bottom up: a package may import from its own layer and the layers below it, never from one above.
LAYERS = [
    {"errors", "units", "files", "text"},  # shared by every step
    {"architectures"},  # what each model family is
    {"probe"},
    {"plan"},
    {"data"},
    {"model"},
    {"adapter"},
    {"objectives"},
    {"train"},
    {"inference"},
    {"export"},
    {"cli"},
]


def layer_of(module: str) -> int:
    """The layer of qlora_kit.<module...> (its first component: a subpackage or a shared module)."""
    head = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if head in names)


def imports_of(path: Path) -> set[str]:
    """Every qlora_kit module path imports, at the top or inside a function, without the qlora_kit. prefix."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("qlora_kit"):
            found |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "qlora_kit" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qlora_kit.")}
    return {name.removeprefix("qlora_kit.") for name in found}


def test_every_module_lives_in_a_package_of_the_flow():
    strays = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.glob("*.py")
        if path.stem not in set.union(*LAYERS) | {"__init__", "__main__"}
    ]
    assert not strays, f"add them to a subpackage (or to LAYERS' shared modules): {strays}"


def test_imports_only_point_down_the_flow():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] in ("__init__", "__main__", "demo_data"):
            continue
        own = layer_of(".".join(parts))
        upward += [f"{'/'.join(parts)} imports {name}" for name in imports_of(path) if layer_of(name) > own]
    assert not upward, upward
