#!/usr/bin/env bash
# The test command: set up (see .ci/setup.sh), build the kernel emulator, then the whole suite (the emulated
# kernels included). GPU tests skip without a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup.sh
# The CPU emulator of the CUDA kernels (csrc/emu/): incremental, so only changed sources recompile.
${PYTHON:-python3} csrc/emu/build.py
start=$SECONDS
set +e
${PYTHON:-python3} -m pytest tests -q -p no:cacheprovider "$@"
status=$?
set -e
echo "subq tests: pytest exit $status in $((SECONDS - start)) s"
exit $status
