# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first: the package, editable,
# with its pinned requirements (requirements.txt) and the test runner (pyproject.toml's dev extra).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# Tests run on 2 virtual CPU devices so that every pmap is exercised across devices.
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=2

.PHONY: venv demo docs test bench soak clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

test: venv
	XLA_FLAGS=$(TEST_XLA_FLAGS) JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --dist loadfile --durations=10 tests

demo: venv
	$(PY) train_vqvae.py --config=configs/vqvae.py:demo --workdir=$(DEMO_DIR)/vqvae
	$(PY) -m oasis_jax.evaluate --workdir=$(DEMO_DIR)/vqvae --split=test
	$(PY) train_gan.py --config=configs/gan.py:demo --workdir=$(DEMO_DIR)/gan --config.vqvae_workdir=$(DEMO_DIR)/vqvae
	$(PY) sample.py --num=64 --workdir=$(DEMO_DIR)/gan --outdir=$(DEMO_DIR)/samples
	$(PY) -m oasis_jax.evaluate --workdir=$(DEMO_DIR)/gan --split=test
	$(PY) -m oasis_jax.timing $(DEMO_DIR)/vqvae $(DEMO_DIR)/gan
	@echo "make demo: 64 samples in $(DEMO_DIR)/samples/ (overview: $(DEMO_DIR)/samples/grid.png)"

# The README's pictures, from the demo's own outputs (run `make demo` first).
docs:
	$(PY) -c "from oasis_jax import images; \
	  images.thumbnail('$(DEMO_DIR)/vqvae/images/eval_test.png', 'docs/demo_reconstructions.png', 1024); \
	  images.thumbnail('$(DEMO_DIR)/samples/grid.png', 'docs/demo_samples.png', 640); \
	  images.thumbnail('$(DEMO_DIR)/gan/images/eval_test.png', 'docs/demo_eval_gan.png', 1024)"

bench: venv
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) -m bench.data_pipeline
	$(PY) -m bench.train_step
	$(PY) -m bench.train_step --sizes=demo --decoder_only
	$(PY) -m bench.first_calls
	$(PY) -m bench.train_gan_step --sizes=seed
	$(PY) -m bench.train_gan_step --sizes=demo
	$(PY) -m bench.argmin
	$(PY) -m bench.sample

soak: venv
	$(PY) -m bench.soak_resume --kills=20 --steps=1000

clean-demo:
	rm -rf $(DEMO_DIR)
