"""The named evaluation protocols: defined once, looked up by name, labelled honestly."""

import ast
import subprocess
import sys

import pytest

from lab_utils.core.evaluation import protocols
from lab_utils.report import params


def test_the_three_protocols_and_their_sizes():
    assert {n: (p.eval_windows, p.eval_seqlen) for n, p in protocols.PROTOCOLS.items()} == {
        "quick": (4, 256), "sweep": (8, 256), "reference": (64, 512)}


def test_an_unknown_name_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"^protocol: 'fast' is not .*quick, sweep, reference"):
        protocols.get("fast")


def test_zero_takes_the_protocols_own_size_and_an_override_is_labelled():
    assert protocols.resolve("sweep") == (8, 256)
    assert protocols.resolve("quick", 2, 0) == (2, 256)
    assert protocols.label("sweep") == protocols.label("sweep", 8, 256) == "sweep"
    assert protocols.label("quick", 2, 64) == "quick, overridden: 2 x 64"
    with pytest.raises(ValueError, match="eval_windows: -1 must be a positive integer, or 0 for the quick"):
        protocols.resolve("quick", -1)


@pytest.mark.parametrize("name, value, ok", [
    ("protocol", "reference", True), ("protocol", "full", False), ("eval_windows", 0, True),
    ("eval_windows", -2, False), ("eval_seqlen", 64, True), ("eval_seqlen", 1.5, False)])
def test_notebook_parameters_name_a_protocol_or_override_it(name, value, ok):
    if ok:
        params.validate_value(name, value)
    else:
        with pytest.raises(params.ParamError, match=rf"^{name}: "):
            params.validate_value(name, value)


def test_notebooks_03_and_04_measure_under_one_protocol_by_default():
    """The benchmarks reuse the sweep's perplexities (same checkpoint, same windows):
    both notebooks must default to the same protocol."""
    d3, d4 = params.declared("03_sparsification_and_sizes"), params.declared("04_benchmarks")
    assert d3["protocol"]["default"] == d4["protocol"]["default"] == '"sweep"'
    assert params.declared("01_concepts")["protocol"]["default"] == '"quick"'
    cfg = params.benchmark_config({k: ast.literal_eval(v["default"]) for k, v in d4.items()})
    assert (cfg.bench.eval_windows, cfg.bench.eval_seqlen) == protocols.resolve("sweep")


def test_the_protocols_import_without_torch():
    """The CLI reads them before parsing its arguments: a typo must not wait for torch."""
    code = "import sys, lab_utils.core.evaluation.protocols; print('torch' in sys.modules, 'tqdm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
