# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv from the pinned requirements first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# Tests run on 2 virtual CPU devices so that every pmap is exercised across devices.
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=2

.PHONY: venv demo test bench clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

test: venv
	XLA_FLAGS=$(TEST_XLA_FLAGS) JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --durations=10 tests

demo: venv
	$(PY) -c "from oasis_jax import tfds_oasis; tfds_oasis.prepare('demo')"
	@echo "make demo: the demo data is prepared, but stage 1 (train_vqvae.py) is not built yet: nothing trained" >&2; exit 1

bench: venv
	$(PY) bench/data_pipeline.py

clean-demo:
	rm -rf $(DEMO_DIR)
