#!/usr/bin/env bash
# A benchmark round on a lent GPU, in stages ordered by what they tell us (why a round is two calls of under 8 minutes:
# BENCHMARKS.md, "The GPU round"; where its results go: bench/results/README.md). Each stage runs under its own time cap
# (SIGINT at the cap, so pytest and bench.e2e write what they have; SIGKILL 10 s later) and writes its results into
# $OUT as it finishes, so a stage cut short loses only itself. The call's budget bounds every cap as well: a stage
# gets at most the time left (less the summary's), one with under 15 s left is skipped, and the summary always runs.
#
# Usage, from the repository root:  bash bench/gpu_round.sh [call1|call2|all|tests|kernels|e2e|matformer|STAGE...]
#   OUT           results folder (default .device_out); stages.tsv there lists each stage: cap, seconds, status
#   CALL_BUDGET_S seconds for the whole call (default 450 for call1 and call2, else 3600)
#   PYTHON        the interpreter (default python3)
#   DRY_RUN=1     on any machine, check every stage's command instead of running it: a pytest stage must collect
#                 at least one item as a CUDA machine would (--collect-only with GEMMA3N_FAST_COLLECT_AS_GPU=1),
#                 a python -m stage (pip's install too) must accept its arguments with --dry-run; the plan lines
#                 give each stage's cap and whether it fits the budget; DRY_RUN=plan prints those lines only.
#                 tests/test_gpu_round.py runs both
#
# call1: the round's first call, at most 8 minutes. Caps (seconds; python startup included):
#   install       30  pip install -e . (offline, no build isolation)
#   device         5  nvidia-smi: name, memory, clocks, driver, power limit (device.txt)
#   env           15  versions, kernels mode, measured copy bandwidth, bf16 matmul rate (env.json)
#   gpu-tests    160  pytest -m gpu tests, no -x: every failure listed (gpu-tests.xml JUnit, gpu-tests.log)
#   headline     150  E2B batch 1, prompts 128 and 2048, gemma3n_fast bf16 / int4 / int8 vs HF eager: decode tok/s,
#                     TTFT (headline/)
#   k-gemv        35  decode-step GEMVs at M = 1 and the sparse FFN, triton vs eager (kernels/k-gemv.json)
#   k-attention   15  decode attention at batch 1: 1k / 8k / 32k cache, 512-slot ring (kernels/k-attention.json)
#   k-fused       30  fused row-wise ops at one token, bounded and split decode attention (kernels/k-fused.json)
#   summary       10  summary.md from what the stages wrote
#   total        450  (7.5 min)
#   while time is left: k-rest-gemv k-rest-fused k-rest-attention k-rest-rowwise
#                       (the other kernel benchmarks, without torch.compile)
#
# call2: the rest of the end-to-end grid, at most 8 minutes. Caps:
#   install       30
#   device         5
#   env           15
#   e2e-e4b      100  E4B batch 1, prompts 128 and 2048, gemma3n_fast vs HF eager (e2e-e4b/)
#   e2e-batch     80  E2B batch 8 and 32 at prompt 128, batch 8 at 2048, gemma3n_fast vs HF eager (e2e-batch/)
#   e2e-compile  130  E2B batch 1, prompt 128, gemma3n_fast vs HF static cache + torch.compile (e2e-compile/)
#   e2e-long      40  E2B batch 1, prompt 8192, gemma3n_fast vs HF eager (e2e-long/)
#   e2e-media     40  E2B image and audio prompts, batch 1, gemma3n_fast vs HF eager (e2e-media/)
#   summary       10
#   total        450  (7.5 min)
#   while time is left: k-compile-decode decode-cost matformer k-compile-rest
#                       (the torch.compile providers at the decode-step shapes, the launch and byte account of
#                       bench.decode_cost, E4B against two MatFormer slices, the other torch.compile providers)
#
# Groups: tests = gpu-tests; kernels = every k-* stage; e2e = headline and every e2e-* stage; all = call1 then call2
# (and their extra stages). install, device, env and summary run in every real round. Copy $OUT to
# bench/results/<YYYY-MM-DD>-<device>/ and commit it (bench/results/README.md).
set -o pipefail
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-}
DRY_TMP=
if [[ -n $DRY_RUN && -z $OUT ]]; then OUT=$(mktemp -d) DRY_TMP=1; else OUT=${OUT:-.device_out}; fi
GRACE=10      # seconds from SIGINT to SIGKILL
MIN_STAGE=15  # a stage left with less than this (and less than its cap) is skipped
SUMMARY_CAP=10
FAILED=0      # dry run: 1 once a check failed

# The reported time is do_bench's CUDA-event median in extra_info (bench/common.py); pytest-benchmark's own rounds
# (a wall clock around a synchronised call) are a cross-check only: 5 rounds each (max-time 0), which also keeps
# its JSON, which holds every round, small.
BENCH_OPTS=(-q -p no:cacheprovider --benchmark-only --benchmark-max-time=0 --benchmark-min-rounds=5
            --benchmark-columns=median,rounds)
