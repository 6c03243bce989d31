"""JupyterLab as a student uses it: `make lab PARAMS=FILE`, notebook 02 opened in headless
Debian Chromium, Run All from the menu, saved, then a bad value typed into the parameters cell. Under CI (CI=true) a browser that cannot start fails the test; elsewhere a
machine without Chromium skips it with the command that installs it.
"""

import ast
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from browser import LAB_PROGRESS_JS, LAB_STATE_JS, chromium_or_skip, free_port, lab_menu, wait_for

from lab_utils.report import runner

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "02_visualization.ipynb"


def lab_params(model: Path) -> str:
    """The cheapest Run All that still shows every kind of figure: notebook 02 with magnitude
    only (params/smoke.yaml's choice: no calibration) on a tiny BERT folder (tests/tiny_models.py).
    A folder loads through the same load_model as a preset; its statistics take milliseconds where
    MiniLM's took seconds of the kernel's CPU (the smoke report draws MiniLM's figures)."""
    return f"models: [{json.dumps(str(model))}]\nnotebooks:\n  02_visualization:\n    methods: [magnitude]\n"

# A wait this long is a hung test, not a busy machine (the tests run at a lower priority than the
# smoke report beside them: tests/conftest.py).
HUNG_S = 600
URL_LINE = re.compile(r"^\s+(http://127\.0\.0\.1:\d+/lab\?token=(\S+))$", re.M)
HIDDEN = {"remove-input", "remove-cell", "remove-output"}
# Calls that show something themselves and return None.
SHOWING = {"md", "record", "show_table", "show_figure", "show_parameters", "setup", "start", "print", "display"}


@pytest.mark.parametrize("path", runner.notebook_paths(), ids=lambda p: p.stem)
def test_hidden_cells_show_no_return_value(path):
    # A hidden (plumbing) cell whose last line is a value, such as a list of the paths it
    # wrote, shows that value in a live kernel: only calls that show and return None end one.
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code" or not HIDDEN & set(cell["metadata"].get("tags", [])):
            continue
        body = ast.parse("".join(cell["source"])).body
        last = body[-1] if body else None
        if isinstance(last, ast.Expr):
            func = last.value.func if isinstance(last.value, ast.Call) else None
            name = getattr(func, "attr", getattr(func, "id", None))
            assert name in SHOWING, f"{path.name}: a hidden cell ends with a value: {ast.unparse(last)}"


@pytest.mark.slow  # make and a Python that imports the lab: seconds
def test_make_lab_checks_its_parameter_file_before_starting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsities: [0.5, 1.5]\n")
    proc = subprocess.run(["make", "-s", "lab", f"PARAMS={bad}", f"LAB_PORT={free_port()}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "JupyterLab on" not in proc.stdout, proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: sparsities:") and "1.5" in errors[0], proc.stderr


# --------------------------------------------------------------------------- in the browser
# JupyterLab's own settings for the test: no news or update checks (nothing outside is reached),
# every cell in the page (no windowing), no autosave (the test saves when a user would).
SETTINGS = {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
            "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
            "@jupyterlab/docmanager-extension/plugin": {"autosave": False}}


def _git(clone: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(clone), *args], check=True, capture_output=True, text=True).stdout


def _stop(proc: subprocess.Popen) -> None:
    """make, the JupyterLab it started and its kernels: the server first (it shuts its kernels
    down), then whatever is left."""
    with contextlib.suppress(psutil.NoSuchProcess):
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        with contextlib.suppress(psutil.NoSuchProcess):
            family[1 if len(family) > 1 else 0].send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=20)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


@pytest.fixture()
def lab(tmp_path, tiny_dirs):
    """`make lab PARAMS=FILE` on a git clone of the notebooks whose filter `make git-filter`
    set up: (base URL, token, the clone, the output root, the parameter file)."""
    clone, out = tmp_path / "clone", tmp_path / "out"
    (clone / "notebooks").mkdir(parents=True)
    for p in runner.notebook_paths():
        shutil.copy(p, clone / "notebooks" / p.name)
    for name in (".gitattributes", ".gitignore"):
        shutil.copy(REPO / name, clone / name)
    (tmp_path / "lab.yaml").write_text(lab_params(tiny_dirs["bert"]))
    _git(clone, "init", "-q")
    subprocess.run(["make", "-s", "git-filter"], cwd=REPO, env=dict(os.environ, GIT_DIR=str(clone / ".git")),
                   check=True, timeout=120)
    _git(clone, "add", ".")
    _git(clone, "-c", "user.name=lab", "-c", "user.email=lab@localhost", "commit", "-qm", "the notebooks")
    for name, values in SETTINGS.items():
        path = tmp_path / "lab-settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = dict(os.environ, LAB_OUTPUT_DIR=str(out), JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"), JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"), IPYTHONDIR=str(tmp_path / "ipython"))
    env.pop("TQDM_DISABLE", None)  # as in a user's kernel: the lab's progress bars draw
    log = tmp_path / "lab.log"
    with log.open("w") as stdout:
        proc = subprocess.Popen(["make", "-s", "lab", f"PARAMS={tmp_path / 'lab.yaml'}", f"LAB_PORT={free_port()}",
                                 f"LAB_DIR={clone / 'notebooks'}", "LAB_ARGS=--no-browser"],
                                cwd=REPO, env=env, stdout=stdout, stderr=subprocess.STDOUT)
    try:
        def started():
            assert proc.poll() is None, log.read_text()
            return URL_LINE.search(log.read_text())

        url = wait_for(started, HUNG_S, "make lab printing its URL")
        base, token = url[1].split("/lab?")[0], url[2]

        def answers():
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as resp:
                    return resp.status == 200
        wait_for(answers, HUNG_S, "JupyterLab answering")
        yield base, token, clone, out, tmp_path / "lab.yaml"
    finally:
        _stop(proc)


