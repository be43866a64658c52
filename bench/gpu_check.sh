#!/usr/bin/env bash
# Check a GPU machine in one command, from a clean clone:
#
#   bench/gpu_check.sh OUT_DIR        set up (CUDA extension for this GPU's arch), print
#                                     `python -m mixkernels.info`, run the selftest on cuda, the cuda
#                                     tests, then every benchmark in its --quick GPU mode; logs, CSVs
#                                     and summary.md go to OUT_DIR (also: make gpu-check OUT=OUT_DIR)
#   bench/gpu_check.sh --dry-run      on any machine (no GPU needed): print the plan with its budgets
#                                     and check that every referenced test and bench exists
#
# Budget: 8 minutes in total on one H100/H200-class GPU, set-up included. Every part has its own
# budget (the sum is <= 480 s); a part that overruns is stopped (SIGTERM, then SIGKILL 5 s later),
# reported as TIMEOUT, and the next part runs. Nothing here has been run on a GPU by the project:
# the first run on a GPU machine is the measurement.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-.venv}
PY=${PY:-$VENV/bin/python}
TOTAL_BUDGET=480

# ---- the plan: one place ------------------------------------------------------------------------
# Test paths whose `cuda`-marked ids run on the GPU (compiled Triton: never under TRITON_INTERPRET),
# in two parts so that a slow op suite cannot starve the model-level tests of their budget.
OPS_TESTS="tests/ops"
MODEL_TESTS="tests/test_grad_projector.py tests/test_hf_router.py tests/mixtrain/test_gpu_train.py"
CUDA_TESTS="$OPS_TESTS $MODEL_TESTS"
# bench script : arguments in the GPU check (the four op benches have a GPU mode; gradex and loop
# run their --quick size through the same code path as on CPU)
GPU_BENCHES="segment_sum router_stats linear_ce grad_proj"
CPU_BENCHES="gradex loop"
# part:budget seconds (sum <= TOTAL_BUDGET)
# Estimates for one H100-class node (none has been timed on a GPU yet): set-up is dominated by the
# torch download and the one-arch nvcc build; bench_loop/bench_gradex are CPU benches run at their
# --quick size so that they are known to work on the GPU machine too.
# (GPU_CHECK_PARTS replaces the list: the test suite runs the orchestration with a few cheap parts.)
PARTS=${GPU_CHECK_PARTS:-"setup:180 info:10 selftest:25 tests_ops:100 tests_models:45 bench_segment_sum:15
bench_router_stats:15 bench_linear_ce:20 bench_grad_proj:30 bench_gradex:10 bench_loop:30"}
# -v: one line per test as it finishes, so a part stopped at its budget still shows what ran.
PYTEST_CUDA="env -u TRITON_INTERPRET MIXKERNELS_TEST_REQUIRE_CUDA=1 $PY -m pytest -v --tb=short -p no:cacheprovider -rfEs -m cuda"

part_command() {  # the command of one part, as printed in the plan and run by the check
  case "$1" in
    setup) echo "bash bench/gpu_check.sh --part setup" ;;
    info) echo "$PY -m mixkernels.info" ;;
    selftest) echo "$PY -m mixkernels.info --selftest --device cuda" ;;
    tests_ops) echo "$PYTEST_CUDA --junitxml=\$OUT/tests_ops.xml $OPS_TESTS" ;;
    tests_models) echo "$PYTEST_CUDA --junitxml=\$OUT/tests_models.xml $MODEL_TESTS" ;;
    bench_gradex | bench_loop) echo "BENCH_RESULTS_DIR=\$OUT/csv $PY bench/${1}.py --quick" ;;
    bench_*) echo "BENCH_RESULTS_DIR=\$OUT/csv $PY bench/${1}.py --device cuda --quick" ;;
    *) echo "unknown part $1" >&2; return 1 ;;
  esac
}

