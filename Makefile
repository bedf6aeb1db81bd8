# NEXUS — the two entry points a fresh clone needs:
#   make demo   runs the main job on the bundled default model
#   make test   installs what the tests need and runs them
#
# Both work in a project virtual environment, .venv, made with $(PYTHON) on first use and reused
# after: nothing is installed into the Python you run make with (a system Python that refuses
# `pip install`, PEP 668's externally-managed-environment, is fine). Variables:
#   PYTHON=python3.12      the interpreter that makes .venv (default python3)
#   VENV=path              another virtual environment (made if missing)
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu
#                          where torch comes from (plain PyPI gives the CUDA build on Linux)
#   PYTEST_ARGS=...        what `make test` passes to pytest (default: the whole default suite)
#   DEMO_ARGS=--quick      what `make demo` passes to `nexus demo`
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.nexus-installed

.PHONY: setup demo test test-slow

setup: $(STAMP)

$(PY):
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "error: '$(PYTHON) -m venv $(VENV)' failed; on Debian/Ubuntu install the venv module first:" \
	       "sudo apt install python3-venv" >&2; exit 1; }
	@echo "made the virtual environment $(VENV) with $$($(PY) --version)"

# torch first and pinned (the CPU build where the index offers one); then the package, editable,
# with its test extras. Redone when pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH) into $(VENV) ..."; \
	  $(PIP) $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); }
	@echo "installing nexus and its dependencies into $(VENV) ..."
	@$(PIP) -e '.[test]'
	@touch $@

demo: setup
	$(PY) -m nexus demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)
