# NEXUS — the two entry points a fresh clone needs:
#   make demo   runs the main job on the bundled default model
#   make test   installs what the tests need and runs them
PY ?= python3
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test test-slow bench

# torch is installed first and pinned, so pip takes the CPU build where one is provided
# instead of pulling several GB of CUDA packages; an existing torch is kept.
setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@$(PIP) -e '.[test]'

demo: setup
	$(PY) -m nexus demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow
