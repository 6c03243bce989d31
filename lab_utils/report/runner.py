"""The report runner: papermill executes the notebooks, nbconvert renders them.

    python -m lab_utils.report --params params/default.yaml

The parameters are checked first (a key no notebook declares, any invalid
value: exit 2). ``notebooks/01_*`` ... ``04_*`` then run in order into
``build/notebooks/``, each rendered to ``report/<name>.html`` (cells tagged
``remove-input`` / ``remove-cell`` / ``remove-output`` honoured, images
embedded, nothing from a CDN), then the write-up and ``report/index.html``.
A failing notebook stops the run: the runner names the notebook and the cell,
still renders what ran, and exits 1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from lab_utils.core import files
from lab_utils.core.device import DeviceError, describe
from lab_utils.report import notebook as nbk
from lab_utils.report import writeup
from lab_utils.report.params import NOTEBOOKS_DIR, ParamError, check_file

TEMPLATES = Path(__file__).parent / "templates"
REPORTED_PACKAGES = ("torch", "transformers", "datasets", "evaluate", "papermill", "nbconvert",
                     "pandas", "seaborn", "numpy", "safetensors")


@dataclass
class NotebookRun:
    name: str
    seconds: float = 0.0
    status: str = "not run"  # ok | failed | not run
    error_cell: int | None = None
    error: str = ""
    html: str = ""


def notebook_paths(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def build_dir() -> Path:
    return files.output_root() / "build"


def report_dir() -> Path:
    return files.output_root() / "report"


def _kernel_env() -> None:
    # Inherited by the kernel papermill starts: progress bars off in the
    # rendered report, a fixed hash seed for reproducible iteration orders.
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("PYTHONHASHSEED", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ["LAB_OUTPUT_DIR"] = str(files.output_root())


def execute(path: Path, parameters: dict, out_path: Path, timeout: int) -> NotebookRun:
    import papermill as pm

    run = NotebookRun(path.stem)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(out_path), parameters=parameters, kernel_name="python3",
                            progress_bar=False, execution_timeout=timeout,
                            cwd=str(path.parent), log_output=False)
        run.status = "ok"
    except pm.PapermillExecutionError as e:
        run.status = "failed"
        run.error_cell = e.exec_count
        run.error = f"{e.ename}: {e.evalue}".strip()
    except Exception as e:  # kernel died, timeout, ...
        run.status = "failed"
        run.error = f"{type(e).__name__}: {e}".strip()
    run.seconds = time.perf_counter() - t0
    return run


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PARAMETER_CELL_TAGS = {"parameters", "injected-parameters"}


def drop_widgets(nb) -> None:
    """Remove ipywidgets views (a progress bar some library still drew) and the
    widget state: rendering them would load the widget manager from a CDN,
    which an offline reader cannot reach and which shows nothing useful."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data:
                data.pop(WIDGET_VIEW)
                data.pop("text/plain", None)  # its repr, e.g. "HBox(children=...)"
                if not data:
                    continue
            kept.append(out)
        cell.outputs = kept


