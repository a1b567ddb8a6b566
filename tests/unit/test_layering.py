"""The dependency direction (cluster -> workers -> kernels) and no import cycles inside workers/: read from the
source (module-level imports; imports under `if TYPE_CHECKING:` and inside functions do not count)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` is imported (top-level statements only, TYPE_CHECKING blocks skipped)."""
    imported: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                              ast.ClassDef)) else ():
            if isinstance(child, ast.Import):
                imported.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                imported.add(child.module)
    return imported


def package_modules(package: str) -> dict[str, set[str]]:
    return {module_name(path): module_level_imports(path) for path in sorted((ROOT / package).rglob("*.py"))}


@pytest.mark.parametrize("package,forbidden", [("workers", ("ray", "cluster", "protos")),
                                               ("kernels", ("ray", "cluster", "protos", "workers"))])
def test_lower_layers_never_import_upper_ones(package, forbidden):
    offenders = [f"{module} imports {name}" for module, names in package_modules(package).items() for name in names
                 if name.split(".")[0] in forbidden]
    assert offenders == []


def test_workers_has_no_import_cycles():
    graph = package_modules("workers")
    internal = {module: {name for name in names if name in graph} for module, names in graph.items()}
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(internal[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(internal):
        if module not in state:
            visit(module, [module])
    assert cycles == []
