# megatron-vlm developer targets (GNU make).
#
#   make install     create .venv and install the package with its test tools (no-op when
#                    pyproject.toml has not changed since the last install)
#   make test        the default test tier: every module, in minutes (tests marked slow or gpu
#                    are left out; docs/testing.md)
#   make test-all    every test that runs without a GPU, the slow ones included (what CI runs)
#   make quickstart  the paper in miniature on the CPU (text -> image-text -> fine-tuning ->
#                    evaluation with and without the images), about 15 minutes on 2 cores
#   make wheelhouse  download what an air-gapped GPU machine installs into wheelhouse/, in copies
#                    that fit one 64 MiB command with the working tree (WHEEL_PYTHON,
#                    WHEEL_PLATFORM, WHEEL_TORCH, TE=VERSION|none, TE_CUDA, WHEEL_BATCH_MIB; see
#                    docs/gpu.md); tools/gpu_check.py installs it there
#   make clean       remove caches and build leftovers (keeps .venv and runs/)
#   make distclean   clean, and remove .venv too

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
OFFLINE := HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
PYTEST_ARGS ?=
# pytest-xdist workers (one per core by default; TEST_WORKERS=0 runs in this process; an idle
# worker takes queued tests from a busy one: --dist worksteal) and what
# every run reports at its end: the 20 slowest tests, against the budgets of docs/testing.md.
TEST_WORKERS ?= auto
PYTEST = $(OFFLINE) $(VPY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=20
# The GPU machine the wheelhouse is for, and the Transformer Engine it brings (TE=none: none).
WHEEL_PYTHON ?= 3.12
WHEEL_PLATFORM ?= manylinux_2_28_x86_64
WHEEL_TORCH ?= 2.11.0
TE ?= 2.11.0
TE_CUDA ?= 13
WHEELHOUSE ?= wheelhouse
# One copy (a batchNN/ folder): a command carries 64 MiB with the working tree (about 2.2 MiB).
WHEEL_BATCH_MIB ?= 56
# The builder needs only pip (and reaches the package index): the project's .venv where there is
# one, else $(PYTHON).
WHEEL_BUILDER = $(if $(wildcard $(VPY)),$(VPY),$(PYTHON))

.PHONY: install test test-all quickstart wheelhouse clean distclean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e '.[test]'
	touch $@

test: install
	$(PYTEST) $(PYTEST_ARGS)

test-all: install
	$(PYTEST) -m 'not gpu' $(PYTEST_ARGS)

quickstart: install
	$(OFFLINE) $(VPY) -m megatron_vlm.quickstart

wheelhouse:
	$(WHEEL_BUILDER) tools/wheelhouse.py --out $(WHEELHOUSE) --python-version $(WHEEL_PYTHON) \
		--platform $(WHEEL_PLATFORM) --torch $(WHEEL_TORCH) --te $(TE) --te-cuda $(TE_CUDA) \
		--batch-mib $(WHEEL_BATCH_MIB)

clean:
	rm -f $(STAMP)
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