DECODE="decode_step and not torch_compile"
REST="not decode_step and not torch_compile"

record() {  # record NAME CAP SECONDS STATUS
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$OUT/stages.tsv"
  printf '== %-16s cap %4s s  %4s s  %s\n' "$1" "$2" "$3" "$4"
}

dry() {  # dry NAME CAP CMD...: check the command as far as a machine without a GPU can, in the background
  local name=$1 cap=$2 fit=fits; shift 2
  if [[ $name != summary ]]; then
    PLANNED=$((PLANNED + cap))
    ((PLANNED + SUMMARY_CAP > BUDGET)) && fit="if time is left"
  fi
  [[ $fit == fits ]] && FITS=$((FITS + cap))
  DRY_NAMES+=("$name")
  printf 'plan\t%s\t%s\t%s\n' "$name" "$cap" "$fit" >"$OUT/dry-$name.txt"
  [[ $DRY_RUN == plan ]] && return 0
  while (($(jobs -rp | wc -l) >= $(nproc))); do wait -n; done
  check "$@" >>"$OUT/dry-$name.txt" 2>&1 &
}

check() {  # check CMD...: pytest collects >= 1 item as on a CUDA machine; python -m (pip too) takes --dry-run
  local out rc
  if [[ $1 == "$PY" && $2 == -m && $3 == pytest ]]; then
    out=$(GEMMA3N_FAST_COLLECT_AS_GPU=1 "$@" --collect-only 2>&1); rc=$?
    echo "  $(grep -E 'collected|no tests ran|error' <<<"$out" | tail -n 1)"
    ((rc == 0)) || { echo "$out" | tail -n 20; echo "  FAILED: collects nothing (pytest exit $rc)"; }
  elif [[ $1 == "$PY" && $2 == -m ]]; then
    "$@" --dry-run 2>&1 | sed 's/^/  /' || echo "  FAILED: arguments refused"
  else
    echo "  not checked here: $*"
  fi
}

run() {  # run NAME CAP CMD...: CMD under min(CAP, time left), output in $OUT/NAME.log; @BUDGET@ = cap - 15 s
  local name=$1 cap=$2 nominal=$2; shift 2
  local args=("${@//@BUDGET@/$((cap - 15))}")
  if [[ -n $DRY_RUN ]]; then dry "$name" "$cap" "${args[@]}"; return 0; fi
  local left=$((BUDGET - SUMMARY_CAP - (SECONDS - T0)))
  [[ $name == summary ]] && left=$SUMMARY_CAP
  ((cap > left)) && cap=$left
  if [[ $name != summary ]] && ((cap < MIN_STAGE && cap < nominal)); then
    record "$name" "$cap" 0 "skipped: no time left"
    return 0
  fi
  args=("${@//@BUDGET@/$((cap - 15))}")
  local t=$SECONDS rc status
  timeout --signal=INT --kill-after=$GRACE "$cap" "${args[@]}" >"$OUT/$name.log" 2>&1
  rc=$?
  case $rc in 0) status=ok ;; 124 | 137) status="cut at its cap" ;; *) status="exit $rc" ;; esac
  tail -n 12 "$OUT/$name.log"
  record "$name" "$cap" $((SECONDS - t)) "$status"
  return $rc
}

e2e() {  # e2e NAME CAP ARGS...: the end-to-end benchmark into $OUT/NAME/, its own budget inside the cap
  local name=$1 cap=$2; shift 2
  run "$name" "$cap" "$PY" -m bench.e2e --out "$OUT/$name" --budget-s @BUDGET@ "$@"
}

kernels() {  # kernels NAME CAP FILE MARKS: one benchmark file, one selection, one JSON
  run "$1" "$2" "$PY" -m pytest "bench/bench_$3.py" -m "$4" "${BENCH_OPTS[@]}" --benchmark-json="$OUT/kernels/$1.json"
}