# ---- set-up (run as its own part, under its budget) ---------------------------------------------
setup() {
  set -e
  make "$VENV/bin/python"
  "$PY" -m pip install -q --upgrade pip setuptools wheel ninja
  # TORCH_INDEX_URL picks a torch build for an older driver (the default PyPI wheel is built for
  # CUDA 13, which needs an NVIDIA driver >= 580), e.g. https://download.pytorch.org/whl/cu128
  "$PY" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch triton numpy
  nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader || true
  if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc not on PATH: the CUDA kernels cannot be built"; fi
  "$PY" - <<'EOF'
import sys
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    print("torch cannot use the GPU: its CUDA build may need a newer driver than this machine's; rerun with "
          "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu<XY> matching the driver (nvidia-smi) and nvcc")
    sys.exit(1)
EOF
  # The CUDA extension for this GPU only: one arch compiles in a fraction of the default 8.0;9.0 time.
  arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null ||
         nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
  echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc)"
  # `make setup` without its `models` step (the pretrained demo model: no part of the check uses it,
  # and fetching + converting it costs a minute of the budget)
  TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=$(nproc) make "$VENV/.mixkernels-installed"
  "$PY" - <<'EOF'
import sys
from mixkernels import _extension
ok = _extension.LOADED and _extension.WITH_CUDA and _extension.has_kernel("mixkernels::segment_sum", "CUDA")
print(f"_C loaded {_extension.LOADED}, with CUDA {_extension.WITH_CUDA}: {'ok' if ok else _extension.REASON}")
if not ok:
    print("the CUDA kernels are not built: is nvcc on PATH? (a stale CPU-only build: make clean && rerun)")
sys.exit(0 if ok else 1)
EOF
}

# ---- dry run ------------------------------------------------------------------------------------
dry_run() {
  local fail=0 total=0 part name budget
  echo "gpu_check plan (budget ${TOTAL_BUDGET}s in total):"
  for part in $PARTS; do
    name=${part%%:*}; budget=${part##*:}; total=$((total + budget))
    printf '  %-20s %4ss  %s\n' "$name" "$budget" "$(part_command "$name")"
  done
  echo "  sum of budgets: ${total}s"
  if [ "$total" -gt "$TOTAL_BUDGET" ]; then echo "FAIL: budgets exceed ${TOTAL_BUDGET}s"; fail=1; fi
  for name in $GPU_BENCHES $CPU_BENCHES; do
    if ! printf '%s\n' $PARTS | grep -q "^bench_${name}:"; then echo "FAIL: bench $name has no part"; fail=1; fi
    local script="bench/bench_${name}.py" help
    if [ ! -f "$script" ]; then echo "FAIL: $script does not exist"; fail=1; continue; fi
    help=$("$PY" "$script" --help 2>&1) || { echo "FAIL: $script --help: $help"; fail=1; continue; }
    case "$help" in *--quick*) ;; *) echo "FAIL: $script does not accept --quick"; fail=1 ;; esac
    if [[ " $GPU_BENCHES " == *" $name "* ]]; then
      case "$help" in *--device*) ;; *) echo "FAIL: $script does not accept --device"; fail=1 ;; esac
    fi
    echo "  ok: $script accepts the check's arguments"
  done
  local info_help
  info_help=$("$PY" -m mixkernels.info --help 2>&1)
  case "$info_help" in *--device*) echo "  ok: mixkernels.info --selftest --device" ;;
    *) echo "FAIL: python -m mixkernels.info has no --device"; fail=1 ;; esac
  local collected
  # shellcheck disable=SC2086
  collected=$(env -u TRITON_INTERPRET "$PY" -m pytest --collect-only -q -p no:cacheprovider -m cuda $CUDA_TESTS 2>&1)
  local rc=$? count
  count=$(printf '%s\n' "$collected" | grep -c '::')
  if [ $rc -ne 0 ] || [ "$count" -eq 0 ]; then
    echo "FAIL: collecting the cuda tests (rc $rc, $count ids):"; printf '%s\n' "$collected" | tail -20; fail=1
  else
    echo "  ok: $count cuda test ids collected from $CUDA_TESTS"
    for path in $CUDA_TESTS; do
      if ! printf '%s\n' "$collected" | grep -q "^${path}"; then echo "FAIL: no cuda test in $path"; fail=1; fi
    done
  fi
  [ $fail -eq 0 ] && echo "dry run: ok" || echo "dry run: FAILED"
  return $fail
}

