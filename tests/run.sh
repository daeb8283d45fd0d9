#!/usr/bin/env bash
# The test command: set up (see .ci/setup.sh), then the whole suite. GPU tests skip without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
start=$SECONDS
set +e
${PYTHON:-python3} -m pytest tests -q -p no:cacheprovider "$@"
status=$?
set -e
echo "subq tests: pytest exit $status in $((SECONDS - start)) s"
exit $status
