#!/usr/bin/env bash
# One round on a lent GPU (see ../shared/GPU.md): offline install, GPU tests, kernel benchmarks, e2e benchmark.
# Usage (on the device, repo root):  bash bench/gpu_round.sh [tests|kernels|e2e|matformer|all] ; results in $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-.device_out}; mkdir -p "$OUT"
what=${1:-all}
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -c "import gemma3n_fast, torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/device.txt"
# launches and bytes per decode step (meta device: the same numbers on any machine; kept with the GPU results)
python3 -m bench.decode_cost --json "$OUT/decode_cost.json" > "$OUT/decode_cost.md" 2>&1 || tail -5 "$OUT/decode_cost.md"
if [[ $what == tests || $what == all ]]; then
  timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu tests -p no:cacheprovider -x --durations=15 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
fi
if [[ $what == kernels || $what == all ]]; then
  timeout ${KERNELS_TIMEOUT:-240} python3 -m pytest -q bench --benchmark-only --benchmark-json="$OUT/kernels.json" \
    --benchmark-columns=median,rounds -p no:cacheprovider 2>&1 | tee "$OUT/kernels.log" | tail -60
fi
if [[ $what == e2e || $what == all ]]; then
  kj=(); [[ -f "$OUT/kernels.json" ]] && kj=(--kernels-json "$OUT/kernels.json")
  timeout ${E2E_TIMEOUT:-420} python3 -m bench.e2e --out "$OUT" "${kj[@]}" ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log" | tail -60
fi
if [[ $what == matformer ]]; then  # E4B against its E2B preset and a mixed slice (decode tok/s, bytes per step)
  timeout ${E2E_TIMEOUT:-420} python3 -m bench.e2e --out "$OUT/matformer" --models e4b,e4b-as-e2b,e4b-mix \
    --systems gemma3n_fast --workloads text ${E2E_ARGS:-} 2>&1 | tee "$OUT/matformer.log" | tail -40
fi
