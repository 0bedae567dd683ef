# Two entry points, each doing all the set-up it needs on a fresh machine:
#   make test    - install into .venv and run the test suite (CPU only)
#   make train   - install into .venv and train ResNet-50 on CIFAR-10 on the CPU
# make test-fast runs the tests not marked slow (a few minutes), for the edit loop.
# Extra training flags: make train ARGS="--epochs 2"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CIFAR10_TARBALL ?= ../shared/data/cifar10-jpeg.tar.gz
DATA_DIR ?= .cache/data/cifar10
RUN_DIR ?= runs/cifar10-cpu-$(shell date +%Y%m%d-%H%M%S)
ARGS ?=

.PHONY: setup sysdeps lint test test-fast compat-check gpu-prep train clean

setup: $(VENV)/.installed

# ffmpeg and a local SLURM (Debian packages) for the tests; a no-op when present or not root.
sysdeps:
	@bash tools/system-deps.sh

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,dali,export,tensorboard]'
	touch $@

# Format and lint first: a minute's check before a quarter hour of tests.
lint: setup
	$(PY) -m ruff format --check --quiet .
	$(PY) -m ruff check --quiet .

test: setup sysdeps lint
	$(PY) -m pytest -q --durations=20 tests

# The edit loop's tier: every test but those marked slow (real data, launcher restarts, SLURM,
# long multi-process runs; pyproject.toml lists the marker). make test still runs them all.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

# What a GPU visit carries (benchmarks/README.md): the CIFAR-10 JPEGs and the wheels of the few
# packages beyond torch, torchvision and numpy that benchmarks/gpu.sh needs, as the device has no network.
gpu-prep:
	mkdir -p .gpu/wheels
	[ -f .gpu/cifar10-jpeg.tar.gz ] || [ ! -f $(CIFAR10_TARBALL) ] || cp $(CIFAR10_TARBALL) .gpu/
	$(PYTHON) -m pip download -q --no-deps -d .gpu/wheels pyyaml tqdm pytest pluggy iniconfig packaging pygments pytest-timeout
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --platform any -d .gpu/wheels exceptiongroup tomli

# The GPU machine's torch/torchvision pair on this CPU, before a GPU visit (not part of make test:
# a 540 MB download once, then a few minutes; benchmarks/README.md). Its environment holds only
# the two wheels; a .pth file puts $(VENV)'s packages (the CUDA 13 libraries, pytest, ...) behind
# them. COMPAT_DRY=1 also runs benchmarks/gpu.sh first as a dry run.
COMPAT ?= .venv-compat
COMPAT_PAIR ?= torch==2.11.0 torchvision==0.26.0
$(COMPAT)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q --no-deps $(COMPAT_PAIR)
	$(PY) -c "import sysconfig; print('import site; site.addsitedir(%r)' % sysconfig.get_paths()['purelib'])" \
		>"$$($(COMPAT)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-main-venv.pth"
	touch $@

compat-check: $(COMPAT)/.installed
	bash tools/compat-check.sh $(COMPAT)/bin/python

# CIFAR-10 JPEGs unpacked once from the local tarball; without it the run uses synthetic data.
train: setup
	@if [ ! -d $(DATA_DIR)/train ] && [ -f $(CIFAR10_TARBALL) ]; then \
		echo "distres: unpacking $(CIFAR10_TARBALL) into $(DATA_DIR)"; \
		rm -rf $(DATA_DIR).tmp && mkdir -p $(DATA_DIR).tmp && tar xzf $(CIFAR10_TARBALL) -C $(DATA_DIR).tmp && \
		rm -rf $(DATA_DIR) && mv $(DATA_DIR).tmp $(DATA_DIR); fi
	@if [ -d $(DATA_DIR)/train ]; then \
		$(PY) -m distres.train --config configs/cifar10-cpu.yaml --data-dir $(DATA_DIR) --output-dir $(RUN_DIR) $(ARGS); \
	else \
		echo "distres: no CIFAR-10 at $(DATA_DIR) or $(CIFAR10_TARBALL); training on synthetic 32-px data instead"; \
		$(PY) -m distres.train --config configs/cifar10-cpu.yaml --data synthetic --synthetic-classes 10 --image-size 32 --output-dir $(RUN_DIR) $(ARGS); \
	fi

clean:
	rm -rf $(VENV) $(COMPAT) .cache runs
