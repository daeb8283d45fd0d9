#!/usr/bin/env bash
# The main job: set up (see .ci/setup.sh), then the Monarch benchmark (JSON under bench/results/).
# Extra arguments go to bench/bench_monarch.py, e.g. --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
${PYTHON:-python3} bench/bench_monarch.py "$@"
