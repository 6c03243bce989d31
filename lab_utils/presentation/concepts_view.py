"""Sentences that state notebook 01's results, written from the measured tables.

Each function takes a demo's table and returns Markdown; every number and
every comparison word ("faster", "smaller", "beats") comes from the data, so
the text flips when the data do.
"""

from __future__ import annotations

import math

import pandas as pd

MB = 1e6


def _x(new: float, old: float) -> str:
    return f"{new / old:.2f}x"


def _faster(new, old, tol: float = 0.05) -> str:
    """'1.31x faster' / '1.20x slower' / 'about as fast' for two table rows with
    ``forward_cpu_s`` and ``forward_s``. The verdict uses CPU time, which other
    processes on a shared machine disturb less than wall time; both are shown."""
    r = old.forward_cpu_s / new.forward_cpu_s
    w = old.forward_s / new.forward_s
    both = f"CPU time {old.forward_cpu_s:.2f} s -> {new.forward_cpu_s:.2f} s, wall time x{w:.2f}"
    if abs(r - 1) <= tol:
        return f"about as fast ({both})"
    return (f"{r:.2f}x faster" if r > 1 else f"{1 / r:.2f}x slower") + f" ({both})"


def _ppl_change(new: float, old: float) -> str:
    r = new / old
    if abs(r - 1) < 0.005:
        return f"unchanged at {new:.2f}"
    return f"{'up' if r > 1 else 'down'} from {old:.2f} to {new:.2f} ({r - 1:+.1%})"


CORPORA = {"nyt": "NYT editorial", "wikitext2": "WikiText-2 (test split)"}


def baseline(label: str, parameters: int, ppl: float, windows, corpus: str, file_bytes: int) -> str:
    corpus = CORPORA.get(corpus, corpus)
    return (f"**Baseline.** {label} has {parameters:,} parameters; its `save_pretrained` weights "
            f"file is {file_bytes / MB:.1f} MB and its perplexity is {ppl:.2f} on "
            f"{windows.shape[0]} windows of {windows.shape[1]} tokens of the {corpus} text "
            f"(lower is better). Every quality number below uses these same windows.")


def sparsification(t: pd.DataFrame, method: str) -> str:
    d, s = t.iloc[0], t.iloc[1]
    fmt = [c for c in t.columns if c.endswith("_file_bytes") and c != "dense_file_bytes"][0]
    fmt_name = fmt.removesuffix("_file_bytes")
    same_params = "stays exactly" if s.parameters == d.parameters else "changes from " + f"{d.parameters:,} to"
    same_file = ("is byte for byte the same size" if s.dense_file_bytes == d.dense_file_bytes
                 else f"changes size ({d.dense_file_bytes:,} -> {s.dense_file_bytes:,} bytes)")
    same_mem = "the same" if s.memory_bytes == d.memory_bytes else "different"
    return (
        f"{method.capitalize()} pruning zeroed {s.prunable_zero_fraction:.1%} of the prunable weights "
        f"(the dense model already had {d.prunable_zero_fraction:.2%} exact zeros there); over all "
        f"parameters the zero fraction went from {d.zero_fraction:.2%} to {s.zero_fraction:.2%}, "
        f"because the embeddings and norms are not pruned. The parameter count {same_params} "
        f"{s.parameters:,}, the dense checkpoint {same_file} ({s.dense_file_bytes / MB:.1f} MB), "
        f"and the memory the model occupies is {same_mem} ({s.memory_bytes / MB:.1f} MB): a zero "
        f"costs 4 bytes like any other fp32 value. The forward pass, still dense matrix products, "
        f"is {_faster(s, d)}. "
        f"Only a format that skips the zeros shrinks the file: in the `{fmt_name}` format of "
        f"`lab_utils.experiments.file_sizes` (one bit per weight plus the kept values) the sparsified model takes "
        f"{s[fmt] / MB:.1f} MB, {_x(s[fmt], s.dense_file_bytes)} the dense file (notebook 03 "
        f"compares the formats). The price in quality: perplexity {_ppl_change(s.perplexity, d.perplexity)}.")


