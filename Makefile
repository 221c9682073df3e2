# Set-up and the two everyday commands.  `make demo` and `make test` create the local venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/quickstart

.PHONY: setup demo test test-all fashion-mnist clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The main job on the embedded default data (scikit-learn digits): teachers, SA-MDRAD student, evaluation.
demo: setup
	$(PY) main.py --config=configs/quickstart.py --workdir=$(WORKDIR)

# The default test run (what CI runs).
test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -m "not slow" --durations=25 tests

# Everything, longer end-to-end checks included.
test-all: setup
	$(PY) -m pytest -q tests

# Optional: the official Fashion-MNIST files from Debian (root).
fashion-mnist:
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

clean:
	rm -rf $(VENV) runs
