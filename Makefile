# nanoseek — `make test` and `make run` work on a fresh machine: they build .venv first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
STAMP   := $(VENV)/.installed

.PHONY: install test test-slow test-pg test-console run info bench clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_torch.sh
	@test -x $(PYTHON) || $(PY) -m venv $(VENV) $$($(PY) -c 'import torch' 2>/dev/null && echo --system-site-packages)
	$(PYTHON) -m pip install -q --upgrade pip
	sh scripts/install_torch.sh $(PYTHON)
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest

test-slow: $(STAMP)
	$(PYTHON) -m pytest -m slow

# the serve tests with a throwaway PostgreSQL on 127.0.0.1 (as .ci/run does for the whole suite)
test-pg: $(STAMP)
	.ci/with-postgres $(PYTHON) -m pytest tests/serve

# the web console in headless Chromium (apt-get install -y chromium); NANOSEEK_SCREENSHOTS=docs
# also rewrites the README's screenshots
test-console: $(STAMP)
	$(PYTHON) -m pytest tests/serve/test_console_browser.py tests/serve/test_console_api.py

# prepare runs/data and train runs/default if missing, calibrate prices, print a demo key, serve on :8000
run: $(STAMP)
	$(BIN)/nanoseek run

bench: $(STAMP)
	$(PYTHON) bench/forward.py

clean:
	rm -rf $(VENV) build *.egg-info