def structured(t: pd.DataFrame) -> str:
    base = t.iloc[0]
    parts = []
    for _, r in t.iloc[1:].iterrows():
        parts.append(
            f"removing {r.neurons_removed:.0%} of the MLP neurons (width {int(base.mlp_width)} -> "
            f"{int(r.mlp_width)}) deletes {int(r.removed):,} parameters "
            f"({r.removed / base.parameters:.1%} of the model): the file shrinks to "
            f"{r.file_bytes / MB:.1f} MB ({_x(r.file_bytes, base.file_bytes)}), the forward pass is "
            f"{_faster(r, base)}, and perplexity goes "
            f"{_ppl_change(r.perplexity, base.perplexity)}")
    worst = t.iloc[1:].perplexity.max() / base.perplexity
    cost = (f"With no retraining the quality cost grows quickly, up to {worst:.1f}x the dense "
            f"perplexity here; pruning papers recover much of it by fine-tuning or distillation "
            f"after the cut." if worst > 1.5 else
            f"The quality cost stays small here (at most {worst:.2f}x the dense perplexity).")
    return ("Unlike sparsification, pruning whole neurons makes the parameter count, the file and "
            "the memory smaller: " + "; ".join(parts) + ". " + cost)


def quantization(t: pd.DataFrame, label: str) -> str:
    q = t.set_index("scheme")
    fp32 = q.loc["fp32"]
    lines = []
    for name, r in q.iloc[1:].iterrows():
        bound = ("within" if r.max_err_over_bound <= 1 + 1e-4 else "beyond")
        lines.append(
            f"- **{name}**: {r.bits_per_weight:.2f} bits per quantized weight, file "
            f"{r.file_bytes / MB:.1f} MB ({_x(r.file_bytes, fp32.file_bytes)}), memory "
            f"{r.memory_bytes / MB:.1f} MB; relative weight error {r.rel_error:.2%}, every weight "
            f"{bound} half a step (largest error / bound = {r.max_err_over_bound:.3f}); forward "
            f"{_faster(r, fp32)}; perplexity {_ppl_change(r.perplexity, fp32.perplexity)}.")
    return "\n".join(lines)


def q4_note(t: pd.DataFrame, label: str, levels: dict, stored_as: str | None = None) -> str:
    """What the comparison means when the baseline itself sits on a 4-bit grid."""
    q = t.set_index("scheme")
    g = [s for s in q.index if s.startswith("4-bit")]
    gs = levels["group_size"]
    if levels["fraction_on_4bit_grid"] < 1:
        return (f"**Is the baseline already quantized?** No: {1 - levels['fraction_on_4bit_grid']:.1%} "
                f"of {label}'s blocks of {gs} consecutive weights hold more than 16 distinct values "
                f"(up to {levels['max_levels']}), so every scheme above shows its full rounding error.")
    source = f" ({stored_as})" if stored_as else ""
    text = (f"**The baseline is already 4-bit.** Every block of {gs} consecutive weights of "
            f"{label}'s prunable layers holds at most {levels['max_levels']} distinct values: the "
            f"signature of a 4-bit block format with one step and one minimum per block, which is "
            f"how the weights reached this lab{source}. The fp32 \"dense\" baseline is that 4-bit "
            f"model, dequantized, so the quality cost of 4 bits was paid before the baseline. ")
    exact = [s for s in g if q.loc[s, "rel_error"] == 0]
    if exact:
        text += (f"Quantizing it again with the same layout ({', '.join(exact)}) puts every weight "
                 f"back on its own grid: the reconstruction error is exactly zero and the perplexity "
                 f"is unchanged. ")
    others = [s for s in g if s not in exact]
    if others:
        text += ("A grid that does not line up with the original blocks does add error: "
                 + ", ".join(f"{q.loc[s, 'rel_error']:.2%} for {s}" for s in others) + ". ")
    text += ("The int8 schemes measure 8-bit rounding of a 4-bit model; on a model stored in "
             "fp32 or bf16, every scheme would show a larger error than it does here.")
    return text


