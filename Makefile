# The README's commands. Everything installs into .venv and .tools; nothing global.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench lint mutate clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-helm.sh scripts/install-checkov.sh scripts/install-promtool.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,infra]'
	bash scripts/install-helm.sh >/dev/null
	# Scanners for the chart and the alert rules (tests/chart, tests/monitoring).
	bash scripts/install-checkov.sh >/dev/null
	bash scripts/install-promtool.sh >/dev/null
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: setup
	$(BIN)/python -m audit_worker.localenv.demo

bench: setup
	$(BIN)/python bench/run.py
	$(BIN)/python bench/spool.py
	$(BIN)/python bench/archive.py

lint: setup
	$(BIN)/ruff check src infra tests bench
	$(BIN)/mypy

# Mutation testing of the modules that hold rules (slow: not part of `make test`).
# `make mutate TARGETS="events slots"` runs some; scripts/mutate.py --list shows them.
mutate: setup
	$(BIN)/python scripts/mutate.py $(TARGETS)

clean:
	rm -rf $(VENV) .tools .local reports mutants
