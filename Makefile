# Two entry points for a fresh machine: `make train` and `make test`.
# Each creates the virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data/tfds
# The prepared JPEG copy of CIFAR-10 where it exists; elsewhere TFDS's own
# cifar10, downloaded into TFDS's default data_dir on first use.
ifneq ($(wildcard $(DATA_DIR)/cifar10_jpeg),)
DATA_FLAGS ?= --config.dataset=cifar10_jpeg --config.data_dir=$(DATA_DIR)
else
DATA_FLAGS ?= --config.dataset=cifar10
endif
MODEL ?= cifar_resnet20
WORKDIR ?= runs/$(MODEL)

.PHONY: setup train test summary clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# The oneDNN convolution (cnn/ops/native): compiled with the system g++,
# rebuilt when its source changes; without it the convolution is XLA's.
setup: $(VENV)/.installed
	$(PY) -m cnn.ops.native.build

train: setup
	$(PY) -m experiments.train --config=configs/cifar10.py:$(MODEL) --workdir=$(WORKDIR) \
	  $(DATA_FLAGS)

test: setup
	$(PY) -m pytest -q -n 2 --durations=12 tests

summary: setup
	$(PY) -m cnn.tools.summary $(MODEL)

clean:
	rm -rf $(VENV) runs
