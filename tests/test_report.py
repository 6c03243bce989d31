"""The report runner: parameter checks before any work, and the smoke run."""

import json

import pytest
import yaml

from lab_utils.report import params, runner


def _write(tmp_path, text):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    return str(f)


def test_every_params_file_is_valid_offline_or_names_the_hub():
    for name in ("default", "smoke"):
        params.check_file(f"params/{name}.yaml")
    with pytest.raises(params.ParamError, match="hub"):
        params.check_file("params/full.yaml")
    params.check_file("params/full.yaml", check_hub=False)


@pytest.mark.parametrize("text,needle", [
    ("modles: [smollm2-135m]\n", "'modles' is not declared"),
    ("notebooks:\n  02_visualization:\n    decoder_model: smollm2-135m\n", "not declared by notebook 02"),
    ("models: [no-such-model]\n", "unknown model"),
    ("models: [gpt2-medium]\n", "Hugging Face hub"),
    ("seed: -1\n", "seed"),
    ("models: [smollm2-135m\n", "not valid YAML"),
    ("- just\n- a list\n", "mapping"),
    ("seed: zero\n", "seed"),
    ("models: []\n", r"^models: \[\] names no model"),
    ("notebooks:\n  04_benchmarks:\n    speed_models: []\n", r"^speed_models: \[\] names no model"),
    # the rules that span parameters, checked up front on the notebook's effective values
    ("notebooks:\n  01_concepts:\n    moe_active_fractions: [0.3]\n", "^moe_active_fractions: "),
    ("notebooks:\n  03_sparsification_and_sizes:\n    size_formats: [nm]\n", "^size_formats: .*N:M"),
    ("notebooks:\n  04_benchmarks:\n    size_formats: [bitmask-int8]\n", "^size_formats: .*lossy"),
    ("notebooks:\n  03_sparsification_and_sizes:\n    owl_sparsity: 1.0\n", "^owl_sparsity: "),
    ("eval_windows: -1\n", "^eval_windows: "),
    ("notebooks:\n  03_sparsification_and_sizes:\n    protocol: full\n", "^protocol: 'full'"),
    # what used to pass here and stop a notebook later: a format that is none, or one the notebook cannot use
    ("size_formats: [bitmask+zsdt]\n", "^size_formats: unknown format 'bitmask\\+zsdt'"),
    ("notebooks:\n  04_benchmarks:\n    size_formats: ['csr ']\n", "^size_formats: format 'csr ' is written 'csr'"),
    ("notebooks:\n  03_sparsification_and_sizes:\n    size_formats: [dense-fp16, dense-int8+zstd]\n",
     "^size_formats: .* no lossless format"),
    ("notebooks:\n  03_sparsification_and_sizes:\n    size_formats: [dense, bitmask]\n",
     "^size_formats: .* neither 'csr' nor a '\\+zstd' format"),
    ("notebooks:\n  03_sparsification_and_sizes:\n    size_formats: []\n", "^size_formats: \\[\\] holds no"),
    # a list that names one thing twice, or nothing
    ("methods: [wanda, sparsegpt, wanda]\n", "^methods: 'wanda' is listed twice; list each once"),
    ("models: [smollm2-135m, minilm-l6, smollm2-135m]\n", "^models: 'smollm2-135m' is listed twice"),
    ("notebooks:\n  03_sparsification_and_sizes:\n    sparsities: [0.5, 0.50]\n", "^sparsities: 0.5 is listed twice"),
    ("notebooks:\n  03_sparsification_and_sizes:\n    patterns: ['2:4', ' 2:4']\n",
     "^patterns: ' 2:4' names the same as '2:4'"),
    ("notebooks:\n  03_sparsification_and_sizes:\n    size_methods: []\n", r"^size_methods: \[\] names no method"),
    ("notebooks:\n  02_visualization:\n    sparsities: []\n", r"^sparsities: \[\] names no sparsity"),
    ("notebooks:\n  01_concepts:\n    student_layers: 0\n", "^student_layers: must be a positive integer"),
    ("notebooks:\n  01_concepts:\n    distill_test_size: 0\n", "^distill_test_size: must be a positive integer"),
])
def test_bad_parameters_fail_before_any_work(tmp_path, text, needle):
    with pytest.raises(params.ParamError, match=needle):
        params.check_file(_write(tmp_path, text))


