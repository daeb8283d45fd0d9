#!/usr/bin/env bash
# The compiled wheel, subq-<version>+cu130torch<major.minor>-cp3XX-...-linux_x86_64.whl (sm_80, sm_89, sm_90a and
# compute_90 PTX), and the sdist, both into dist/; then the wheel installed into a fresh venv that has only torch
# and numpy, and a smoke test run there, so a file missing from the package fails here. After the README's test
# command the wheel reuses its compiled objects (build/<kind>/). Prints the times.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
rm -rf dist
start=$SECONDS
MAX_JOBS=${MAX_JOBS:-$(nproc)} $PY -m pip wheel -q --no-build-isolation --no-deps -w dist .
cat build/last_build.txt
$PY setup.py -q sdist -d dist > /dev/null
echo "subq wheel: wheel and sdist built in $((SECONDS - start)) s"
wheel=$(ls dist/*.whl)
sdist=$(ls dist/*.tar.gz)
ls -l dist
$PY - "$wheel" "$sdist" <<'PYEOF'
import subprocess, sys, tarfile, zipfile
wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
print(f"subq wheel: {len(names)} files; extension: {[n for n in names if n.endswith('.so')]}")
assert any(n.startswith("subq/_C") and n.endswith(".so") for n in names), "no compiled extension in the wheel"
assert "subq/_build_info.py" in names, "no build record (ABI guard) in the wheel"
# The sdist must carry every source file git tracks under csrc/ and third_party/ (the build reads them).
tracked = subprocess.run(["git", "ls-files", "csrc", "third_party", "setup.py", "CMakeLists.txt"],
                         capture_output=True, text=True, check=True).stdout.split()
members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
missing = [t for t in tracked if t not in members]
assert not missing, f"the sdist lacks {missing[:10]}"
print(f"subq wheel: the sdist holds all {len(tracked)} tracked build sources")
PYEOF

start=$SECONDS
venv=$(mktemp -d)/venv
$PY -m venv "$venv"
torch_version=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
quiet() { grep -v "^WARNING: Location" >&2 || true; }  # this machine's pip config names absent local indexes
"$venv/bin/pip" install -q "torch==$torch_version" numpy 2> >(quiet)
"$venv/bin/pip" install -q --no-deps "$wheel" 2> >(quiet)
echo "subq wheel: fresh venv with torch $torch_version, numpy and the wheel in $((SECONDS - start)) s"
cd "$(mktemp -d)"  # away from the source tree: the installed package only
"$venv/bin/python" - <<'PYEOF'
import torch
import subq
from subq.reference.causal_conv1d import causal_conv1d_ref

print(f"subq {subq.__version__}: cuda_built={subq.cuda_built()} cuda_archs={subq.cuda_archs()!r} from {subq.__file__}")
x, w, b = torch.randn(2, 8, 50, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64), torch.randn(8)
y = subq.ops.causal_conv1d(x, w, b.double(), activation="silu")
err = (y - causal_conv1d_ref(x, w, b.double(), activation="silu")).abs().max().item()
assert err < 1e-12, err
print(f"subq wheel: smoke test passed (causal_conv1d on the CPU against its reference: max error {err:.1e})")
PYEOF
"$venv/bin/python" -m subq.info
