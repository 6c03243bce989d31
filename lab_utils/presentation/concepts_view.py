"""Sentences that state notebook 01's results, written from the measured tables.

Each function takes a demo's table and returns Markdown; every number and
every comparison word ("faster", "smaller", "beats") comes from the data, so
the text flips when the data do.
"""

from __future__ import annotations

import math

import pandas as pd

from lab_utils.presentation.text import pct

MB = 1e6


def _x(new: float, old: float) -> str:
    return f"{new / old:.2f}x"


def _faster(new, old, tol: float = 0.05) -> str:
    """'1.31x faster' / '1.20x slower' / 'about as fast' for two table rows, by
    their ``forward_cpu_s``: CPU time, which other processes on a shared machine
    disturb less than wall time."""
    r = old.forward_cpu_s / new.forward_cpu_s
    if abs(r - 1) <= tol:
        return "about as fast"
    return f"{r:.2f}x faster" if r > 1 else f"{1 / r:.2f}x slower"


def _ppl_change(new: float, old: float) -> str:
    """'up from A to B (+x%)' or 'unchanged at A'."""
    r = new / old
    if abs(r - 1) < 0.005:
        return f"unchanged at {new:.2f}"
    return f"{'up' if r > 1 else 'down'} from {old:.2f} to {new:.2f} ({r - 1:+.1%})"


CORPORA = {"nyt": "NYT editorial", "wikitext2": "WikiText-2 (test split)"}


def baseline(label: str, parameters: int, ppl: float, windows, corpus: str, file_bytes: int,
             protocol: str = "quick") -> str:
    corpus = CORPORA.get(corpus, corpus)
    return (f"**Baseline.** {label}: {parameters:,} parameters, a {file_bytes / MB:.1f} MB weights file, "
            f"perplexity ({protocol}) {ppl:,.2f} on {windows.shape[0]} windows of "
            f"{windows.shape[1]} tokens of the {corpus} text; every demo below is measured on the "
            f"same windows.")


def sparsification(t: pd.DataFrame, method: str, protocol: str = "quick") -> str:
    d, s = t.iloc[0], t.iloc[1]
    fmt = [c for c in t.columns if c.endswith("_file_bytes") and c != "dense_file_bytes"][0]
    unchanged = [what for what, same in (("parameter count", s.parameters == d.parameters),
                                         ("dense file", s.dense_file_bytes == d.dense_file_bytes),
                                         ("memory", s.memory_bytes == d.memory_bytes)) if same]
    names = ", ".join(unchanged[:-1]) + " and " + unchanged[-1] if len(unchanged) > 1 else "".join(unchanged)
    kept = f"leaves the {names} unchanged" if unchanged else "changes the size"
    return (f"{method.capitalize()} pruning of {s.prunable_zero_fraction:.0%} of the prunable weights {kept} "
            f"(a zero costs 4 bytes like any fp32 value) and the forward pass is "
            f"{_faster(s, d)}; only the `{fmt.removesuffix('_file_bytes')}` format shrinks the file "
            f"({_x(s[fmt], s.dense_file_bytes)}), and perplexity ({protocol}) is "
            f"{_ppl_change(s.perplexity, d.perplexity)}.")


def layer_masks(t: pd.DataFrame, layer: str) -> str:
    """What the masks of one layer share (the table of
    :func:`lab_utils.experiments.concepts.sparsification.mask_table`)."""
    m = t.set_index("mask")
    col = next(c for c in t.columns if c.startswith("share_pruned_by_"))
    ref = col.removeprefix("share_pruned_by_")
    shares = ", ".join(f"{name} {pct(v)}" for name, v in m[col].drop(ref).items())
    rows = ("every mask prunes the same fraction of every output row, because each ranks the weights "
            "within a row" if (m.row_sparsity_min == m.row_sparsity_max).all() else
            f"the sparsity of a row ranges from {pct(m.row_sparsity_min.min())} to {pct(m.row_sparsity_max.max())}")
    return (f"In `{layer}`, the share of each mask's pruned weights that {ref} pruning removes too: {shares}; "
            f"{rows}.")


