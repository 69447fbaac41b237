# `make test` and `make demo` each build .venv from scratch when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU wheel: an unpinned torch pulls gigabytes of CUDA packages.
TORCH := torch==2.13.0
# Compiled at install: the clone3 launcher and the per-job shim.
LAUNCHER := $(addprefix supervisor/daemon/launch/,_spawn.c _shim.c build_shim.py)

.PHONY: venv test lint demo bench chaos clean test-multinode

$(BIN)/.installed: pyproject.toml $(LAUNCHER)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" numpy
	$(BIN)/pip install -q -e ".[test]"
	$(MAKE) --no-print-directory azurite
	touch $@

venv: $(BIN)/.installed

# Azure's storage emulator for the mirror's tests (npm); they skip, saying why, without it.
AZURITE := $(VENV)/npm/node_modules/.bin/azurite-blob
.PHONY: azurite
azurite:
	@test -x $(AZURITE) || { command -v npm >/dev/null && npm install --silent --no-audit --no-fund \
	  --prefix $(VENV)/npm azurite@3 >/dev/null; } || echo "azurite not installed (no npm?): the Azure mirror tests will skip" >&2

# -rs: every skipped test says why (a missing tool, no root, no systemd), never silently.
test: venv
	$(BIN)/python -m pytest -q -rs -m "not slow"

# ruff and mypy are configured in pyproject.toml (installed with the test extras).
lint: venv
	$(BIN)/ruff check supervisor tests
	$(BIN)/mypy

demo: venv
	$(BIN)/trainsup demo

bench: venv
	$(BIN)/python tests/bench/run_all.py

chaos: venv
	$(BIN)/python -m pytest -q -m slow

# A real 2-node Slurm cluster on this host (and network-namespace hosts): root; the
# Debian packages are installed when missing, else the tests skip and say why. <= 15 min.
test-multinode: venv
	@command -v slurmctld >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge; } || \
	  echo "test-multinode: Slurm could not be installed; the Slurm tests will skip" >&2
	timeout 900 $(BIN)/python -m pytest -q -rs tests/multinode

clean:
	rm -rf $(VENV) build *.egg-info

# Framework test environment (HF Trainer, Accelerate, Lightning, Keras on TF, Paddle, DeepSpeed,
# JAX + Orbax) for tests/frameworks/. Pinned to the versions that wrote tests/fixtures/frameworks;
# a CPU torch wheel as above. DeepSpeed without its CUDA ops (DS_BUILD_OPS=0): on the CPU
# accelerator it JIT-builds one small op (shm comm, ~40 s once, cached in ~/.cache/torch_extensions).
VENV_FW := .venv-fw
FW_PKGS := "$(TORCH)" numpy==2.4.6 transformers==5.23.0 accelerate==1.15.0 safetensors==0.8.0 \
	lightning==2.6.6 tensorflow-cpu==2.21.0 keras==3.15.1 h5py==3.14.0 paddlepaddle==3.3.1 \
	deepspeed==0.19.8 jax==0.10.2 jaxlib==0.10.2 orbax-checkpoint==0.12.8

.PHONY: venv-frameworks test-frameworks fixtures

$(VENV_FW)/bin/.installed: pyproject.toml $(LAUNCHER)
	$(PY) -m venv $(VENV_FW)
	$(VENV_FW)/bin/pip install -q --upgrade pip
	DS_BUILD_OPS=0 $(VENV_FW)/bin/pip install -q $(FW_PKGS)
	$(VENV_FW)/bin/pip install -q -e ".[test]"
	touch $@

venv-frameworks: $(VENV_FW)/bin/.installed

test-frameworks: venv-frameworks
	$(VENV_FW)/bin/python -m pytest -q -rs -p no:cacheprovider tests/frameworks

# Rewrite tests/fixtures/frameworks with the real frameworks (strace kills the saves; the sharded
# formats' saves kill themselves at their commit point; ~3 min).
fixtures: venv-frameworks
	$(VENV_FW)/bin/python tests/fixtures/make_framework_fixtures.py
	$(VENV_FW)/bin/python tests/fixtures/make_sharded_fixtures.py
