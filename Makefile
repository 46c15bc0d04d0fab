# Everything a fresh machine needs comes from here: `make serve` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup serve test test-quick lint bench protos clean browser

setup: $(STAMP)

# torch is pinned first so that the project's looser `torch>=2.4` is already satisfied
# and pip does not reach for a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/moe-serve up

# Headless Chromium for the /dashboard page test, from Debian's packages where apt-get can
# run as root; elsewhere that one test is skipped with the reason.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not installed: the dashboard page test will be skipped"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint browser
	$(PY) -m pytest -q tests

# Everything but the end-to-end tests that start a Ray cluster: the quick loop.
test-quick: lint
	$(PY) -m pytest -q -m "not e2e" tests

bench: $(STAMP)
	$(PY) -m bench.engine_vs_hf

protos: $(STAMP)
	$(PY) -m protos.generate

clean:
	rm -rf $(VENV) build *.egg-info
