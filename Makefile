# megatron-vlm developer targets (GNU make).
#
#   make install     create .venv and install the package with its test tools (no-op when
#                    pyproject.toml has not changed since the last install)
#   make test        run the test suite (slow and gpu tests are left out; see pyproject.toml)
#   make quickstart  train the tiny VLM on the CPU and print its losses
#   make clean       remove caches and build leftovers (keeps .venv and runs/)
#   make distclean   clean, and remove .venv too

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
OFFLINE := HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
PYTEST_ARGS ?=

.PHONY: install test quickstart clean distclean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e '.[test]'
	touch $@

test: install
	$(OFFLINE) $(VPY) -m pytest -q $(PYTEST_ARGS)

quickstart: install
	$(OFFLINE) $(VPY) -m megatron_vlm.quickstart

clean:
	rm -f $(STAMP)
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
