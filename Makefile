# Quick start: `make demo` trains on Fashion-MNIST on the CPU; `make test` runs the test suite.
PYTHON_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_run

.PHONY: install demo test test-fast bench bench-quick bench-fonts bench-long bench-scale gpu-wheels clean

# and our modules' bytecode, written even where PYTHONDONTWRITEBYTECODE is set (containers, CI): an editable
# install has none, so every process (each rank, the workers' forkserver) would compile them as it starts
install: $(STAMP)
	@$(PY) -m compileall -q src

$(STAMP): setup.py requirements-training.txt
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) scripts/install_torch.py
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@# the evaluation and shard tools some tests run, kept out of the project's own dependencies:
	@# clip_benchmark without its optional stack (transformers, ...), img2dataset on its own path
	@# (it pins webdataset 0.2)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps clip_benchmark==1.6.2 pycocoevalcap==1.2
	$(PY) -m pip install --quiet --disable-pip-version-check --target $(VENV)/img2dataset img2dataset
	touch $(STAMP)

# the Debian data packages each target needs (fastclip.datasets.packages): installed where apt-get can run as
# root or through sudo without a password; elsewhere one line says what follows and how to install them
demo: install
	$(PY) -m fastclip.datasets.packages install demo
	$(PY) scripts/demo.py --out $(DEMO_DIR)

test: install
	$(PY) -m fastclip.datasets.packages install test
	$(PY) -m pytest -q tests

# the inner loop: everything but the multi-process, launcher, end-to-end and fake-CUDA-matrix tiers (tests/conftest.py's TIER_OF);
# the pytest cache works, so `make test-fast PYTEST_ARGS=--lf` reruns the last failures first
test-fast: install
	$(PY) -m fastclip.datasets.packages install test
	$(PY) -m pytest -q -m "not multiprocess and not launcher and not e2e and not fake_cuda" $(PYTEST_ARGS) tests

bench: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) bench/run_all.py

bench-quick: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) bench/run_all.py --quick

# retrieval with unique captions (Unicode characters drawn in fonts): the font packages installed where
# possible, else the check stops with the apt-get line; bench/fonts.py builds the data once, then trains
bench-fonts: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) -m fastclip.datasets.packages install fonts
	$(PY) -m fastclip.datasets.fonts --check
	$(PY) bench/fonts.py

# 30 visits per pair at 2x16 and 2x32 (bench/long.py, ~50 min on 2 cores): its section of docs/benchmarks.md, its
# figure and the README's table; `$(PY) bench/run_all.py --only long_study` runs the one-setting-at-a-time study after it
bench-long: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) -m fastclip.datasets.packages install fonts
	$(PY) -m fastclip.datasets.fonts --check
	$(PY) bench/run_all.py --only long

# the regime map (bench/scale.py, 38 runs, ~8 h on 2 cores): OpenCLIP vs FastCLIP from 2,000 pairs to every font character,
# 20 visits each; finished runs are recorded in bench/results/scale/ and reused, so it resumes where it stopped
bench-scale: install
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) -m fastclip.datasets.packages install fonts
	$(PY) -m fastclip.datasets.fonts --check
	$(PY) bench/run_all.py --only scale

# wheels the GPU machine lacks (open_clip_torch, webdataset, ...), which `bash bench/gpu.sh` installs from bench/.deps/wheels
gpu-wheels:
	bash bench/make_gpu_wheels.sh

clean:
	rm -rf $(VENV) $(DEMO_DIR) logs