def quantization_speed(t: pd.DataFrame) -> str:
    q = t.set_index("scheme")
    fp32 = q.loc["fp32"]
    dyn = [s for s in q.index if s.startswith("dynamic")]
    wo = [s for s in q.index if s not in dyn and s != "fp32"]
    slower = [s for s in wo if q.loc[s, "forward_cpu_s"] > fp32.forward_cpu_s]
    text = ("The weight-only schemes keep integers in memory and dequantize a layer's weight each "
            "time it runs, then multiply in fp32: ")
    text += (f"{len(slower)} of {len(wo)} are slower than fp32 here, the price of dequantizing "
             f"without a fused low-bit kernel. " if slower else "none is slower than fp32 here. ")
    for s in dyn:
        r = q.loc[s]
        text += (f"Torch's dynamic int8 runs int8 matrix products and is "
                 f"{_faster(r, fp32)}; its weights carry the same error as int8 "
                 f"per channel, so its perplexity ({r.perplexity:.2f}, vs "
                 f"{q.loc[wo[0], 'perplexity']:.2f} for {wo[0]}) measures what quantizing the "
                 f"*activations* to int8 per tensor costs: ")
        text += ("a lot, because LLM activations have a few outlier channels that stretch a "
                 "per-tensor scale (the problem LLM.int8() and SmoothQuant address)."
                 if r.perplexity > 1.1 * q.loc[wo[0], "perplexity"] else "little on this model.")
    return text


def distillation(t: pd.DataFrame, n_test: int, temperature: float, alpha: float, steps: int,
                 seed: int) -> str:
    m = t.set_index("model")
    te, un = m.loc["teacher"], m.loc["student, probe only"]
    di, lo = m.loc["student, distilled"], m.loc["student, labels only"]
    se = math.sqrt(max(di.accuracy * (1 - di.accuracy), 1e-12) / n_test)
    gap = di.accuracy - lo.accuracy
    if abs(gap) <= 2 * se:
        verdict = (f"the two students are within two standard errors of each other "
                   f"({gap:+.1%}, standard error {se:.1%} on {n_test} test sentences): at this budget "
                   f"the soft targets neither help nor hurt measurably")
    elif gap > 0:
        verdict = (f"the distilled student beats the label-only one by {gap:.1%} "
                   f"(more than two standard errors, {se:.1%} each on {n_test} sentences)")
    else:
        verdict = (f"the label-only student beats the distilled one by {-gap:.1%} "
                   f"(more than two standard errors, {se:.1%} each on {n_test} sentences): the "
                   f"teacher's soft targets carry its own errors")
    return (
        f"The teacher ({int(te.layers)} layers, {int(te.parameters):,} parameters) classifies "
        f"{te.accuracy:.1%} of the test sentences correctly. Cutting it to its first "
        f"{int(di.layers)} layers keeps {di.parameters / te.parameters:.0%} of the parameters "
        f"({int(di.parameters):,}, of which {di.embedding_parameters / di.parameters:.0%} are the "
        f"embedding layer, which stays frozen in training) and, with "
        f"a probe fitted on its own frozen features, scores {un.accuracy:.1%}. After {steps} steps (seed {seed}), the student "
        f"distilled with temperature T = {temperature:g} and soft-target weight alpha = {alpha:g} "
        f"reaches {di.accuracy:.1%} ({di.agreement_with_teacher:.1%} agreement with the teacher) and "
        f"the student trained on the labels alone reaches {lo.accuracy:.1%}: {verdict}. On a batch "
        f"of test sentences the student is {_faster(di, te)} compared with the teacher.")


