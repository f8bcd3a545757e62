# rl-align: `make train` installs and runs the main job; `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test bench clean browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP) browser

# the labelling page's tests drive Debian's Chromium with chromedriver; apt-get runs only when they are missing
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else echo "note: chromium and chromium-driver are missing and apt-get needs root here: the browser tests will be skipped"; fi; \
	fi

train: $(STAMP)
	$(BIN)/rl-align train --env halfcheetah-pref --agent sail-revkl

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=10

bench: $(STAMP)
	$(BIN)/pip install -q '.[bench]'
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