def render_html(executed: Path, html_path: Path) -> Path:
    """nbconvert to one self-contained HTML page (plumbing cells hidden)."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config

    c = Config()
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_cell_tags = ("remove-cell",)
    c.TagRemovePreprocessor.remove_input_tags = ("remove-input", "parameters-hidden")
    c.TagRemovePreprocessor.remove_all_outputs_tags = ("remove-output",)
    c.HTMLExporter.extra_template_basedirs = [str(TEMPLATES / "nbconvert")]
    c.HTMLExporter.template_name = "lab4"
    c.HTMLExporter.embed_images = True
    exporter = HTMLExporter(config=c)
    exporter.register_preprocessor(TagRemovePreprocessor(config=c), enabled=True)
    nb = nbformat.read(str(executed), as_version=4)
    # Neither the defaults cell nor papermill's injected cell (only the keys the file
    # set): the next cell shows one table of every effective value and where it came from.
    nb.cells = [c for c in nb.cells if not PARAMETER_CELL_TAGS & set(c.metadata.get("tags", []))]
    drop_widgets(nb)
    body, _ = exporter.from_notebook_node(nb)
    files.write_text(html_path, body)
    return html_path


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in REPORTED_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_index(runs: list[NotebookRun], params_file: str, params: dict, started: str,
                total_seconds: float) -> Path:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)),
                      autoescape=select_autoescape(["html", "j2"]))
    writeup = report_dir() / "LAB4.html"
    html = env.get_template("index.html.j2").render(
        runs=runs, params_file=params_file,
        params_yaml=_yaml_dump(params), versions=package_versions(), started=started,
        total_seconds=total_seconds, writeup=writeup.name if writeup.exists() else None,
        device=_device_row(params),
        titles={r.name: _title(r.name) for r in runs})
    return files.write_text(report_dir() / "index.html", html)


def _device_row(params: dict) -> dict:
    """The resolved device, dtype and device name the notebooks ran with."""
    try:
        return describe(params.get("device", "auto"), params.get("dtype", "auto"))
    except DeviceError as e:  # checked before the run; say so rather than fail the index
        return {"device": str(params.get("device")), "dtype": str(params.get("dtype")), "device_name": str(e)}


def _yaml_dump(params: dict) -> str:
    import yaml

    return yaml.safe_dump(params, sort_keys=False, default_flow_style=None).strip()


def _title(stem: str) -> str:
    num, _, rest = stem.partition("_")
    return f"{num} — {rest.replace('_', ' ').capitalize()}"


def run(params_file: str, only: list[str] | None = None, timeout: int = 3600,
        progress: bool = True) -> int:
    from tqdm.auto import tqdm

    paths = notebook_paths()
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) for o in only)]
        if not paths:
            print(f"error: --only {only} matches no notebook", file=sys.stderr)
            return 2
    try:
        raw, per_nb = check_file(params_file)
    except ParamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _kernel_env()
    # An interrupted earlier run may have left unfinished temporaries; the
    # finished files next to them are complete (atomic renames) and reused.
    files.sweep_temporaries(files.cache_dir(), files.output_root() / "figs", files.output_root() / "results",
                         build_dir(), report_dir())
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t_all = time.perf_counter()
    runs = [NotebookRun(p.stem) for p in paths]
    bar = tqdm(paths, desc="notebooks", unit="nb", disable=not progress)
    for i, path in enumerate(bar):
        bar.set_postfix_str(path.stem)
        executed = build_dir() / "notebooks" / path.name
        os.environ["LAB_NOTEBOOK"] = path.stem  # findings are recorded per notebook
        # the notebook's parameters table names the file and the keys it set
        os.environ[nbk.PARAMS_FILE_ENV] = nbk.shown_path(params_file)
        os.environ[nbk.PARAMS_KEYS_ENV] = json.dumps(sorted(per_nb[path.stem]))
        findings = files.results_dir() / "findings" / f"{path.stem}.json"
        findings.unlink(missing_ok=True)
        r = runs[i] = execute(path, per_nb[path.stem], executed, timeout)
        if executed.exists():
            r.html = render_html(executed, report_dir() / f"{path.stem}.html").name
        if r.status != "ok":
            where = f"cell [{r.error_cell}]" if r.error_cell is not None else "the kernel"
            print(f"\nerror: notebook {path.name} failed in {where}: {r.error}\n"
                  f"  executed copy: {executed}", file=sys.stderr)
            break
    total = time.perf_counter() - t_all
    writeup.build(report_dir(), runs=runs, params=raw)
    index = write_index(runs, str(params_file), raw, started, total)
    files.write_json(build_dir() / "run.json", {"params_file": str(params_file), "params": raw,
                                             "started": started, "total_seconds": total,
                                             "runs": [asdict(r) for r in runs],
                                             "versions": package_versions()})
    failed = [r for r in runs if r.status == "failed"]
    print(f"{'FAILED' if failed else 'done'} in {total:.0f} s: "
          + ", ".join(f"{r.name} {r.status} {r.seconds:.0f}s" for r in runs) + f"\nreport: {index}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab_utils.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(files.REPO_ROOT / "params" / "default.yaml"),
                    help="YAML parameter file (default: params/default.yaml)")
    ap.add_argument("--only", nargs="*", help="run only notebooks whose name starts with these, e.g. 02")
    ap.add_argument("--timeout", type=int, default=3600, help="per-cell execution timeout in seconds")
    ap.add_argument("--check", action="store_true", help="validate the parameters and exit")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.check:
        try:
            check_file(args.params)
        except ParamError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"params": args.params, "ok": True}))
        return 0
    return run(args.params, only=args.only, timeout=args.timeout, progress=not args.no_progress)