@pytest.mark.parametrize("text", ["ppl_windows: 2\n", "notebooks:\n  04_benchmarks:\n    ppl_seqlen: 64\n"])
def test_an_old_parameter_name_is_refused_naming_the_new_one(tmp_path, text):
    old = "ppl_windows" if "windows" in text else "ppl_seqlen"
    with pytest.raises(params.ParamError, match=rf"^{old}: renamed, use 'eval_{old[4:]}'") as err:
        params.check_file(_write(tmp_path, text))
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("name,value,needle", [
    ("sparsities", [0.5, 1.2], r"1\.2 is outside \[0, 1\)"),
    ("patterns", ["4:2"], "pattern '4:2': N:M needs 0 < N < M"),
    ("methods", ["obs"], "unknown method 'obs'"),
    ("nsamples", 0, r"nsamples: must be a positive integer, got 0"),
    ("speed_tokens", -3, "positive"),
    ("probe_examples", 1.5, "positive"),
    ("scope", "blockwise", "unknown scope 'blockwise'"),
    ("models", [], r"\[\] names no model"),
])
def test_value_rules_by_parameter_name(name, value, needle):
    with pytest.raises(params.ParamError, match=needle):
        params.validate({name: value})
    with pytest.raises(params.ParamError, match=needle):  # suffixed names follow the same rule
        params.validate({f"size_{name}": value})


def test_a_list_may_name_one_thing_once_and_nothing_only_where_it_means_something():
    with pytest.raises(params.ParamError, match=r"^models: 'facebook/bart-large' names the same as 'bart-large'"):
        params.validate({"models": ["bart-large", "facebook/bart-large"]}, check_hub=False)
    with pytest.raises(params.ParamError, match=r"^zeroshot_tasks: 'lab_sentiment' is listed twice"):
        params.validate({"zeroshot_tasks": ["lab_sentiment", "lab_sentiment"]})
    with pytest.raises(params.ParamError, match=r"^sparsities: \[\] names no sparsity for the unstructured"):
        params.validate({"patterns": ["unstructured", "2:4"], "sparsities": []})
    params.validate({"patterns": ["2:4"], "sparsities": []})  # an N:M pattern has its own sparsity
    params.validate({"size_formats": []})  # notebook 04: no file measured (notebook 03 refuses it, above)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_answers_a_scheduler_nobody_listens_at_in_one_line(tmp_path, capsys):
    import time

    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    assert runner.main(["--params", _write(tmp_path, f"executor: {address}\n"), "--check"]) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: executor {address!r}: no Dask scheduler answers")
    scheduler_file = tmp_path / "scheduler.json"  # a scheduler file whose scheduler has gone
    scheduler_file.write_text(json.dumps({"address": address}))
    with pytest.raises(params.ParamError, match=rf"answers at {address} \(from {scheduler_file}\)"):
        params.validate({"executor": str(scheduler_file)})


