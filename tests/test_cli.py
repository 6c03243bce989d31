"""python -m lab_utils prune | perplexity: one JSON object out, one error line and status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab_utils.__main__ import main
from lab_utils.core import files

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args):
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "lab_utils", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_prune_then_perplexity_end_to_end(tiny_dirs, tmp_path, cache_with_data, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_dirs["llama"]), "--method", "wanda", "--sparsity", "0.5",
                 "--pattern", "2:4", "--nsamples", "4", "--seqlen", "32", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and len(printed.strip().splitlines()) == 1
    result = json.loads(printed)
    assert result["actual_sparsity"] == pytest.approx(0.5) and result["nm_verified"] is True
    assert result["coverage"] == 1.0 and "routers excluded" in result["actual_sparsity_over"]
    assert result["seconds"] > 0 and result["peak_memory_bytes"] > 0
    assert result["output"] == str(out.resolve()) and (out / "config.json").is_file()
    assert files.verify_dir(out)

    # the real entry point, in a fresh interpreter, reading the folder written above
    proc = run_cli("perplexity", "--model", str(out), "--seqlen", "16", "--windows", "3")
    assert proc.returncode == 0, proc.stderr
    ppl = json.loads(proc.stdout)
    assert ppl["windows"] == 3 and ppl["seqlen"] == 16 and ppl["perplexity"] > 1


@pytest.mark.parametrize("args,match", [
    (["--sparsity", "1.0"], r"\[0, 1\)"),
    (["--sparsity", "0.5", "--pattern", "4:2"], "N < M"),
    (["--sparsity", "0.5", "--method", "obs"], "unknown method"),
    (["--sparsity", "0.5", "--nsamples", "0"], "nsamples"),
    (["--sparsity", "half"], "invalid float"),
])
def test_prune_errors_are_one_line_and_status_2(tiny_dirs, capsys, args, match):
    argv = ["prune", "--model", str(tiny_dirs["llama"]), "--method", "wanda", *args]
    if "--method" in args:
        argv = ["prune", "--model", str(tiny_dirs["llama"]), *args]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr()
    assert code == 2 and err.out == ""
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert __import__("re").search(match, lines[0]), lines[0]


def test_out_never_replaces_an_unrelated_folder(tiny_dirs, tmp_path, capsys, cache_with_data):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("precious")
    code = main(["prune", "--model", str(tiny_dirs["llama"]), "--method", "magnitude",
                 "--sparsity", "0.5", "--out", str(keep)])
    assert code == 2 and "not a model folder" in capsys.readouterr().err
    assert (keep / "mine.txt").read_text() == "precious"


def test_perplexity_errors(tiny_dirs, capsys):
    assert main(["perplexity", "--model", str(tiny_dirs["bert"]), "--windows", "2"]) == 2
    assert "decoder-only" in capsys.readouterr().err
    assert main(["perplexity", "--model", "/no/such/folder"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_recover_prints_the_run_and_a_second_call_reads_the_cache(tiny_dirs, cache_with_data, capsys):
    argv = ["recover", "--model", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5",
            "--steps", "2", "--batch-size", "2", "--seqlen", "16", "--lr", "1e-3"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert len(printed.strip().splitlines()) == 1
    run = json.loads(printed)
    assert run["loss"] == "kd" and run["steps"] == 2 and len(run["history"]) == 2
    assert run["sparsity_before"] == run["sparsity_after"] == pytest.approx(0.5, abs=0.01)
    assert run["tokens"] == 2 * 2 * 16 and not run["from_cache"] and run["output"] == run["checkpoint"]
    assert files.verify_dir(run["checkpoint"])
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["from_cache"] and again["history"] == run["history"]


@pytest.mark.parametrize("args,match", [
    (["--loss", "sft"], "unknown recovery loss 'sft'"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--lr", "-1"], "lr must be a number > 0"),
    (["--sparsity", "0"], "nothing to recover"),
])
def test_recover_errors_are_one_line_and_status_2(tiny_dirs, cache_with_data, capsys, args, match):
    argv = ["recover", "--model", str(tiny_dirs["llama"]), "--method", "magnitude", "--sparsity", "0.5", *args]
    assert main(argv) == 2
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert err.out == "" and len(lines) == 1 and __import__("re").search(match, lines[0]), lines
