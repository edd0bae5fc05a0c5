# Two commands from a fresh clone: `make run` (the demo workflow) and `make test` (the test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/demo

.PHONY: install run test test-slow docs clean

install: $(BIN)/lesion .venv-mlflow/bin/mlflow

# The MLflow server (tests start it; teams run it beside their cluster) lives in an environment of its own: the full
# `mlflow` package would downgrade cryptography in .venv, which carries only the client (the `mlflow` extra).
MLFLOW_VENV := .venv-mlflow
$(MLFLOW_VENV)/bin/mlflow:
	$(PY) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install --quiet 'mlflow>=3.0'

$(BIN)/lesion: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision are pinned only here: these releases install from this machine's disk.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,export,dicom,docs,mlflow]'
	touch $(BIN)/lesion

run: install
	$(BIN)/lesion run --run $(RUN)

PYTEST := RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_DATA_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1 \
	$(BIN)/python -m pytest -q -rs

test: install  # the suite without the tests marked slow
	$(PYTEST) -m "not slow"

test-slow: install  # the slow ones: multi-node clusters, kill points, whole workflows, long trainings (CI runs both)
	$(PYTEST) -m slow --durations=20

docs: install  # the reference pages generated from the code and the results, then the site in site/ (warnings fail)
	$(BIN)/python docs/gen.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict  # not --quiet: MkDocs 1.6 then drops the warnings --strict counts

clean:
	rm -rf $(VENV) runs site docs/reference
