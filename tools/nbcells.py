"""Edit source notebooks from the command line or Python without JupyterLab.

    python tools/nbcells.py list notebooks/02_visualization.ipynb
    python tools/nbcells.py strip notebooks/*.ipynb

Also importable: ``new(cells)``, ``code(src, tags)``, ``markdown(src)``,
``write(path, nb)``. Notebooks are written without outputs and with the
``python3`` kernelspec, so ``git diff`` stays readable.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def code(src: str, tags: list[str] | None = None):
    cell = nbformat.v4.new_code_cell(src.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def markdown(src: str, tags: list[str] | None = None):
    cell = nbformat.v4.new_markdown_cell(src.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def new(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = list(cells)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def strip(nb) -> nbformat.NotebookNode:
    for cell in nb.cells:
        cell.pop("id", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
        cell.metadata.pop("papermill", None)
    nb.metadata.pop("papermill", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def write(path, nb) -> None:
    nb = strip(nb)
    nb.nbformat, nb.nbformat_minor = 4, 4  # 4.4: cells carry no random ids -> stable diffs
    Path(path).write_text(nbformat.writes(nb, version=4) + "\n")


def read(path):
    return nbformat.read(path, as_version=4)


def main(argv: list[str]) -> int:
    cmd, *paths = argv
    for p in paths:
        nb = read(p)
        if cmd == "strip":
            write(p, nb)
        elif cmd == "list":
            for i, c in enumerate(nb.cells):
                first = c.source.splitlines()[0] if c.source else ""
                print(f"{i:3d} {c.cell_type[:4]} {c.metadata.get('tags', [])} {first[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
