# One set-up step for a fresh machine; running it twice does nothing new.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup demo test data browser
setup: $(VENV)/.installed data

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

data: $(FMNIST)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

# Headless Chromium for the report's browser test (Debian's package), only when missing.
browser:
	@command -v chromium >/dev/null || { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

# The main job on the built-in default: the Pareto lab on the reference model, with the committed pruned model as a
# candidate; report in pareto-out/report.html. A rerun resumes (and then only re-draws the report).
demo: setup
	$(BIN)/vitlab pareto checkpoints/fashion-mnist-reference --data fashion-mnist \
	  --candidates checkpoints/fashion-mnist-pruned50 --out pareto-out --budget-minutes 8

# One process: --durations lists the slowest tests (mark what is slow with @pytest.mark.slow; pytest -m slow runs it).
test: setup browser
	$(BIN)/python -m pytest -q --durations=25
