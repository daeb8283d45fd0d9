#!/usr/bin/env bash
# The main job: set up (see .ci/setup.sh), then subq-profile over every op (table on the terminal; JSON, CSV and the
# roofline PNG under bench/results/). Extra arguments go to subq-profile, e.g. --quick or --ops monarch_matmul.
# bench/bench_monarch.py is still there for the Monarch side-by-side with correctness checks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
${PYTHON:-python3} -m subq.profile "$@"   # the subq-profile console script
