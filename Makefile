# Entry points: `make run` (install, then one real DAG run on the built-in data)
# and `make test` (install, then the test suite). See README.md.

SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := $(CURDIR)/.tools/bin/uv
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin

# Airflow keeps its metadata database and logs inside the project.
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION := False
export AIRFLOW__API__HOST := 127.0.0.1
export AIRFLOW__API__PORT ?= 8080
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS ?= True
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
export FER_ARTIFACT_ROOT ?= file://$(CURDIR)/mlartifacts
export PYTHONUNBUFFERED := 1
export FER_MLFLOW_UI_URL ?= http://127.0.0.1:$(MLFLOW_PORT)

# `make run` settings: empty paths select the built-in synthetic data.
TRAIN_CSV ?=
TEST_CSV ?=
EPOCHS ?= 12
CONF ?= {}
# `make bench BENCH_QUICK=1` shrinks the benchmark's sizes for development.
BENCH_QUICK ?=
export MLFLOW_PORT ?= 5000

# `make up` settings: the state folder and the ports on 127.0.0.1.
STACK_DIR ?= $(CURDIR)/.stack
STACK_AIRFLOW_PORT ?= 8080
STACK_MLFLOW_PORT ?= 5000
STACK_POSTGRES_PORT ?= 15432
STACK_PARALLELISM ?= 4
STACK := $(BIN)/python scripts/stack.py --state-dir "$(STACK_DIR)"

.PHONY: install run test test-fast bench ui up down status clean

$(UV):
	$(PYTHON) -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --python 3.11
	touch $@

install: $(VENV)/.installed

$(AIRFLOW_HOME)/airflow.db: $(VENV)/.installed
	mkdir -p $(AIRFLOW_HOME)
	$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/db-migrate.log 2>&1 || (tail -n 40 $(AIRFLOW_HOME)/db-migrate.log; exit 1)

run: install $(AIRFLOW_HOME)/airflow.db
	$(BIN)/python scripts/run_dag.py --train-csv "$(TRAIN_CSV)" --test-csv "$(TEST_CSV)" --epochs $(EPOCHS) --conf '$(CONF)'

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	BENCH_QUICK=$(BENCH_QUICK) TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m fer_tasks.benchmark

ui: install $(AIRFLOW_HOME)/airflow.db
	@echo "MLflow UI:  http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "Airflow UI: http://127.0.0.1:$(AIRFLOW__API__PORT)  (press Ctrl-C to stop both)"
	@$(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri "$(MLFLOW_TRACKING_URI)" --default-artifact-root "$(FER_ARTIFACT_ROOT)" & \
	mlflow_pid=$$!; \
	$(BIN)/airflow api-server --host 127.0.0.1 --port $(AIRFLOW__API__PORT) & \
	airflow_pid=$$!; \
	trap 'kill $$mlflow_pid $$airflow_pid 2>/dev/null; wait' INT TERM EXIT; \
	wait

# The whole stack without containers: PostgreSQL, MLflow server, Airflow
# api-server, scheduler and dag-processor, all on 127.0.0.1. See README.md.
up: install
	$(STACK) up --airflow-port $(STACK_AIRFLOW_PORT) --mlflow-port $(STACK_MLFLOW_PORT) \
		--postgres-port $(STACK_POSTGRES_PORT) --parallelism $(STACK_PARALLELISM)

down:
	$(STACK) down

status:
	$(STACK) status

clean:
	rm -rf output .cache data/builtin mlflow.db mlartifacts $(AIRFLOW_HOME)
