"""The notebook helpers of the report floor: a run (its clock, its errors, a live parameter file),
the parameters table and table formatting."""

import json

import pandas as pd
import pytest
from papermill import inspect_notebook

from lab_utils.report import notebook as nbk
from lab_utils.report import params, runner

STEM = "03_sparsification_and_sizes"


def _defaults(stem=STEM):
    import ast

    path = runner.NOTEBOOKS_DIR / f"{stem}.ipynb"
    return {k: ast.literal_eval(v["default"]) for k, v in inspect_notebook(str(path)).items()}


def test_parameters_table_has_every_declared_parameter_and_its_source(monkeypatch):
    values = {**_defaults(), "seed": 3, "sparsities": [0.5]}
    monkeypatch.setenv(nbk.PARAMS_FILE_ENV, "params/smoke.yaml")
    # the file set seed and owl (owl to its default value); sparsities was edited by hand
    monkeypatch.setenv(nbk.PARAMS_KEYS_ENV, json.dumps(["owl", "seed"]))
    t = nbk.parameters_table(values, STEM).set_index("parameter")
    assert list(t.index) == list(params.declared(STEM))
    assert t.loc["seed", "set by"] == "params/smoke.yaml" and t.loc["seed", "value"] == "3"
    assert t.loc["seed", "default"] == "0"
    assert t.loc["owl", "set by"] == "params/smoke.yaml" and t.loc["owl", "default"] == ""
    assert t.loc["sparsities", "set by"] == "changed here" and t.loc["sparsities", "value"] == "[0.5]"
    assert t.loc["methods", "set by"] == "notebook default"
    assert t.loc["methods", "value"] == "['magnitude', 'wanda', 'sparsegpt']"
    assert t.loc["seqlen", "help"].startswith("tokens per calibration sample")


def test_parameters_table_outside_the_runner_compares_with_the_defaults(monkeypatch):
    monkeypatch.delenv(nbk.PARAMS_KEYS_ENV, raising=False)
    monkeypatch.delenv(nbk.PARAMS_FILE_ENV, raising=False)
    t = nbk.parameters_table({**_defaults(), "seed": 1}, STEM).set_index("parameter")
    assert (t["set by"] == "notebook default").sum() == len(t) - 1
    assert t.loc["seed", "set by"] == "changed here"


@pytest.mark.parametrize("x, shown", [(0.5, "50.0%"), (0.1, "10.0%"), (0.099999, "10.0%"), (0.0, "0%"), (1.0, "100%"),
                                      (0.000315377, "0.03%"), (0.99999, "99.999%"), (float("nan"), "—")])
def test_percent_keeps_small_values_visible(x, shown):
    assert nbk.percent(x) == shown


def test_format_table_shows_sparsities_and_accuracies_as_percentages():
    df = pd.DataFrame({"model": ["a", "b"], "requested": [0.1, 0.5], "actual_sparsity": [0.099999, 3.1538e-04],
                       "zero-shot accuracy (sst2)": [0.875, 0.5], "perplexity": [113.1234, 15091.13],
                       "params": [134515008, 22713216], "seconds": [0.000123, 2.5], "lower": [0.25, 0.5]})
    t = nbk.format_table(df)
    assert list(t.requested) == ["10.0%", "50.0%"]
    assert list(t.actual_sparsity) == ["10.0%", "0.03%"]
    assert list(t["zero-shot accuracy (sst2)"]) == ["87.5%", "50.0%"]
    assert list(t.perplexity) == ["113.1", "15,091"]
    assert list(t.params) == ["134,515,008", "22,713,216"]
    assert list(t.seconds) == ["0.000123", "2.5"]
    assert list(t.lower) == ["0.25", "0.5"]  # "lower" holds the letters of "wer", not the word
    assert df.requested.tolist() == [0.1, 0.5]  # the data are not changed
    # an index level or a column level named like a sparsity is formatted too
    p = df.pivot_table(index=["model", "requested"], values="perplexity")
    assert list(nbk.format_table(p).index.get_level_values("requested")) == ["10.0%", "50.0%"]
    wide = pd.DataFrame([[1.234, 2.0]], columns=pd.MultiIndex.from_tuples([("speedup", 0.5), ("speedup", 0.9)],
                                                                          names=[None, "sparsity"]))
    assert list(nbk.format_table(wide).columns.get_level_values("sparsity")) == ["50.0%", "90.0%"]
    assert nbk.format_table(df, percent_of=["lower"]).lower.tolist() == ["25.0%", "50.0%"]


