"""The package's floors: imports run one way, core -> engine -> experiments ->
presentation -> report, with no cycle, and every module imports on its own."""

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lab_utils"
FLOORS = ("core", "engine", "experiments", "presentation", "report")
MODULES = sorted(
    ".".join(("lab_utils", *p.relative_to(PACKAGE).with_suffix("").parts))
    for p in PACKAGE.rglob("*.py")
    # metrics/: evaluate-format scripts, loaded by path; __main__: runs when imported
    if "metrics" not in p.relative_to(PACKAGE).parts[1:2] and p.stem != "__main__"
)


def floor(module: str) -> int:
    """The floor of ``lab_utils.<floor>...``; the package's own entry points
    (``lab_utils.__main__``) sit on the top floor with the report."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in FLOORS:
        return FLOORS.index(parts[1])
    return len(FLOORS) - 1


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(("lab_utils", *rel))


def lab_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported lab_utils module, line, at top level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lab_utils"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                target = full if _is_module(full) else node.module
                out.append((target, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lab_utils"):
                    out.append((alias.name, node.lineno, id(node) in top))
    return out


def _is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


FILES = sorted(p for p in PACKAGE.rglob("*.py") if "metrics" not in p.relative_to(PACKAGE).parts[1:2])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_or_sideways(path):
    here = module_name(path)
    for target, line, _ in lab_imports(path):
        assert floor(target) <= floor(here), (
            f"{here} (floor {FLOORS[floor(here)]}) imports {target} (floor {FLOORS[floor(target)]}) "
            f"at line {line}: imports run {' -> '.join(FLOORS)}")


def test_no_import_cycle():
    graph = {module_name(p): {t for t, _, _ in lab_imports(p)} for p in FILES}
    graph = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_floors_are_folders():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))} == set(FLOORS)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_on_its_own(module):
    # A fresh interpreter per module would be slower; an import error or a
    # module that only works after another was imported shows up here too,
    # since the test order is alphabetical, not the dependency order.
    importlib.import_module(module.removesuffix(".__init__"))
