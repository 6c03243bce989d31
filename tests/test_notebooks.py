"""Hygiene of the sources: notebooks (the smoke run lives in test_report.py) and lint."""

import ast
import functools
import json
import re
import subprocess
import sys

import pytest
from papermill import inspect_notebook

from lab_utils.report import params, runner

NOTEBOOKS = runner.notebook_paths()


def test_the_four_notebooks_exist_in_order():
    stems = [p.stem for p in NOTEBOOKS]
    assert [s[:2] for s in stems] == ["01", "02", "03", "04"]


@functools.cache
def would_strip() -> list[str]:
    """What ``nbstripout --verify`` would strip, one run for the four notebooks (each run is a
    Python start of seconds); its only lines name a notebook it would change."""
    proc = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", *map(str, NOTEBOOKS)],
                          capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0 or lines, "nbstripout failed without a word"
    assert all(line.startswith("Dry run: would have stripped ") for line in lines), lines
    return lines


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None
    assert f"Dry run: would have stripped {path}" not in would_strip()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_documented_parameters_cell_after_the_title(path):
    nb = json.loads(path.read_text())
    tagged = [i for i, c in enumerate(nb["cells"]) if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    assert nb["cells"][0]["cell_type"] == "markdown" and nb["cells"][0]["source"][0].startswith("# ")
    assert tagged[0] == 1
    src = "".join(nb["cells"][1]["source"])
    for line in src.splitlines():
        if line.strip():
            # name: type = value  # help   (papermill --help-notebook documents it)
            assert re.match(r"^\w+: \w+ = .+  # \S", line), line
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_are_validated_in_the_next_cell(path):
    # One call that reads the names from the parameters cell: none typed again.
    nb = json.loads(path.read_text())
    nxt = "".join(nb["cells"][2]["source"])
    assert f'params.validate_notebook(globals(), "{path.stem}")' in nxt
    assert "params.validate(" not in nxt


# A value of the wrong type for a parameter whose default has this type.
WRONG = {list: 7, int: "7", float: "0.5", str: 7, bool: "yes"}


def _defaults(path) -> dict:
    return {name: ast.literal_eval(info["default"]) for name, info in inspect_notebook(str(path)).items()}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_bad_value_of_each_declared_parameter_is_refused(path):
    defaults = _defaults(path)
    assert params.validate_notebook(defaults, path.stem, check_hub=False) == defaults
    for name, value in defaults.items():
        with pytest.raises(params.ParamError, match=rf"^{name}: "):
            params.validate_notebook({**defaults, name: WRONG[type(value)]}, path.stem, check_hub=False)
    # and by the rule its name implies, where it has one
    for name, bad in {"models": ["./no/such/folder"], "methods": ["obs"], "sparsities": [1.5], "seed": -1}.items():
        if name in defaults:
            with pytest.raises(params.ParamError, match=rf"^{name}: "):
                params.validate_notebook({**defaults, name: bad}, path.stem, check_hub=False)


@pytest.mark.parametrize("name, bad", [
    ("structured_sparsities", [1.0]), ("quant_group_sizes", [33]), ("distill_temperature", 0.0),
    ("distill_alpha", 1.5), ("moe_active_fractions", [0.3]),
])
def test_the_concepts_notebook_rules_that_span_parameters(name, bad):
    path = next(p for p in NOTEBOOKS if p.stem.startswith("01"))
    defaults = _defaults(path)
    with pytest.raises(params.ParamError, match=rf"^{name}: "):
        params.validate_notebook({**defaults, name: bad}, path.stem, check_hub=False)


def test_a_parameter_missing_from_the_kernel_is_named():
    path = NOTEBOOKS[1]
    defaults = _defaults(path)
    missing = next(iter(defaults))
    del defaults[missing]
    with pytest.raises(params.ParamError, match=f"'{missing}' of notebook {path.stem} is not defined"):
        params.validate_notebook(defaults, path.stem)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_markdown_has_no_tex_math(path):
    # The rendered report loads no MathJax (it must read offline), so a $...$
    # formula would show as raw TeX there; formulas are written in Unicode.
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            src = re.sub(r"`[^`]*`", "", "".join(cell["source"]))  # code spans may hold a $
            assert not re.search(r"\$[^$\s][^$]*\$", src), f"{path.stem}: TeX math in {src[:80]!r}"


def test_the_code_passes_ruff():
    # The lint rules are in pyproject.toml (ruff reads the notebooks cell by cell); make test installs ruff.
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "lab_utils", "tests", "benchmarks", "tools",
                           "notebooks"],
                          capture_output=True, text=True, cwd=runner.NOTEBOOKS_DIR.parent)
    assert proc.returncode == 0, proc.stdout[-3000:]


# Calls that return None (most display): a hidden cell may end with one of them.
DISPLAYS = {"setup", "md", "record", "show_figure", "show_parameters", "show_table", "display"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_hidden_cells_end_with_a_statement(path):
    # A cell whose input the report hides must not leak its last expression's value
    # (a bare list or path with no context): it ends with a statement or a display call.
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        tags = cell["metadata"].get("tags", [])
        if cell["cell_type"] != "code" or "remove-input" not in tags:
            continue
        src = "".join(cell["source"])
        last = ast.parse(src).body[-1]
        if isinstance(last, ast.Expr):
            call = last.value
            name = getattr(getattr(call, "func", None), "attr", None) or getattr(getattr(call, "func", None), "id", None)
            assert isinstance(call, ast.Call) and name in DISPLAYS, f"{path.stem}: hidden cell ends with a value: {src[-120:]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_validation_cell_shows_the_parameters_table(path):
    nxt = "".join(json.loads(path.read_text())["cells"][2]["source"])
    assert f'nbk.show_parameters(checked, "{path.stem}")' in nxt
