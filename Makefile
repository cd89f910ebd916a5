# Everything a user needs: `make run` serves the API, `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help

.PHONY: help install run test docs lint typecheck clean bench

help: ## Show the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is needed (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev and embedded extras

run: $(STAMP) ## Start Redis, PostgreSQL, the API (port 8000) and a detector worker
	$(BIN)/python -m embedded.run

DOCS_SITE := build/site

test: $(STAMP) ## Build the docs (strict: a broken link fails), then run the whole test suite
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(DOCS_SITE)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

docs: $(STAMP) ## Build the documentation site into build/site (mkdocs --strict)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(DOCS_SITE)

bench: $(STAMP) ## Run the benchmarks (ratios against same-run baselines)
	$(BIN)/python -m bench

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

typecheck: $(STAMP) ## mypy --strict
	$(BIN)/mypy

clean: ## Remove the virtual environment and caches (keeps .data)
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

.PHONY: mlflow-ui
mlflow-ui: $(STAMP) ## Open the MLflow UI on http://127.0.0.1:5000 over make run's local store
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath .data)/mlflow.db --host 127.0.0.1 --port 5000

.PHONY: nab-offline
nab-offline: $(STAMP) ## NAB score of the default (seasonal) kind replayed offline (no Redis), with leave-one-folder-out
	$(BIN)/python -m evaluation --detector seasonal --lofo $(NAB_ARGS)

.PHONY: nab-feedback
nab-feedback: $(STAMP) ## NAB under the feedback protocol (seasonal, offline): feedback against none, in-sample and leave-one-folder-out
	$(BIN)/python -m evaluation --detector seasonal --feedback --lofo $(NAB_ARGS)

.PHONY: nab
nab: $(STAMP) ## NAB through the real stream, beside in-sample, leave-one-folder-out and SKAB figures
	$(BIN)/python -m bench.nab_stream $(NAB_ARGS)

.PHONY: corpus
corpus: $(STAMP) ## Score every kind and the rolling-z reference on the held-out SKAB corpus (offline)
	$(BIN)/python -m evaluation --corpus skab --all $(CORPUS_ARGS)
