# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each installs the project into a local virtual environment (.venv) on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Offline and quiet by default (see README "Offline"); override on the command line.
export DISTILLERY_OFFLINE ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo test bench clean-venv

# (The distribution was called "distillery" before, a name PyPI gives another project: an old
# venv's copy is removed so the two never both claim the distillery package.)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip uninstall --quiet --yes distillery 2>/dev/null || true
	$(BIN)/pip install --progress-bar off -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/distillery demo $(ARGS)

# pytest exits 5 when it collects no tests; that is not a failure of the install.
test: $(STAMP)
	sh tests/browser/install-chromium.sh
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean-venv:
	rm -rf $(VENV)
