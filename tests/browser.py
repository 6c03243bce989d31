"""Serve a folder on 127.0.0.1 and look at it in headless Debian Chromium."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-quic", "--no-first-run", "--window-size=1280,1600"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@contextlib.contextmanager
def serve(folder) -> Iterator[str]:
    """An HTTP server for ``folder`` on a free loopback port; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def browser_available() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK) and bool(
        shutil.which("chromedriver") or os.path.exists(CHROMEDRIVER))


@contextlib.contextmanager
def chromium_or_skip(user_data_dir) -> Iterator:
    """:func:`chromium` for a test. Under CI (CI=true) a machine without Chromium fails the
    test; elsewhere it skips it with the command that installs it."""
    import pytest

    if not browser_available():
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium/chromedriver not installed: `make test` installs them (make browser)")
        pytest.skip("no Chromium: run `make browser` (apt-get install chromium chromium-driver)")
    with chromium(user_data_dir) as driver:
        yield driver


@contextlib.contextmanager
def chromium(user_data_dir) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={user_data_dir}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


IMAGES_JS = """
return Array.from(document.images).map(i => [i.getAttribute('src').slice(0, 120), i.complete, i.naturalWidth]);
"""
LINKS_JS = """
return Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'));
"""
# Under print media: whether it applies, the navigation's display, the page width and
# how far right any image or table reaches, a table's font size and how rows break.
PRINT_LAYOUT_JS = """
const right = sel => Math.max(0, ...Array.from(document.querySelectorAll(sel)).map(
    e => e.getBoundingClientRect().right));
const table = document.querySelector('table'), row = document.querySelector('tr');
return {print: window.matchMedia('print').matches,
        nav: getComputedStyle(document.querySelector('nav')).display,
        page_width: document.documentElement.clientWidth,
        img_right: right('img'), table_right: right('table'),
        table_font: table ? parseFloat(getComputedStyle(table).fontSize) : null,
        row_break: row ? getComputedStyle(row).breakInside : null,
        print_rules: Array.from(document.styleSheets).flatMap(s => Array.from(s.cssRules))
            .filter(r => r.media && Array.from(r.media).includes('print')).length};
"""


# --------------------------------------------------------------------------- JupyterLab
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, poll: float = 0.5):
    """Call ``check()`` until it returns something truthy, and return that."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)
    return value


def lab_menu(driver, menu: str, item: str) -> None:
    """Click ``menu`` in JupyterLab's menu bar, then its entry ``item`` (as a user does)."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//div[contains(@class, 'lm-MenuBar-itemLabel') and text()='{menu}']").click()
    driver.find_element(By.XPATH, f"//div[contains(@class, 'lm-Menu-itemLabel') and text()='{item}']").click()


# Whether the open notebook is busy: the kernel's state, the status bar and each code cell's
# prompt (LAB_STATE_JS's first fields, without the text of every cell).
LAB_PROGRESS_JS = """
const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
if (!nb) return null;
const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
const bar = document.querySelector('#jp-main-statusbar');
return {kernel: status ? status.getAttribute('data-status') : null,
        statusbar: bar ? bar.innerText : '',
        prompts: Array.from(nb.querySelectorAll('.jp-Notebook .jp-Cell.jp-CodeCell')).map(
            c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '')};
"""
# The open notebook as JupyterLab shows it: the kernel's state (and the status bar's
# "Python 3 (llm-sparsity-lab) | Idle"), whether the document
# is marked modified, each code cell's prompt, what went to stderr (errors and warnings
# alike), the values cells returned, the figures and whether they loaded, the parameters table.
LAB_STATE_JS = """
const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
if (!nb) return null;
const tab = document.querySelector('.lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current');
const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
const cells = Array.from(nb.querySelectorAll('.jp-Notebook .jp-Cell.jp-CodeCell'));
const bar = document.querySelector('#jp-main-statusbar');
return {kernel: status ? status.getAttribute('data-status') : null,
        statusbar: bar ? bar.innerText : '',
        dirty: !!(tab && tab.classList.contains('jp-mod-dirty')),
        prompts: cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || ''),
        stderr: Array.from(nb.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
                     .map(e => e.innerText),
        results: nb.querySelectorAll('.jp-OutputArea-executeResult').length,
        images: Array.from(nb.querySelectorAll('.jp-OutputArea-output img')).map(i => [i.complete, i.naturalWidth]),
        tables: Array.from(nb.querySelectorAll('table.lab-parameters tr')).map(
            r => Array.from(r.cells).map(c => c.innerText.trim())),
        text: nb.querySelector('.jp-Notebook').innerText};
"""
