# Two entry points for a fresh machine: `make train` and `make test`.
# Each creates the virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `make train` is the paper's recipe (configs/cifar10.py: 64k steps);
# make variables choose the model, preset, length, run folder and data:
#   make train PRESET=fast              the 30-epoch CPU recipe (MODEL,fast)
#   make train STEPS=300                stop after 300 steps
#   make train MODEL=cifar_resnet56 WORKDIR=runs/r56 DATA_DIR=/data/tfds
MODEL ?= cifar_resnet20
PRESET ?=
STEPS ?=
# Empty: the configs' rule (TFDS_DATA_DIR, else ../shared/data/tfds where
# it exists; configs/common.py), which also picks the prepared cifar10_jpeg
# where the folder holds it, else TFDS's cifar10.
DATA_DIR ?=
# One folder per recipe and length: a run resumes only with its own config.
WORKDIR ?= runs/$(MODEL)$(PRESET:%=_%)$(STEPS:%=_%steps)

.PHONY: setup train test summary clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# The oneDNN convolution (cnn/ops/native): compiled with the system g++,
# rebuilt when its source changes; without it the convolution is XLA's.
setup: $(VENV)/.installed
	$(PY) -m cnn.ops.native.build

# Exit status 130 is a run stopped by Ctrl-C or SIGTERM with its step saved
# (the same command resumes it), not a failure for make to report again.
train: setup
	$(DATA_DIR:%=TFDS_DATA_DIR=%) $(PY) -m experiments.train \
	  --config=configs/cifar10.py:$(MODEL)$(PRESET:%=,%) --workdir=$(WORKDIR) \
	  $(STEPS:%=--config.num_train_steps=%) || test $$? -eq 130

test: setup
	$(PY) -m pytest -q -n 2 --durations=12 tests

summary: setup
	$(PY) -m cnn.tools.summary $(MODEL)

clean:
	rm -rf $(VENV) runs