def structured(t: pd.DataFrame, protocol: str = "quick") -> str:
    base, top = t.iloc[0], t.iloc[1:].sort_values("neurons_removed").iloc[-1]
    worst = t.iloc[1:].perplexity.max() / base.perplexity
    cost = (f"without retraining, perplexity ({protocol}) reaches {worst:.1f}x dense" if worst > 1.5 else
            f"perplexity ({protocol}) stays within {worst:.2f}x dense")
    return (f"Removing whole neurons shrinks parameters, file and memory alike ({top.neurons_removed:.0%} of "
            f"the MLP neurons: file {_x(top.file_bytes, base.file_bytes)}, forward "
            f"{_faster(top, base)}); {cost}.")


def quantization(t: pd.DataFrame, label: str, protocol: str = "quick") -> str:
    q = t.set_index("scheme")
    fp32, rest = q.loc["fp32"], q.iloc[1:]
    within = bool((rest.max_err_over_bound <= 1 + 1e-4).all())
    smallest = rest.file_bytes.idxmin()
    close = rest[rest.perplexity <= 1.01 * fp32.perplexity]
    return (f"Every scheme keeps {'every weight within' if within else 'not every weight within'} half a step of "
            f"its grid; **{smallest}** gives the smallest file ({_x(rest.loc[smallest, 'file_bytes'], fp32.file_bytes)} "
            f"of fp32), and {len(close)} of {len(rest)} schemes keep perplexity ({protocol}) within 1% of fp32.")


def q4_note(t: pd.DataFrame, label: str, levels: dict, stored_as: str | None = None) -> str:
    """What the comparison means when the baseline itself sits on a 4-bit grid."""
    q = t.set_index("scheme")
    gs = levels["group_size"]
    if levels["fraction_on_4bit_grid"] < 1:
        return (f"**Is the baseline already quantized?** No: {1 - levels['fraction_on_4bit_grid']:.1%} of "
                f"{label}'s blocks of {gs} weights hold more than 16 distinct values (up to "
                f"{levels['max_levels']}), so every scheme shows its full rounding error.")
    exact = [s for s in q.index if s.startswith("4-bit") and q.loc[s, "rel_error"] == 0]
    source = f" ({stored_as})" if stored_as else ""
    return (f"**The baseline is already 4-bit**{source}: every block of {gs} weights holds at most "
            f"{levels['max_levels']} distinct values, so the cost of 4 bits was paid before the baseline"
            + (f" and {', '.join(exact)} reproduces it exactly" if exact else "")
            + "; on an fp32 or bf16 model every scheme would show a larger error.")


def quantization_speed(t: pd.DataFrame, protocol: str = "quick") -> str:
    q = t.set_index("scheme")
    fp32 = q.loc["fp32"]
    dyn = [s for s in q.index if s.startswith("dynamic")]
    wo = [s for s in q.index if s not in dyn and s != "fp32"]
    slower = [s for s in wo if q.loc[s, "forward_cpu_s"] > fp32.forward_cpu_s]
    text = (f"{len(slower)} of {len(wo)} weight-only schemes run slower than fp32 (they dequantize each "
            f"weight on every call, with no fused low-bit kernel).")
    for s in dyn:
        r, ref = q.loc[s], q.loc[wo[0]]
        costly = r.perplexity > 1.1 * ref.perplexity
        text += (f" Torch's dynamic int8 is {_faster(r, fp32)}, and with the same weight error as "
                 f"{wo[0]} its perplexity ({protocol}) of {r.perplexity:,.2f} against {ref.perplexity:,.2f} is the "
                 f"cost of int8 *activations*: "
                 + ("large, because a few outlier channels stretch a per-tensor scale." if costly else
                    "small on this model."))
    return text


