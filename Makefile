# EdgeGuide: `make demo` runs the whole loop, `make test` runs the test suite.
# Both create .venv and install the project on first use (python3 >= 3.11 needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeguide-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo demo-full test hil hil-full lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar on -e '.[agent,server,dev,postgres]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/edgeguide-server demo $(ARGS)

demo-full: setup
	$(VENV)/bin/edgeguide-server demo --full $(ARGS)

test: setup
	$(PY) -m pytest tests hil_tests -p hil_tests.plugin --hil-quick $(PYTEST_ARGS)

hil: setup
	$(PY) -m pytest hil_tests -p hil_tests.plugin --hil-target local --hil-profile all $(PYTEST_ARGS)

hil-full: setup
	$(PY) -m pytest hil_tests -p hil_tests.plugin --hil-target local --hil-profile all --hil-full $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	mkdir -p reports/bench
	$(PY) bench/compression.py --json reports/bench/compression.json
	$(PY) bench/transfer.py --json reports/bench/transfer.json
	$(PY) bench/fleet.py --json reports/bench/fleet.json
	$(PY) bench/serving.py --json reports/bench/serving.json

clean:
	rm -rf .cache reports build *.egg-info
