# One-command entry points. Everything installs into a project-local virtualenv (.venv/) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test demo clean

# Where `make demo` writes its run logs (one JSON per run and seed) and its figures.
DEMO_LOGS := runs/demo
FIGURES := figures

install: $(STAMP)

# Re-install whenever requirements.txt changes; the stamp records a completed install.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q test_utils.py test_smoke.py

# The paper's toy experiments end to end (E1-E6): about 2-5 minutes on 2 CPU cores, no data download, no GPU.
# Several seeds per experiment: the large-step runs sit at the edge of divergence and depend on the draw,
# so the figures show the median over seeds with a min-max band and count the diverged seeds.
demo: $(STAMP)
	$(PY) diag_net.py --preset e1 --seeds $(shell seq 1 16) --out-dir $(DEMO_LOGS)
	$(PY) diag_net.py --preset e2 --out-dir $(DEMO_LOGS)
	$(PY) diag_net.py --preset e3 --out-dir $(DEMO_LOGS)
	$(PY) two_layer_relu.py --preset e4 --seeds $(shell seq 0 7) --out-dir $(DEMO_LOGS)
	$(PY) two_layer_relu.py --preset e5 --seeds $(shell seq 0 15) --out-dir $(DEMO_LOGS)
	$(PY) two_layer_relu.py --preset e6 --seeds $(shell seq 0 7) --out-dir $(DEMO_LOGS)
	$(PY) plots.py --logs $(DEMO_LOGS) --out-dir $(FIGURES)
	@echo "Done: figures in $(FIGURES)/ (e1.png ... e6.png), run logs in $(DEMO_LOGS)/"

clean:
	rm -rf $(DEMO_LOGS) $(FIGURES)
