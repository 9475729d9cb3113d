# Two commands set everything up on a fresh machine:
#   make run   installs, then scans examples/images with the bundled model
#   make test  installs the dev extras too, then runs the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch goes in first, pinned, so nothing later pulls a multi-GB CUDA build; every later
# install is held to the same torch and its matching torchvision by constraints.txt.
TORCH := torch==2.13.0
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: install install-dev run test test-fast test-install test-image image soak reliability-doc lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: $(BIN)/python constraints.txt
	$(PIP) $(TORCH)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) -e '.[torch,analysis]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[torch,analysis,dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/modq scan examples/images --report modq-report.jsonl

# pytest exits 5 when it collected nothing: a suite that runs no test has failed.
# TEST_JOBS parallel test processes (pytest-xdist); each starts its own Redis and S3 server.
TEST_JOBS ?= 2
test: install-dev
	$(BIN)/pytest -n $(TEST_JOBS); rc=$$?; [ $$rc -ne 5 ] || echo "no tests were collected" >&2; \
	[ $$rc -eq 0 ]

test-fast: install-dev
	$(BIN)/pytest -m "not slow and not install"

# The built wheel installed into fresh virtual environments (no extras; [torch]): scans the
# examples and answers one queued request each, as a user's `pip install modq` would.
test-install: install-dev
	$(BIN)/pytest -m install tests/install

# The container tier (root; installs buildah, podman, debootstrap and runc when missing):
# hadolint on both Dockerfiles, the CPU image built from this checkout on a Debian base made
# here (no registry needed; BASE=python:3.11-slim to use the registry's), then inside it
# modq --version, modq scan, a worker answering through Redis, the health check and Flower.
test-image: install-dev
	VENV=$(VENV) docker/smoke.sh

# The CPU image with buildah and this machine's pip index and CA bundle (docker/build.sh):
#   make image [IMAGE=...] [BASE=...] [EXTRAS=torch] [TORCH_INDEX_URL=...] [EXTRA_CA=...]
image:
	docker/build.sh

# The fault, load and hostile-input tier at full counts (10,000 requests, a 10-minute
# decoder fuzz), then docs/reliability.md regenerated from what those tests observed.
soak: install-dev
	MODQ_SOAK=1 $(BIN)/pytest -m reliability
	$(BIN)/python -m tests.support.reliability_report

# docs/reliability.md from the last test run's observations (build/reliability.json).
reliability-doc: install-dev
	$(BIN)/python -m tests.support.reliability_report

lint: install-dev
	$(BIN)/ruff check worker tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install-dev
	$(BIN)/python bench/models.py
	$(BIN)/python bench/scan.py
	$(BIN)/python -m bench.queue_worker
	$(BIN)/python bench/producer.py
	$(BIN)/python bench/embeddings.py
	$(BIN)/python -m bench.banks
	$(BIN)/python bench/finetune.py

clean:
	rm -rf $(VENV) build *.egg-info
