"""Hygiene of the sources: notebooks (the smoke run lives in test_report.py) and lint."""

import json
import re
import subprocess
import sys

import pytest

from lab_utils.report import runner

NOTEBOOKS = runner.notebook_paths()


def test_the_four_notebooks_exist_in_order():
    stems = [p.stem for p in NOTEBOOKS]
    assert [s[:2] for s in stems] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None
    proc = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
    from papermill import inspect_notebook

    nb = json.loads(path.read_text())
    nxt = "".join(nb["cells"][2]["source"])
    assert "params.validate" in nxt
    for name in inspect_notebook(str(path)):
        assert name in nxt, f"{path.stem}: parameter {name} is not validated"


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
    # The lint rules are in pyproject.toml; make test installs ruff.
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "lab_utils", "tests", "benchmarks", "tools"],
                          capture_output=True, text=True, cwd=runner.NOTEBOOKS_DIR.parent)
    assert proc.returncode == 0, proc.stdout[-3000:]
