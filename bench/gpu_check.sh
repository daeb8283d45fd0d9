#!/usr/bin/env bash
# One GPU session's work (see ../shared/GPU.md): build for this GPU's arch, run the whole test suite, run
# compute-sanitizer on small cases of every kernel, run each op's side-by-side benchmark (subq-profile on one op: subq,
# its opt-in kernel variants and its baselines, checked against float64) and the profiler over every op (default
# paths, then with every opt-in SUBQ_EXPERIMENTAL_* kernel switched on).
#   SUBQ_GPU_STEPS="build test sanitize bench profile"   which steps to run (default: all)
#   SUBQ_GPU_BENCHES="monarch_matmul ssd_chunk_scan"     which ops the bench step runs, one process each (default:
#                                                          all; python3 -m subq.profile --list names them)
# The device tool returns at most 8 files from $OUT and stops a command after 10 minutes, so: logs and JSON go to
# $SUBQ_GPU_WORK (kept between calls on a warm machine), and after every step all of it is packed into one
# $OUT/gpu_<steps>.tar.gz, which survives a later step running out of time. Split the steps over calls, e.g.
#   SUBQ_GPU_STEPS="build test"   then   SUBQ_GPU_STEPS="sanitize bench"   then   SUBQ_GPU_STEPS=profile
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
WORK=${SUBQ_GPU_WORK:-/tmp/subq_gpu}
mkdir -p "$OUT" "$WORK"
STEPS=${SUBQ_GPU_STEPS:-build test sanitize bench profile}
ARCHIVE="$OUT/gpu_$(echo "$STEPS" | tr -c 'a-z0-9\n' '_').tar.gz"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PYTHONUNBUFFERED=1
# The GPU image sets CXX to /opt/gcc/bin/g++, whose libstdc++ gets linked into _C.so beside the system one that
# torch loads: two copies crash on the first formatted error message. Build with the system compiler, as torch was.
export CC=/usr/bin/gcc CXX=/usr/bin/g++
ARCH=$(python3 -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}{c[1]}' + ('a' if c[0] == 9 else ''))")
EXPERIMENTAL=(SUBQ_EXPERIMENTAL_SM90_GEMM=1 SUBQ_EXPERIMENTAL_SSD_KERNELS=1 SUBQ_EXPERIMENTAL_CONV_KERNELS=1
              SUBQ_EXPERIMENTAL_FLASH_KERNELS=1 SUBQ_EXPERIMENTAL_MAMBA2_KERNELS=1 SUBQ_EXPERIMENTAL_GROUPED_GEMM=1)
summary=()
step() {
  summary+=("$1: $2")
  echo "=== $1: $2"
  printf '%s\n' "${summary[@]}" >"$WORK/summary_$(echo "$STEPS" | tr -c 'a-z0-9\n' '_').txt"
  tar czf "$ARCHIVE" -C "$WORK" .
}

if [[ $STEPS == *build* ]]; then
  start=$SECONDS
  SUBQ_CUDA_ARCHS=$ARCH MAX_JOBS=$(nproc) python3 -m pip install -v --no-build-isolation --no-deps -e . \
    >"$WORK/build.log" 2>&1
  step build "exit $? for sm_$ARCH in $((SECONDS - start)) s"
fi
python3 -c "import subq, torch; print('subq', subq.cuda_built(), subq.cuda_archs(), torch.cuda.get_device_name())"

if [[ $STEPS == *test* ]]; then
  # No -x: most fused kernels have never run, and one run should report every failure, not the first.
  python3 -m pytest tests -q -rf -p no:cacheprovider >"$WORK/pytest.log" 2>&1
  step tests "exit $? ($(tail -n 1 "$WORK/pytest.log"))"
fi

if [[ $STEPS == *sanitize* ]]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 python3 bench/sanitize_cases.py >"$WORK/sanitize_$tool.log" 2>&1
    step "sanitizer $tool" "exit $? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$WORK/sanitize_$tool.log" | tail -n 1))"
  done
fi

if [[ $STEPS == *bench* ]]; then
  ops=${SUBQ_GPU_BENCHES:-$(python3 -c "from subq.profile.ops import OPS; print(*OPS)")}
  for op in $ops; do
    # writes $WORK/bench/<op>_<gpu>.{json,csv,png}
    python3 -m subq.profile --ops "$op" --no-progress --out "$WORK/bench" >"$WORK/bench_$op.log" 2>&1
    step "bench $op" "exit $?"
    tail -n 30 "$WORK/bench_$op.log"
  done
fi

if [[ $STEPS == *profile* ]]; then
  python3 -m subq.profile --out "$WORK/profile" >"$WORK/profile.log" 2>&1
  step profile "exit $?"
  env "${EXPERIMENTAL[@]}" python3 -m subq.profile --out "$WORK/profile_experimental" \
    >"$WORK/profile_experimental.log" 2>&1
  step "profile (opt-in kernels on)" "exit $?"
fi

printf '%s\n' "${summary[@]}"
grep -E "FAILED|Error" "$WORK/pytest.log" 2>/dev/null | head -n 20
echo "results: $ARCHIVE"
