"""The documentation names only what exists: every ``lab_utils`` module, file and
attribute that README.md, benchmarks/README.md or a notebook (markdown and code)
names resolves; the README stays a front door."""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

DOTTED = re.compile(r"\blab_utils(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"\blab_utils(?:/[\w*.-]+)+/?")
TICKED = re.compile(r"`([A-Za-z_]\w*)\.([A-Za-z_]\w*)")  # `module.attr ...`, read at the span's start
NOT_ATTRS = {"py", "csv", "md", "yaml", "json", "png", "html", "ipynb", "j2", "txt", "svg"}
GENERIC = {"config"}  # a module's name that prose also uses for other objects (a model's `config.x`)


def _basenames() -> dict[str, str]:
    """Module basename -> dotted module, for the basenames that name one module only
    (``memo`` -> ``lab_utils.core.memo``); ``benchmarks`` is also the top-level package."""
    seen: dict[str, list[str]] = {"benchmarks": ["benchmarks"]}
    for path in (ROOT / "lab_utils").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if len(parts) > 1:
            seen.setdefault(parts[-1], []).append(".".join(parts))
    return {name: mods[0] for name, mods in seen.items() if len(mods) == 1 and name not in GENERIC}


BASENAMES = _basenames()


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` is an importable module, or an attribute chain on one
    (a dataclass field counts as an attribute of its class)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name) and e.name.startswith("lab_utils"):
                continue  # this prefix is not a module: try a shorter one
            raise
        for attr in parts[i:]:
            if hasattr(obj, attr):
                obj = getattr(obj, attr)
            elif attr in getattr(obj, "__dataclass_fields__", {}):
                return True
            else:
                return False
        return True
    return False


def _exists(path: str) -> bool:
    path = path.rstrip(".")
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


def names_in_text(text: str, aliases: dict[str, str] | None = None) -> set[str]:
    """Dotted names (``lab_utils.x.y``) and resolvable backticked ``module.attr``
    forms in prose, as dotted names; paths (``lab_utils/x/y.py``) with a leading '/'."""
    aliases = {**BASENAMES, **(aliases or {})}
    found = set(DOTTED.findall(text)) | {"/" + p for p in PATH.findall(text)}
    for module, attr in TICKED.findall(text):
        if module in aliases and attr not in NOT_ATTRS:
            found.add(f"{aliases[module]}.{attr}")
    return found


def names_in_code(source: str, aliases: dict[str, str]) -> set[str]:
    """What a code cell takes from ``lab_utils``: its imports (``aliases`` gets the
    modules it binds) and every ``alias.attr`` it reads; comments and strings as prose."""
    found = names_in_text(source, aliases)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return found
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lab_utils"):
            for a in node.names:
                found.add(f"{node.module}.{a.name}")
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lab_utils") and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            target = aliases[node.value.id]
            if target.startswith("lab_utils"):
                found.add(f"{target}.{node.attr}")
    return found


def names_in_notebook(path: Path) -> set[str]:
    cells = json.loads(path.read_text())["cells"]
    aliases: dict[str, str] = {}
    found = set()
    for cell in [c for c in cells if c["cell_type"] == "code"] + [c for c in cells if c["cell_type"] == "markdown"]:
        source = "".join(cell["source"])
        found |= names_in_code(source, aliases) if cell["cell_type"] == "code" else names_in_text(source, aliases)
    return found


def package_map(text: str) -> set[str]:
    """The files and folders of the README's package tree (the fenced block that
    opens with ``lab_utils/``), as paths with a leading '/'."""
    out, stack = set(), []
    for block in re.findall(r"```\n(lab_utils/\n.*?)```", text, re.S):
        for line in block.splitlines()[1:]:
            m = re.match(r"^( +)([\w*./]+(?:, [\w*./]+)*)", line)
            if not m:
                continue
            stack = stack[:len(m.group(1)) // 2 - 1]
            for name in m.group(2).split(", "):
                out.add("/" + "/".join(["lab_utils", *stack, name.rstrip("/")]))
            if m.group(2).endswith("/"):
                stack.append(m.group(2).rstrip("/"))
    return out


def missing(names: set[str]) -> list[str]:
    return sorted(name.lstrip("/") for name in names
                  if not (_exists(name[1:]) if name.startswith("/") else resolves(name)))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_docs_name_only_lab_utils_modules_and_attributes_that_exist(path):
    text = path.read_text()
    names = names_in_text(text) | package_map(text)
    assert names, "no lab_utils name found: is the pattern still right?"
    assert not missing(names), f"{path.name} names what does not exist: {missing(names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebooks_name_only_lab_utils_modules_and_attributes_that_exist(path):
    names = names_in_notebook(path)
    assert names
    assert not missing(names), f"{path.name} names what does not exist: {missing(names)}"


def test_the_check_catches_a_stale_name():
    text = ("`lab_utils.core.memo.step`, `lab_utils/core/memo.py`, `memo.step`, "
            "`lab_utils.core.nope`, `lab_utils/nope.py`, `memo.nope`, `speed.py`")
    assert missing(names_in_text(text)) == ["lab_utils.core.memo.nope", "lab_utils.core.nope", "lab_utils/nope.py"]
    code = "from lab_utils.core import memo as m\nfrom lab_utils.core.files import nope\nm.step\nm.gone\n"
    assert missing(names_in_code(code, {})) == ["lab_utils.core.files.nope", "lab_utils.core.memo.gone"]
    tree = "```\nlab_utils/\n  core/\n    memo.py   the cache\n    gone.py   moved\n```\n"
    assert missing(package_map(tree)) == ["lab_utils/core/gone.py"]


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.split()) <= 2500
    assert not re.search(r"\bissues? #?\d+", text, re.I), "the README tells no history"
    for section in ("## Two commands", "## What comes out", "## Parameters", "## Running on a GPU",
                    "## Running on a cluster", "## The helper package"):
        assert section in text