stage() {
  case $1 in
    install) run install 30 "$PY" -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check -e . ;;
    env)
      run device 5 nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version,power.limit --format=csv \
        --filename="$OUT/device.txt"
      run env 15 "$PY" -m bench.env --json "$OUT/env.json" ;;
    gpu-tests) run gpu-tests 160 "$PY" -m pytest -m gpu tests -p no:cacheprovider -v --tb=short --durations=20 \
      --junitxml="$OUT/gpu-tests.xml" ;;
    headline) e2e headline 150 --models e2b --systems gemma3n_fast,gemma3n_fast-int4,gemma3n_fast-int8,hf \
      --workloads text --batches 1 --prompts 128,2048 ;;
    k-gemv) kernels k-gemv 35 gemv "$DECODE" ;;
    k-attention) kernels k-attention 15 attention "$DECODE" ;;
    k-fused) kernels k-fused 30 fused "$DECODE" ;;
    k-rest-gemv) kernels k-rest-gemv 60 gemv "$REST" ;;
    k-rest-fused) kernels k-rest-fused 60 fused "$REST" ;;
    k-rest-attention) kernels k-rest-attention 90 attention "$REST" ;;
    k-rest-rowwise) kernels k-rest-rowwise 60 rowwise "$REST" ;;
    k-compile-decode) run k-compile-decode 300 "$PY" -m pytest bench -m "decode_step and torch_compile" \
      "${BENCH_OPTS[@]}" --benchmark-json="$OUT/kernels/k-compile-decode.json" ;;
    k-compile-rest) run k-compile-rest 600 "$PY" -m pytest bench -m "not decode_step and torch_compile" \
      "${BENCH_OPTS[@]}" --benchmark-json="$OUT/kernels/k-compile-rest.json" ;;
    e2e-e4b) e2e e2e-e4b 100 --models e4b --systems gemma3n_fast,hf --workloads text --batches 1 --prompts 128,2048 ;;
    e2e-batch) e2e e2e-batch 80 --models e2b --systems gemma3n_fast,hf --workloads text --batches 8,32 ;;
    e2e-compile) e2e e2e-compile 130 --models e2b --systems gemma3n_fast,hf-compile --workloads text --batches 1 \
      --prompts 128 ;;
    e2e-long) e2e e2e-long 40 --models e2b --systems gemma3n_fast,hf --workloads text --batches 1 --prompts 8192 ;;
    e2e-media) e2e e2e-media 40 --models e2b --systems gemma3n_fast,hf --workloads image,audio ;;
    matformer) e2e matformer 200 --models e4b,e4b-as-e2b,e4b-mix --systems gemma3n_fast --workloads text \
      --batches 1 --prompts 128 ;;
    decode-cost) run decode-cost 30 "$PY" -m bench.decode_cost --json "$OUT/decode_cost.json" ;;
    summary) run summary $SUMMARY_CAP "$PY" -m bench.summary "$OUT" ;;
  esac
}

CALL1=(gpu-tests headline k-gemv k-attention k-fused k-rest-gemv k-rest-fused k-rest-attention k-rest-rowwise)
CALL2=(e2e-e4b e2e-batch e2e-compile e2e-long e2e-media k-compile-decode decode-cost matformer k-compile-rest)
KERNELS=(k-gemv k-attention k-fused k-rest-gemv k-rest-fused k-rest-attention k-rest-rowwise k-compile-decode
         k-compile-rest)
E2E=(headline e2e-e4b e2e-batch e2e-compile e2e-long e2e-media)
stages=()
for arg in "${@:-call1}"; do
  case $arg in
    call1) stages+=("${CALL1[@]}") ;;
    call2) stages+=("${CALL2[@]}") ;;
    all) stages+=("${CALL1[@]}" "${CALL2[@]}") ;;
    tests) stages+=(gpu-tests) ;;
    kernels) stages+=("${KERNELS[@]}") ;;
    e2e) stages+=("${E2E[@]}") ;;
    install | env | summary) ;;  # always run
    *) stages+=("$arg") ;;
  esac
done
for s in "${stages[@]}"; do  # a typo stops the round here, before the install
  [[ " ${CALL1[*]} ${CALL2[*]} " == *" $s "* ]] && continue
  echo "unknown stage or group: $s (see the header of $0)" >&2
  exit 2
done
case "$*" in call1 | call2 | "") BUDGET=${CALL_BUDGET_S:-450} ;; *) BUDGET=${CALL_BUDGET_S:-3600} ;; esac
T0=$SECONDS
PLANNED=0     # dry run: caps so far (the summary's apart)
FITS=0        # dry run: caps of the stages that fit the budget
DRY_NAMES=()

mkdir -p "$OUT/kernels"
{
  echo "command: bash bench/gpu_round.sh $*"
  echo "stages: ${stages[*]}"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "budget_s: $BUDGET"
  if commit=$(git rev-parse --short HEAD 2>/dev/null); then
    [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && commit+=" with uncommitted changes"
    echo "commit: $commit"
  else
    echo "commit: unknown (no git here: the committer adds it)"
  fi
} >"$OUT/command.txt"
: >"$OUT/stages.tsv"

stage install || { [[ -z $DRY_RUN ]] && cat "$OUT/install.log" && exit 1; }
stage env
for s in "${stages[@]}"; do stage "$s"; done
stage summary
if [[ -n $DRY_RUN ]]; then
  wait
  for name in "${DRY_NAMES[@]}"; do
    cat "$OUT/dry-$name.txt"
    grep -q FAILED "$OUT/dry-$name.txt" && FAILED=1
  done
  echo "dry run: budget $BUDGET s; caps of the stages that fit $FITS s, of the rest $((PLANNED + SUMMARY_CAP - FITS)) s"
  [[ -n $DRY_TMP ]] && rm -rf "$OUT"
  exit $FAILED
fi
echo "results in $OUT (stages.tsv, summary.md)"
