"""The house rules, checked on the source: imports flow one way without cycles, and each
concept has one owner (file names, distributed helpers, FLOP counter, look-alike names)."""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path

import pytest

from tests import REPO

PACKAGE = REPO / "medtune"

# floors, lowest first: a module may import modules of its floor or below, never above
CORE, LIBRARIES, TASKS, REPORTING, CLI = range(5)
FLOOR_NAMES = ["core", "data/models/adapters", "pretrain/finetune tasks", "reporting", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def source(path: Path) -> str:
    return path.read_text()


@functools.cache
def syntax_tree(path: Path) -> ast.Module:
    """The module's tree, parsed once: every check below walks the same trees."""
    return ast.parse(source(path))


def floor(module: str) -> int:
    leaf = module.rsplit(".", 1)[-1]
    if module in ("medtune.cli", "medtune.__main__") or leaf == "cli" or leaf.endswith("_cli"):
        return CLI
    if module in ("medtune.checkpoints.export", "medtune.checkpoints.params", "medtune.checkpoints.interop",
                  "medtune.checkpoints.hub"):
        return REPORTING
    if module.startswith(("medtune.pretrain", "medtune.finetune")):
        return TASKS
    if module.startswith(("medtune.data", "medtune.models", "medtune.adapters")):
        return LIBRARIES
    return CORE  # errors, registry, config, distributed, trainer, checkpoints.io/runs/counting


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(module: str) -> set[str]:
    """Every medtune module ``module`` imports, at module level or inside functions
    (imports under ``if TYPE_CHECKING:`` are never executed and do not count)."""
    tree = syntax_tree(MODULES[module])
    skipped = {id(n) for block in ast.walk(tree) if _type_checking_block(block) for n in ast.walk(block)}
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in MODULES and name != module:
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_no_import_cycles():
    """Tarjan's strongly connected components: any component of two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            connect(module)
    assert not cycles, f"import cycles: {cycles}"


def test_cycle_detection_sees_lazy_imports():
    """The walker must count imports inside functions (the lazy ones that hid cycles)."""
    assert "medtune.models.weights" in GRAPH["medtune.models.backbones"]  # create_backbone loads weights lazily
    assert "medtune.models.backbones" not in GRAPH["medtune.models.weights"]  # only under TYPE_CHECKING


def test_imports_flow_down_the_floors():
    upward = [
        f"{module} ({FLOOR_NAMES[floor(module)]}) imports {target} ({FLOOR_NAMES[floor(target)]})"
        for module, targets in GRAPH.items()
        for target in targets
        if floor(target) > floor(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_module_is_over_500_lines():
    long = {module: n for module, path in MODULES.items() if (n := len(source(path).splitlines())) > 500}
    assert not long, long


# --------------------------------------------------------------------------- one owner per concept


@functools.cache
def string_literals(path: Path) -> tuple[str, ...]:
    tree = syntax_tree(path)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return tuple(
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    )


@pytest.mark.parametrize("file_name", [
    "config.json", "backbone.safetensors", "pretrain.safetensors", "decoder.safetensors", "model.safetensors",
    "adapter.json",
    "adapter.safetensors", "head.safetensors", "summary.json", "metrics.jsonl", "trainer_state.json",
    "reconstruction.png", "adapter_config.json", "adapter_model.safetensors", "README.md", "model.onnx",
    "splits_final.json",
])
def test_run_folder_file_names_are_written_once(file_name):
    owners = [module for module, path in MODULES.items() if file_name in string_literals(path)]
    assert owners == ["medtune.checkpoints.runs"], owners


def defined_functions(name: str) -> list[str]:
    return [
        module for module, path in MODULES.items()
        for node in ast.walk(syntax_tree(path))
        if isinstance(node, ast.FunctionDef) and node.name == name
    ]


@pytest.mark.parametrize("name", ["zscore_nonzero", "count_parameters", "distill_loss", "file_sha256",
                                  "find_latest_state", "label_spec_for"])
def test_look_alike_functions_exist_once(name):
    assert len(defined_functions(name)) == 1, defined_functions(name)


def calls_of(attribute: str) -> list[str]:
    return sorted({
        module for module, path in MODULES.items()
        for node in ast.walk(syntax_tree(path))
        if isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Attribute) and node.func.attr == attribute)
            or (isinstance(node.func, ast.Name) and node.func.id == attribute)
        )
    })


def test_one_flop_counter_and_one_barrier():
    # every FLOP count goes through the corrected counter (grouped-convolution backward)
    assert calls_of("FlopCounterMode") == ["medtune.checkpoints.counting"]
    # every barrier goes through distributed.barrier (gloo groups on GPU machines)
    assert calls_of("wait_for_everyone") == ["medtune.distributed"]
    assert calls_of("main_process_first") == []  # distributed.main_first passes rank 0's error on
    assert calls_of("gather_object") == ["medtune.distributed"]


def test_tasks_are_named_only_by_the_registry():
    """No table of tasks outside the registry lines: the CLI modules never name a task."""
    for module in ("medtune.finetune.cli", "medtune.finetune.predict_cli", "medtune.checkpoints.export",
                   "medtune.checkpoints.export_cli"):
        literals = string_literals(MODULES[module])
        assert not {"referring", "vqa"} & set(literals), module
    registered = [
        node for node in ast.walk(syntax_tree(MODULES["medtune.finetune"]))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "register_path"
    ]
    assert [ast.literal_eval(call.args[0]) for call in registered] == ["segmentation", "segment3d", "referring", "vqa", "dynamic"]


def test_every_task_folder_has_the_same_inner_shape():
    from medtune.finetune import TASKS, get_task

    for name in TASKS.names():
        folder = PACKAGE / "finetune" / name
        assert (folder / "__init__.py").is_file() and (folder / "task.py").is_file(), name
        assert (folder / "config.py").is_file() and (folder / "model.py").is_file(), name
        assert (folder / "predict.py").is_file(), name
        assert get_task(name).name == name


def test_import_graph_is_not_empty():
    edges = sum(len(targets) for targets in GRAPH.values())
    by_floor = defaultdict(int)
    for module in MODULES:
        by_floor[FLOOR_NAMES[floor(module)]] += 1
    assert edges > 100 and all(by_floor[name] > 0 for name in FLOOR_NAMES), (edges, dict(by_floor))
