"""The notebook helpers of the report floor: the parameters table and table formatting."""

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