def distillation(t: pd.DataFrame, n_test: int, temperature: float, alpha: float, steps: int,
                 seed: int) -> str:
    m = t.set_index("model")
    di, lo = m.loc["student, distilled"], m.loc["student, labels only"]
    se = math.sqrt(max(di.accuracy * (1 - di.accuracy), 1e-12) / n_test)
    gap = di.accuracy - lo.accuracy
    if abs(gap) <= 2 * se:
        verdict = (f"the distilled and the label-only student are within two standard errors of each other "
                   f"({gap:+.1%}, standard error {se:.1%}): at this budget the soft targets neither help nor hurt")
    elif gap > 0:
        verdict = (f"the distilled student beats the label-only one by {gap:.1%}, more than two standard "
                   f"errors ({se:.1%})")
    else:
        verdict = (f"the label-only student beats the distilled one by {-gap:.1%}, more than two standard "
                   f"errors ({se:.1%}): the teacher's soft targets carry its own errors")
    return (f"After {steps} steps (T = {temperature:g}, alpha = {alpha:g}, seed {seed}, {n_test} test "
            f"sentences), {verdict}.")


def moe(t: pd.DataFrame, n_experts: int, width: int, label: str, activation: str,
        protocol: str = "quick") -> str:
    dense = t.dense_perplexity.iloc[0] if "dense_perplexity" in t else float("nan")
    partial = t[t.active_fraction < 1]
    sensitive = partial.perplexity.min() > 1.5 * dense
    head = (f"{label}'s MLPs ({width} neurons, split into {n_experts} experts by balanced k-means) ")
    if not sensitive:
        return head + f"keep perplexity ({protocol}) close to dense with a fraction of the neurons per token."
    why = ("" if activation.lower() == "relu" else
           f": {activation} activations are small but rarely exactly zero, so every dropped neuron removes "
           f"signal (MoEfication was shown on ReLU models)")
    return head + (f"lose more than 50% in perplexity ({protocol}) at every setting below 100% active{why}.")


def timings(t: pd.DataFrame, budget_s: float = 120.0) -> str:
    """Which demos met the time budget, in wall time and in CPU time / threads."""
    idle = t.cpu_s / t.threads
    text = ("Wall time per demo: " + ", ".join(f"{r.demo} {r.wall_s:.0f} s" for _, r in t.iterrows())
            + f". The machine's load average reached {t.load_average.max():.1f} during the run, on "
            f"{int(t.threads.iloc[0])} threads of this process; CPU time / threads, which estimates "
            f"the wall time on an idle machine, gives "
            + ", ".join(f"{r.demo} {i:.0f} s" for (_, r), i in zip(t.iterrows(), idle, strict=True))
            + ". ")
    wall_ok = t.wall_s <= budget_s
    idle_ok = idle <= budget_s
    if wall_ok.all():
        return text + f"Every demo stayed under {budget_s:.0f} s of wall time."
    if idle_ok.all():
        return text + (f"Every demo stayed under {budget_s:.0f} s in CPU time / threads; "
                       f"{(~wall_ok).sum()} exceeded it in wall time, which is the contention.")
    late = ", ".join(t.demo[~idle_ok])
    return text + (f"Over {budget_s:.0f} s even in CPU time / threads: {late}; "
                   f"smaller parameters (fewer windows, steps or sentences) bring it under.")


def quality_vs_file(sparse: pd.DataFrame, structured: pd.DataFrame, quant: pd.DataFrame,
                    protocol: str = "quick") -> str:
    """Which of the measured variants gives the smallest file for a given quality."""
    d = sparse.iloc[0]
    rows = [("sparsified (dense file)", sparse.iloc[1].dense_file_bytes, sparse.iloc[1].perplexity)]
    rows += [(f"{r.neurons_removed:.0%} of neurons pruned", r.file_bytes, r.perplexity)
             for _, r in structured.iloc[1:].iterrows()]
    rows += [(r.scheme, r.file_bytes, r.perplexity) for _, r in quant.iloc[1:].iterrows()]
    t = pd.DataFrame(rows, columns=["variant", "file_bytes", "perplexity"])
    close = t[t.perplexity <= 1.1 * d.perplexity]
    if close.empty:
        return f"No variant stayed within 10% of the dense perplexity ({protocol})."
    best = close.loc[close.file_bytes.idxmin()]
    return (f"Of the {len(close)} of {len(t)} variants within 10% of the dense perplexity ({protocol}), "
            f"**{best.variant}** has the smallest file ({_x(best.file_bytes, d.dense_file_bytes)} the dense one).")
