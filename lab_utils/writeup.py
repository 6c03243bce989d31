"""The lab write-up, regenerated: ``report/LAB4.md`` and ``report/LAB4.html``.

It follows the seed's section order (Concepts, Model Selection, Model
Visualization, Model Sparsification & Sizes, Results on Benchmarks) and ends
with "What we found". Nothing in it is typed in: the Jinja2 template
(``templates/LAB4.md.j2``) arranges

* the sentences the notebooks generated and recorded as findings
  (``results/findings/<notebook>.json``, see ``notebook.md(text, key=...)``),
* tables read from ``results/*.csv``,
* figures from ``figs/``, copied next to the report so it can be served or
  zipped as one folder; every link is URL-encoded (the seed's figure names
  contain ``%``).
"""

from __future__ import annotations

import json
import math
import shutil
import urllib.parse
from pathlib import Path

from lab_utils import io

TEMPLATES = Path(__file__).parent / "templates"


class Findings:
    """Findings of every notebook, looked up as ``f["02_visualization"]["key"]``
    or ``f.get("key")`` (searching all notebooks)."""

    def __init__(self, folder: Path):
        self.by_notebook: dict[str, dict] = {}
        for path in sorted(folder.glob("*.json")):
            try:
                self.by_notebook[path.stem] = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue

    def get(self, key: str, default=None):
        for values in self.by_notebook.values():
            if key in values:
                return values[key]
        return default

    def startswith(self, prefix: str) -> list[tuple[str, object]]:
        return sorted((k, v) for values in self.by_notebook.values() for k, v in values.items()
                      if k.startswith(prefix))

    def __getitem__(self, notebook: str) -> dict:
        return self.by_notebook.get(notebook, {})


def md_table(df, floatfmt: str = ".4g", max_rows: int = 60) -> str:
    """A pandas DataFrame as a GitHub-flavoured Markdown table."""
    if df is None or len(df) == 0:
        return "_(empty table)_"
    df = df.head(max_rows)

    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def url(name: str) -> str:
    """A relative link with every special character encoded (``%`` -> ``%25``)."""
    return "/".join(urllib.parse.quote(part) for part in name.split("/"))


class Figures:
    """Figures copied into ``report/figs`` on first use; returns the encoded link."""

    def __init__(self, src: Path, dst: Path):
        self.src, self.dst, self.used = src, dst, []

    def link(self, name: str | None) -> str | None:
        if not name:
            return None
        name = Path(name).name
        path = self.src / name
        if not path.is_file():
            return None
        self.dst.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(self.dst / name) as tmp:
            shutil.copyfile(path, tmp)
        self.used.append(name)
        return url(f"figs/{name}")

    def matching(self, pattern: str) -> list[str]:
        return sorted(p.name for p in self.src.glob(pattern))


def read_csv(name: str):
    import pandas as pd

    path = io.results_dir() / name
    return pd.read_csv(path) if path.is_file() else None


def render_markdown(context: dict) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["table"] = md_table
    env.filters["url"] = url
    return env.get_template("LAB4.md.j2").render(**context)


def markdown_to_html(markdown: str, title: str) -> str:
    import mistune
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    body = mistune.create_markdown(plugins=["table", "strikethrough"], escape=False)(markdown)
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
    return env.get_template("LAB4.html.j2").render(title=title, body=body)


def build(report_dir: Path, runs=(), params: dict | None = None) -> Path:
    """Write ``LAB4.md`` and ``LAB4.html`` into ``report_dir``; return the HTML path."""
    report_dir = Path(report_dir)
    figures = Figures(io.figs_dir(), report_dir / "figs")
    context = {
        "findings": Findings(io.results_dir() / "findings"),
        "figures": figures,
        "csv": read_csv,
        "params": params or {},
        "runs": list(runs),
    }
    markdown = render_markdown(context)
    io.write_text(report_dir / "LAB4.md", markdown)
    html = markdown_to_html(markdown, "Lab 4: LLM Sparsification")
    return io.write_text(report_dir / "LAB4.html", html)
