# Two commands on a fresh machine:  make demo   |   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU-only machines (no nvidia-smi): take the CPU-machine torch pins, which pip finds on local disk.
# Machines with a GPU keep whatever torch they have (never forced).
CPU_TORCH := torch==2.14.1 torchvision==0.29.1
# The test environment: every other package at the version the suite last passed with (see the file's header).
LOCK   := requirements/test.txt
# The torch stack is machine-specific: never in the lock.
UNLOCKED := ^(pip|torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==

.PHONY: setup test test-gpu demo bench-smoke bench lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(CPU_TORCH); fi
	$(PY) -m pip install -q -e '.[test]' -c $(LOCK)
	touch $(STAMP)

# Re-resolve the test environment to the newest versions the index serves today (a scratch venv), rewrite the lock
# (its comment header kept). Then: make clean test, and commit the lock with the outcome.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	if ! command -v nvidia-smi >/dev/null 2>&1; then .lock-venv/bin/pip install -q $(CPU_TORCH); fi
	.lock-venv/bin/pip install -q -e '.[test]'
	{ sed '/^[^#]/,$$d' $(LOCK); .lock-venv/bin/pip freeze --all --exclude-editable | grep -viE '$(UNLOCKED)'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv
	git diff --stat -- $(LOCK) || true

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
	rm -rf $(VENV) .lock-venv .pytest_cache .benchmarks build *.egg-info