@pytest.fixture()
def driver(tmp_path_factory):
    with chromium_or_skip(tmp_path_factory.mktemp("chrome-profile-lab")) as d:
        d.set_window_size(1280, 1000)
        yield d


def _state(driver) -> dict:
    return driver.execute_script(LAB_STATE_JS)


def _running(driver) -> bool:
    """Whether a cell of the open notebook is running or waiting to run."""
    s = driver.execute_script(LAB_PROGRESS_JS)
    return bool(s) and any("*" in p for p in s["prompts"])


def _settled(driver):
    """The notebook's state once it is shown, its kernel started and idle, no cell waiting to run.
    Polled with the few fields that say so (the whole state reads the text of every cell, which
    costs the browser a layout each time); the whole state once they do."""
    s = driver.execute_script(LAB_PROGRESS_JS)
    if s and s["prompts"] and s["kernel"] == "idle" and "| Idle" in s["statusbar"] \
            and not any("*" in p for p in s["prompts"]):
        return _state(driver)
    return None


@pytest.mark.browser
def test_notebook_02_in_jupyterlab(driver, lab, tmp_path):  # no browser: skipped before JupyterLab starts
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, token, clone, out, lab_params = lab
    shots = tmp_path / "screenshots"
    shots.mkdir()
    path = clone / "notebooks" / NOTEBOOK
    committed = path.read_bytes()
    # as committed, byte for byte what the filter writes: nothing for it to normalize later
    blob = _git(clone, "rev-parse", f"HEAD:notebooks/{NOTEBOOK}").strip()
    assert _git(clone, "hash-object", "--no-filters", str(path)).strip() == blob

    # Opening the notebook does not modify it.
    driver.get(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
    state = wait_for(lambda: _settled(driver), HUNG_S, "the notebook open, its kernel idle")
    driver.save_screenshot(str(shots / "1-opened.png"))
    assert not state["dirty"], "JupyterLab marks the notebook modified on opening"
    assert path.read_bytes() == committed

    # Run All from the menu, after a user's pause: "this notebook ran for" counts the run only.
    time.sleep(3)
    lab_menu(driver, "Run", "Run All Cells")
    t0 = time.monotonic()
    wait_for(lambda: _running(driver), HUNG_S, "Run All starting")
    state = wait_for(lambda: _settled(driver), HUNG_S, "Run All finishing")
    ran = time.monotonic() - t0
    driver.execute_script("document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer')"
                          "?.scrollTo(0, 0)")
    driver.save_screenshot(str(shots / "2-run-all.png"))
    driver.execute_script("document.querySelector('.jp-OutputArea-output img').scrollIntoView()")
    driver.save_screenshot(str(shots / "2-first-figure.png"))
    assert all(re.fullmatch(r"\[\d+\]:", p.strip()) for p in state["prompts"]), state["prompts"]
    assert not state["stderr"], state["stderr"]
    assert state["results"] == 0, "a cell showed its return value"
    assert "Loading weights" not in state["text"]
    figures = sorted((out / "figs").glob("*.png"))
    assert figures and len(state["images"]) == len(figures), (len(state["images"]), figures)
    assert all(complete and width > 0 for complete, width in state["images"])
    rows = {r[0]: r for r in state["tables"]}
    assert rows["methods"][1:3] == ["['magnitude']", str(lab_params)], rows["methods"]
    assert rows["sparsities"][2] == "notebook default", rows["sparsities"]
    said = re.search(r"This notebook ran for (\d+) s", state["text"])
    assert said and int(said[1]) <= ran + 1, (said and said[0], ran)

    # Saved, outputs and all: git sees no change, and a commit would hold none (its filter
    # strips them; `git status` lists the file until `git add` because its size changed).
    ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
    wait_for(lambda: not _state(driver)["dirty"], HUNG_S, "the notebook saved")
    assert any(c.get("outputs") for c in json.loads(path.read_text())["cells"])
    assert _git(clone, "diff", "--stat") == ""
    _git(clone, "add", "-A")
    assert _git(clone, "status", "--porcelain") == ""

    # A bad value typed into the parameters cell: one line says what is wrong.
    editor = driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell")[1]
    editor.find_element(By.CSS_SELECTOR, ".cm-content").click()
    (ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.END).key_up(Keys.CONTROL)
     .send_keys(Keys.ENTER, "sparsities = [0.0, 1.5]")
     .key_down(Keys.SHIFT).send_keys(Keys.ENTER).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform())
    state = wait_for(lambda: (s := _settled(driver)) and s["stderr"] and s, HUNG_S, "the error shown")
    driver.save_screenshot(str(shots / "3-bad-value.png"))
    lines = [line for line in state["stderr"][0].splitlines() if line.strip()]
    assert len(state["stderr"]) == 1 and len(lines) == 1, state["stderr"]
    assert lines[0].startswith("ParamError: sparsities:") and "1.5 is outside [0, 1)" in lines[0], lines