# ---- the check ----------------------------------------------------------------------------------
run_check() {
  local OUT=$1
  mkdir -p "$OUT/logs" "$OUT/csv"
  OUT=$(cd "$OUT" && pwd)
  export OUT
  local summary="$OUT/summary.md" start=$SECONDS i=0 failed=0 part name budget cmd log t0 rc status elapsed
  local gpu
  gpu=$(nvidia-smi -L 2>/dev/null | head -4 | tr '\n' ';' || true)
  {
    echo "# GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- GPU: ${gpu:-unknown (nvidia-smi not found)}"
    echo "- budget: ${TOTAL_BUDGET}s in total; every part is stopped at its own budget"
    echo
    echo "| part | status | elapsed s | budget s | log |"
    echo "|---|---|---|---|---|"
  } >"$summary.parts"
  for part in $PARTS; do
    i=$((i + 1)); name=${part%%:*}; budget=${part##*:}
    cmd=$(part_command "$name")
    log="$OUT/logs/$(printf '%02d' $i)-$name.log"
    echo "== [$i] $name (budget ${budget}s): $cmd"
    t0=$SECONDS
    echo "\$ $cmd" >"$log"
    timeout -k 5 "$budget" bash -c "$cmd" >>"$log" 2>&1
    rc=$?
    elapsed=$((SECONDS - t0))
    case $rc in
      0) status=ok ;;
      124 | 137) status="TIMEOUT (stopped at ${budget}s)"; failed=$((failed + 1)) ;;
      *) status="FAILED (exit $rc)"; failed=$((failed + 1)) ;;
    esac
    echo "   $name: $status after ${elapsed}s (total $((SECONDS - start))s)"
    echo "| $name | $status | $elapsed | $budget | logs/$(basename "$log") |" >>"$summary.parts"
    tail -n 3 "$log" | sed 's/^/   | /'
  done
  {
    cat "$summary.parts"
    echo
    echo "Total: $((SECONDS - start))s; $failed part(s) not ok."
    echo
    echo "Targets the benches compare against (targets, not results): linear_cross_entropy <= 1.15x the"
    echo "3-GEMM floor and peak memory <= 1/8 of eager at N=16k d=4096 V=128k bf16; segment_sum >= 70% of"
    echo "HBM bandwidth at N=64M; router_stats + load-balancing loss >= 5x transformers; factored projected"
    echo "gradients <= 1.1x a plain step on the 1B Llama shape. CSVs: csv/*.csv."
    for log in "$OUT"/logs/*.log; do
      echo
      echo "## $(basename "$log" .log)"
      echo
      echo '```'
      case "$log" in
        *-tests_*.log) grep -E '^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|error)' "$log" | tail -n 60 ;;
        *-selftest.log) grep -E 'FAIL|selftest:|^selftest on' "$log" | tail -n 60 ;;
        *-bench_*) awk '/^== /{p=1} p' "$log" | tail -n 60; grep -E '^peaks:' "$log" | tail -1 ;;
        *) tail -n 40 "$log" ;;
      esac
      echo '```'
    done
  } >"$summary"
  rm -f "$summary.parts"
  echo "summary: $summary ($failed part(s) not ok, $((SECONDS - start))s)"
  [ $failed -eq 0 ]
}

case "${1:-}" in
  --dry-run) dry_run ;;
  --part)
    case "${2:-}" in
      setup) setup ;;
      *) echo "unknown part ${2:-}" >&2; exit 2 ;;
    esac ;;
  "" | -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; [ -n "${1:-}" ] ;;
  -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  *) run_check "$1" ;;
esac
