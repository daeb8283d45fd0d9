#!/usr/bin/env bash
# The main job: set up (see .ci/setup.sh), then subq-profile over every op (table on the terminal; JSON, CSV and the
# roofline PNG under bench/results/). Extra arguments go to subq-profile, e.g. --quick or --ops monarch_matmul;
# without any, a machine with no GPU gets the quick CPU grid (a few minutes) and a GPU the full grid.
# Every op's spec (python/subq/profile/ops/) holds its side-by-side baselines and its float64 check: --ops one op is
# that op's benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
args=("$@")
if [[ ${#args[@]} -eq 0 ]] && ! ${PYTHON:-python3} -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  # The full grid is sized for a GPU; on a CPU it would take hours.
  echo "subq bench: no GPU here, so the quick CPU grid (about 10 s of profiling on 2 cores); pass arguments (e.g. --ops, --grid) for others"
  args=(--quick --device cpu)
fi
${PYTHON:-python3} -m subq.profile "${args[@]}"   # the subq-profile console script
