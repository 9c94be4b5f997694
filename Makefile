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

# The paper's toy experiments end to end (E1-E6), no data download, no GPU: about 20 minutes on 2 CPU cores.
# Many seeds per experiment: the large-step runs sit at the edge of divergence and depend on the draw, so the figures
# show the median over seeds with a min-max band and count the diverged seeds, and the table gives the median with
# its 90 % interval. The *_jitter runs hold the paper's seed fixed and jitter the initialisation by 1e-7 (relative):
# how chaotic each run is. The paper's seeds are inside each range (E1: 1, E4: 3, E5: 0, E6: 5).
# E1 and E2 also log the sharpness λ_max (--sharpness-every, same trajectories), and e1_custom adds small-step
# SGD and GD on E1's data for comparison (README, "Sharpness"): about 2 minutes more.
demo: $(STAMP)
	$(PY) diag_net.py --preset e1 --seeds $(shell seq 1 32) --sharpness-every 2000 --out-dir $(DEMO_LOGS)
	$(PY) diag_net.py --preset e1 --algorithm sgd gd gd gd --lr 0.05 0.05 0.25 2 --large-lr-frac 1 --decay 1 --seeds 1 2 3 4 --sharpness-every 2000 --out-dir $(DEMO_LOGS)
	$(PY) diag_net.py --preset e1 --sgd-seed 1 --init-jitter 1e-7 --seeds $(shell seq 1 16) --out-dir $(DEMO_LOGS)
	$(PY) diag_net.py --preset e2 --sharpness-every 1 --out-dir $(DEMO_LOGS)
	$(PY) diag_net.py --preset e3 --out-dir $(DEMO_LOGS)
	$(PY) two_layer_relu.py --preset e4 --seeds $(shell seq 0 15) --out-dir $(DEMO_LOGS)
	$(PY) two_layer_relu.py --preset e4 --student-seed 3 --init-jitter 1e-7 --seeds $(shell seq 0 15) --out-dir $(DEMO_LOGS)
	$(PY) two_layer_relu.py --preset e5 --seeds $(shell seq 0 15) --out-dir $(DEMO_LOGS)
	$(PY) two_layer_relu.py --preset e5 --data-seed 1 --student-seed 0 --init-jitter 1e-7 --seeds $(shell seq 0 15) --out-dir $(DEMO_LOGS)
	$(PY) two_layer_relu.py --preset e6 --seeds $(shell seq 0 15) --out-dir $(DEMO_LOGS)
	$(PY) two_layer_relu.py --preset e6 --data-seed 6 --student-seed 5 --init-jitter 1e-7 --seeds $(shell seq 0 15) --out-dir $(DEMO_LOGS)
	$(PY) plots.py --logs $(DEMO_LOGS) --out-dir $(FIGURES)
	$(PY) plots.py --logs $(DEMO_LOGS) --table
	@echo "Done: figures in $(FIGURES)/ (e1.png ... e6.png), the README's toy tables above, run logs in $(DEMO_LOGS)/"

clean:
	rm -rf $(DEMO_LOGS) $(FIGURES)
