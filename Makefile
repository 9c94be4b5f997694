# One-command entry points. Everything installs into a project-local virtualenv (.venv/) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo clean

install: $(STAMP)

# Re-install whenever requirements.txt changes; the stamp records a completed install.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q test_smoke.py

clean:
	rm -rf runs/demo figures