def moe(t: pd.DataFrame, n_experts: int, width: int, label: str, activation: str) -> str:
    dense = t.dense_perplexity.iloc[0] if "dense_perplexity" in t else float("nan")
    parts = []
    for router, g in t.groupby("router", sort=False):
        g = g[g.active_fraction < 1]
        items = ", ".join(f"{r.active_fraction:.1%} active -> perplexity {r.perplexity:,.1f} "
                          f"({r.captured:.1%} of the MLP output captured)" for _, r in g.iterrows())
        parts.append(f"with the **{router}** router: {items}")
    full = t[t.active_fraction == 1]
    full_txt = ""
    if not full.empty:
        f = full.iloc[0]
        full_txt = (f" With every expert active the model is the dense one again (perplexity "
                    f"{f.perplexity:.2f} vs {dense:.2f}, {f.captured:.4%} of the output captured).")
    lin = t[(t.router == "linear") & (t.active_fraction < 1)]
    recall = ""
    if not lin.empty and lin.router_recall.notna().any():
        recall = (" On held-out calibration text the linear router finds "
                  + ", ".join(f"{r.router_recall:.0%} of the true top-{int(r.top_k)}"
                              for _, r in lin.iterrows()) + " experts.")
    sensitive = t[(t.active_fraction < 1)].perplexity.min() > 1.5 * dense
    relu = activation.lower() == "relu"
    if not sensitive:
        lesson = " A fraction of the neurons per token is enough to keep perplexity close to dense."
    elif relu:
        lesson = (" Every setting below 100% raises perplexity by more than 50%: the dropped "
                  "neurons still carry output, and the errors add up over the layers.")
    else:
        lesson = (f" Every setting below 100% raises perplexity by more than 50%: {label}'s MLP "
                  f"uses {activation}, whose activations are small but rarely exactly zero, so "
                  f"dropping neurons removes real signal in every layer and the errors add up "
                  f"(compare the captured fractions, close to 1 per layer, with the perplexity). "
                  f"MoEfication was shown on ReLU models, where most activations are exactly zero; "
                  f"later work first makes a model ReLU-sparse (\"ReLUfication\") before splitting it.")
    return (f"Each MLP's {width} neurons were split into {n_experts} experts of {width // n_experts} "
            f"by balanced k-means; perplexity dense {dense:.2f}; " + "; ".join(parts) + "."
            + full_txt + recall + lesson)


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


def quality_vs_file(sparse: pd.DataFrame, structured: pd.DataFrame, quant: pd.DataFrame) -> str:
    """Which of the measured variants gives the smallest file for a given quality."""
    d = sparse.iloc[0]
    rows = [("sparsified (dense file)", sparse.iloc[1].dense_file_bytes, sparse.iloc[1].perplexity)]
    rows += [(f"{r.neurons_removed:.0%} of neurons pruned", r.file_bytes, r.perplexity)
             for _, r in structured.iloc[1:].iterrows()]
    rows += [(r.scheme, r.file_bytes, r.perplexity) for _, r in quant.iloc[1:].iterrows()]
    t = pd.DataFrame(rows, columns=["variant", "file_bytes", "perplexity"])
    close = t[t.perplexity <= 1.1 * d.perplexity]
    text = ""
    if not close.empty:
        best = close.loc[close.file_bytes.idxmin()]
        text += (f"Of the variants within 10% of the dense perplexity, **{best.variant}** has the "
                 f"smallest file: {best.file_bytes / MB:.1f} MB, {_x(best.file_bytes, d.dense_file_bytes)} "
                 f"the dense one, at perplexity {best.perplexity:.2f}. ")
    else:
        text += "No variant stayed within 10% of the dense perplexity. "
    far = t[t.perplexity > 1.1 * d.perplexity]
    if not far.empty:
        text += ("Beyond 10%: " + ", ".join(f"{r.variant} ({r.file_bytes / MB:.0f} MB, perplexity "
                                            f"{r.perplexity:,.1f})" for _, r in far.iterrows()) + ".")
    return text
