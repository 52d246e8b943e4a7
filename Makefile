# One entry point: `make test` and `make demo` set up .venv from nothing and run.
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed

.PHONY: setup test test-quick test-image image lint format demo lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, alone and pinned, so no resolver can ever pick another build.
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch torchvision
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Everything, slow end-to-end tests included (this is what CI runs).
test: lint
	$(PY) -m pytest -q -ra

# The quick tier: skips the tests marked slow.
test-quick: lint
	$(PY) -m pytest -q -ra -m "not slow"

# The container image, built here from nothing with podman (installed and configured by
# images/podman-setup.sh): localhost/pirl:VERSION-<git sha>. See images/README.md.
image:
	images/build.sh --local

# The image tier alone (tests/image): the image run as Kubernetes runs it. `make test` runs it too,
# skipping it when the image is not built.
test-image: $(STAMP)
	$(PY) -m pytest -q -ra -m image tests/image

# The project's main job, locally on a small real dataset.
# `make demo DEMO_ARGS="--backend trainjob"` runs the training step as a Kubeflow Trainer v2 TrainJob.
demo: $(STAMP)
	$(PY) -m pirl.demo $(DEMO_ARGS)

lock:
	rm -rf /tmp/pirl-lock-venv && python3 -m venv /tmp/pirl-lock-venv
	/tmp/pirl-lock-venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	/tmp/pirl-lock-venv/bin/pip install -q -e ".[dev]"
	{ head -2 $(CONSTRAINTS); /tmp/pirl-lock-venv/bin/pip freeze --exclude-editable | grep -v -iE '^(pip|setuptools|wheel)=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache runs local_outputs
