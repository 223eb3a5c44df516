# EdgeGuide: `make demo` runs the whole loop, `make test` runs the test suite.
# Both install the Debian packages they need when run as root (scripts/install-system-deps.sh;
# otherwise it prints the apt-get command), then create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeguide-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo demo-full test hil hil-full hil-arm64 hil-arm64-full lint bench clean system-deps-base \
	system-deps-test system-deps-arm64

setup: $(STAMP)

system-deps-base system-deps-test system-deps-arm64: system-deps-%:
	@PYTHON=$(PYTHON) bash scripts/install-system-deps.sh $*

$(STAMP): pyproject.toml | system-deps-base
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --progress-bar on -e '.[agent,server,dev,postgres]'
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/edgeguide-server demo $(ARGS)

demo-full: setup
	$(VENV)/bin/edgeguide-server demo --full $(ARGS)

test: system-deps-test setup
	$(PY) -m pytest tests hil_tests -p hil_tests.plugin --hil-quick $(PYTEST_ARGS)

hil: system-deps-test setup
	$(PY) -m pytest hil_tests -p hil_tests.plugin --hil-target local --hil-profile all $(PYTEST_ARGS)

hil-full: system-deps-test setup
	$(PY) -m pytest hil_tests -p hil_tests.plugin --hil-target local --hil-profile all --hil-full $(PYTEST_ARGS)

# The HIL suite against Raspberry Pi OS 64-bit's userland (Debian 12 arm64) under qemu-user: two
# emulated devices (LiteRT, tflite-runtime 2.14) driven as remote targets. Root; docs/hil.md.
hil-arm64: system-deps-arm64 setup
	$(PY) -m hil_tests.arm64 run $(ARGS)

hil-arm64-full: system-deps-arm64 setup
	$(PY) -m hil_tests.arm64 run --mode full $(ARGS)

# ruff everywhere; mypy as configured in pyproject.toml ([tool.mypy]: strict for protocol/ and agent/).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	mkdir -p reports/bench
	$(PY) bench/compression.py --json reports/bench/compression.json
	$(PY) bench/transfer.py --json reports/bench/transfer.json
	$(PY) bench/fleet.py --json reports/bench/fleet.json
	$(PY) bench/serving.py --json reports/bench/serving.json

clean:
	rm -rf .cache reports build *.egg-info
