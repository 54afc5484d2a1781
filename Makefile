# Two commands on a fresh machine:  make demo   |   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU-only machines (no nvidia-smi): take the CPU-machine torch pins, which pip finds on local disk.
# Machines with a GPU keep whatever torch they have (never forced).
CPU_TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-gpu demo bench-smoke bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(CPU_TORCH); fi
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The parity suite with every Triton kernel run through the interpreter, then the benchmark smoke.
test: setup
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q -m "not gpu" tests
	$(MAKE) bench-smoke

# On a machine with a CUDA device: compiled kernels, bf16, CUDA graphs.
test-gpu: setup
	$(VENV)/bin/pytest -q -m gpu tests

demo: setup
	$(PY) -m gemma3n_fast demo

bench-smoke: setup
	TRITON_INTERPRET=1 $(VENV)/bin/pytest -q bench --benchmark-disable -p no:cacheprovider
	TRITON_INTERPRET=1 $(PY) -m bench.e2e --smoke --out .benchmarks/smoke

bench: setup
	$(VENV)/bin/pytest -q bench --benchmark-only --benchmark-json=.benchmarks/kernels.json
	$(PY) -m bench.e2e --out .benchmarks/e2e

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build *.egg-info
