# Two commands from a fresh clone: `make run` (the demo workflow) and `make test` (the test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/demo

.PHONY: install run test test-slow clean

install: $(BIN)/lesion

$(BIN)/lesion: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision are pinned only here: these releases install from this machine's disk.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test,export,dicom,docs]'
	touch $(BIN)/lesion

run: install
	$(BIN)/lesion run --run $(RUN)

PYTEST := RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_DATA_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1 \
	$(BIN)/python -m pytest -q -rs

test: install  # the suite without the tests marked slow
	$(PYTEST) -m "not slow"

test-slow: install  # the slow ones: multi-node clusters, kill points, whole workflows, long trainings (CI runs both)
	$(PYTEST) -m slow

clean:
	rm -rf $(VENV) runs
