# Two commands on a fresh clone:  `make repro` (install + run the pipeline), `make test` (install + tests).
PYTHON ?= python3
VENV   := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install repro test clean-venv qemu chromium

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

# Re-installs when pyproject.toml changes. torch 2.14.1 + torchvision 0.29.1 is the pair that installs
# and imports here (see README); pip picks it from the ranges in pyproject.toml.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

repro: install
	dvc repro

# Azurite (npm) gives the tests a real Azure Blob endpoint; without npm those tests skip, saying why.
node_modules/.bin/azurite-blob:
	-command -v npm >/dev/null && npm install --no-save --no-audit --no-fund --silent azurite@3

# qemu-user emulates an AVX2-only x86 CPU (no VNNI) for the INT8 test; without it that test skips, saying why.
# Installed from Debian's packages where this runs as root with apt-get, left alone elsewhere.
qemu:
	-@command -v qemu-x86_64 >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q qemu-user >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q qemu-user >/dev/null 2>&1; }; }; } || true

# Headless Chromium renders the pcb-aoi-report pages in tests/test_report.py; without it those tests skip,
# saying why. Installed from Debian's packages where this runs as root with apt-get, left alone elsewhere.
chromium:
	-@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || true

test: install node_modules/.bin/azurite-blob qemu chromium
	python -m pytest

clean-venv:
	rm -rf $(VENV)
