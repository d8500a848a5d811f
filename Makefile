# Everything runs from a virtual environment in .venv/, created on first use with the exact versions CI
# tested (constraints.txt). `make demo` is the main job, `make test` the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install browser demo test test-fast bench lock lock-runtime clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# PIP_CONSTRAINT (not -c) so that our pins replace any machine-wide constraint file from pip.conf, which
	# would otherwise be combined with them and can make the pinned torch uninstallable.
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install --quiet -e '.[local,dev]'
	touch $(STAMP)

# The MLflow UI tests render the version and run pages in headless Chromium (Debian's package, not PyPI's): installed
# here when missing and this is a Debian machine we may administer; otherwise the message says what to install.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the MLflow UI tests"; \
	    { DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || { \
	      echo "apt-get could not install chromium (above); install it by hand: make test needs it" >&2; exit 1; }; \
	  else \
	    echo "make test needs headless Chromium for the MLflow UI tests: install it (Debian: apt-get install chromium)" >&2; \
	    exit 1; \
	  fi; }

demo: install
	$(VENV)/bin/nft-harden demo

test: install browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile
	# strict on the library and the params schema; torch types nn.Module.__call__ as Any, hence --no-warn-return-any
	$(VENV)/bin/mypy --strict --no-warn-return-any nft_core harden/params.py
	$(VENV)/bin/mypy harden components pipeline
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/step_cost.py

# Re-pin constraints.txt to what is installed in .venv (after changing dependencies in pyproject.toml).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

# The container image's locks (after `make lock`, or after changing pyproject.toml's dependencies or
# requirements/runtime.in): pyproject.toml's dependencies without extras, plus runtime.in, at constraints.txt's
# versions, with the sha256 of every file PyPI has for each version, for CPython 3.11 on x86_64 Linux (the
# Dockerfile's base image, glibc 2.36). Needs uv (`pip install uv`).
UV ?= uv
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_36 --generate-hashes
lock-runtime:
	$(UV) pip compile $(LOCK_TARGET) --custom-compile-command "make lock-runtime" \
		-c constraints.txt pyproject.toml requirements/runtime.in -o requirements/runtime.txt
	$(UV) pip compile $(LOCK_TARGET) --custom-compile-command "make lock-runtime" \
		-c requirements/runtime.txt requirements/build.in -o requirements/build.txt

clean:
	rm -rf $(VENV) .pytest_cache