# --------------------------------------------------------------------------- a run
@pytest.fixture()
def shell(tmp_path, monkeypatch):
    """An IPython shell in this process, as a kernel holds one (no history file)."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.delenv("LAB_NOTEBOOK", raising=False)
    monkeypatch.delenv(nbk.LIVE_PARAMS_ENV, raising=False)
    config = Config()
    config.HistoryManager.enabled = False
    sh = InteractiveShell.instance(config=config)
    try:
        yield sh
    finally:
        InteractiveShell.clear_instance()


def test_the_labs_errors_show_one_line_and_tb_the_traceback(shell, capsys):
    nbk.start({}, STEM)
    shell.run_cell("from lab_utils.report.params import validate_value\nvalidate_value('sparsities', [0.5, 1.5])")
    shown = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(shown) == 1 and "ParamError" in shown[0] and "1.5 is outside [0, 1)" in shown[0], shown
    assert "%tb" in shown[0]
    shell.run_cell("%tb")
    traceback = capsys.readouterr().out
    assert "Traceback" in traceback and "validate_value" in traceback and "params.py" in traceback
    shell.run_cell("int('x')")  # not the lab's: the whole traceback as usual
    assert "Traceback" in capsys.readouterr().out


def test_a_live_parameter_file_goes_over_the_defaults_left_unedited(monkeypatch):
    stem = "02_visualization"
    monkeypatch.setenv(nbk.PARAMS_FILE_ENV, "")  # restored after the test (apply sets it)
    monkeypatch.setenv(nbk.PARAMS_KEYS_ENV, "")
    namespace = {**_defaults(stem), "sparsities": [0.0, 0.7]}  # edited in the parameters cell
    smoke = runner.files.REPO_ROOT / "params" / "smoke.yaml"
    applied = nbk.apply_params_file(namespace, stem, smoke)
    assert applied == ["methods", "models", "seed"] and namespace["methods"] == ["magnitude"]
    t = nbk.parameters_table(namespace, stem).set_index("parameter")
    assert t.loc["methods", "set by"] == "params/smoke.yaml" and t.loc["methods", "value"] == "['magnitude']"
    assert t.loc["models", "set by"] == "params/smoke.yaml"
    assert t.loc["sparsities", "set by"] == "changed here" and t.loc["nsamples", "set by"] == "notebook default"
    namespace["methods"] = ["wanda"]  # edited after the file was applied: the edit wins
    assert "methods" not in nbk.apply_params_file(namespace, stem, smoke) and namespace["methods"] == ["wanda"]


def test_run_usage_counts_from_the_start_of_the_run():
    nbk.start({}, STEM)
    usage, process = nbk.run_usage(), nbk.process_usage()
    assert 0 <= usage["elapsed_s"] < 1 < process["elapsed_s"]  # this process imported torch: over a second
    assert 0 <= usage["cpu_s"] < process["cpu_s"]


def test_a_cached_timing_says_when_and_where_it_was_measured():
    import datetime as dt

    nbk.start({}, STEM)
    now = dt.datetime.now().astimezone()
    rows = pd.DataFrame({"demo": ["1 sparsification", "2 structured pruning"],
                         "measured": [(now - dt.timedelta(days=2)).isoformat(timespec="seconds"),
                                      now.isoformat(timespec="seconds")],  # this very second: this run
                         "host": ["node-a", "node-b"]})
    note = nbk.measured_note(rows)
    earlier = (now - dt.timedelta(days=2)).strftime("%Y-%m-%d %H:%M")
    assert note.startswith("Read back from the cache") and f"1 sparsification on `node-a` at {earlier}" in note
    assert "Measured in this run: 2 structured pruning" in note and "This run took" in note
    assert nbk.measured_note(rows.iloc[1:]) == "Measured in this run, on `node-b`."