def test_a_scheduler_passes_and_a_silent_port_or_network_is_answered_in_time(monkeypatch):
    import socket
    import threading
    import time

    from distributed import LocalCluster

    from lab_utils.experiments import executor as ex

    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as cluster:  # a scheduler in this process: no spawn
        params.validate({"executor": cluster.scheduler_address})
    with socket.socket() as silent:  # accepts (the kernel does) but never speaks as a scheduler does
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=r"no Dask scheduler answers .*\(no answer within 0.5 s\)"):
            ex.check_reachable(f"tcp://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        assert time.perf_counter() - t0 < 2
    release = threading.Event()  # a name lookup that never returns, until the test ends

    def hanging(*args, **kwargs):
        release.wait(30)
        raise OSError("released")

    monkeypatch.setattr(ex.socket, "create_connection", hanging)
    t0 = time.perf_counter()
    try:
        with pytest.raises(ValueError, match=r"no Dask scheduler answers .*\(no answer within 0.5 s\)"):
            ex.check_reachable("tcp://scheduler.invalid:8786", timeout=0.5)
        assert time.perf_counter() - t0 < 2
    finally:
        release.set()


def test_runner_exits_2_on_unknown_parameter_without_running(tmp_path, capsys):
    # in this process (`python -m lab_utils.report` is sys.exit(main()); the smoke report runs it)
    assert runner.main(["--params", _write(tmp_path, "sparsity_ratio: 0.5\n"), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "'sparsity_ratio' is not declared" in err and not out
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback
    assert not (tmp_path / "out" / "build").exists()


@pytest.mark.slow  # the smoke report: every notebook (make test-fast leaves it out)
def test_smoke_report_runs_every_notebook_and_renders(smoke_report):
    out, proc = smoke_report
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "build" / "run.json").read_text())
    names = [r["name"] for r in run["runs"]]
    assert names == [p.stem for p in runner.notebook_paths()]
    assert all(r["status"] == "ok" for r in run["runs"])
    for r in run["runs"]:
        html = (out / "report" / f"{r['name']}.html").read_text()
        # offline-readable: no CDN script (MathJax, require.js, the widget manager from unpkg)
        assert "cdnjs" not in html and "unpkg" not in html and "<script src=\"http" not in html
        assert "Traceback" not in html
    index = (out / "report" / "index.html").read_text()
    for name in names:
        assert f"{name}.html" in index
    assert yaml.safe_load(open("params/smoke.yaml"))["models"][0] in index


@pytest.mark.slow
def test_executed_notebooks_have_no_error_outputs(smoke_report):
    import nbformat

    out, _ = smoke_report
    for path in sorted((out / "build" / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: {errors[0].get('ename')}"


def test_widget_views_and_state_are_dropped_before_rendering():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output("display_data", data={runner.WIDGET_VIEW: {"model_id": "a"},
                                                     "text/plain": "HBox(children=...)"}),
        nbformat.v4.new_output("display_data", data={runner.WIDGET_VIEW: {"model_id": "b"},
                                                     "image/png": "iVBOR"}),
        nbformat.v4.new_output("stream", text="kept\n"),
    ]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), cell]
    runner.drop_widgets(nb)
    assert "widgets" not in nb.metadata
    # the bare widget view is gone; the one with an image keeps only the image; text stays
    assert [sorted(o.get("data", {})) for o in cell.outputs] == [["image/png"], []]
    assert cell.outputs[1].text == "kept\n"


def test_rendered_page_hides_both_parameter_cells(tmp_path):
    # The defaults cell and papermill's injected cell (only the keys the file set) are
    # left out; the validation cell's table of every effective value is what shows.
    import nbformat

    nb = nbformat.v4.new_notebook()
    defaults = nbformat.v4.new_code_cell("seed: int = 0  # seed_default_marker", metadata={"tags": ["parameters"]})
    injected = nbformat.v4.new_code_cell("# Parameters\nseed = 3  # injected_marker",
                                         metadata={"tags": ["injected-parameters"]})
    table = nbformat.v4.new_code_cell("nbk.show_parameters(checked)", metadata={"tags": ["remove-input"]})
    table.outputs = [nbformat.v4.new_output("display_data", data={"text/html": "<p>parameters_table_marker</p>"})]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), defaults, injected, table]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, str(path))
    html = runner.render_html(path, tmp_path / "n.html").read_text()
    assert "parameters_table_marker" in html
    assert "seed_default_marker" not in html and "injected_marker" not in html
    assert "nbk.show_parameters" not in html


@pytest.mark.slow
def test_rendered_notebooks_open_with_the_parameters_table_and_leak_no_hidden_value(smoke_report):
    import nbformat

    out, _ = smoke_report
    for path in sorted((out / "build" / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if "remove-input" in cell.metadata.get("tags", []):
                results = [o for o in cell.get("outputs", []) if o.get("output_type") == "execute_result"]
                assert not results, f"{path.name}: a hidden cell shows {results[0]['data'].get('text/plain')!r}"
        html = (out / "report" / f"{path.stem}.html").read_text()
        assert "lab-parameters" in html and "# Parameters" not in html, path.stem
        assert "params/smoke.yaml" in html


def test_declared_parameters_read_without_papermill_equal_papermills():
    # --check reads the parameters cells with ast (importing papermill costs seconds); the
    # entries must stay exactly what papermill's inspect_notebook gives for every notebook
    from papermill import inspect_notebook

    from lab_utils.report import params
    for nb in params.notebook_names():
        assert params.declared(nb) == inspect_notebook(str(params.NOTEBOOKS_DIR / f"{nb}.ipynb")), nb
