"""Builds subq._C: the torch glue plus, when CUDA is available, the CUTLASS kernel core.

Environment:
  SUBQ_BUILD_CUDA=0        CPU-only extension even with a CUDA build of torch
  SUBQ_CUDA_ARCHS="80;89;90a"   compute capabilities to compile for ("90a" enables Hopper-only instructions)
  SUBQ_PTX_ARCH=90         also embed PTX for this compute capability, which newer GPUs JIT-compile ("" for none)
  CUTLASS_DIR              CUTLASS checkout or include dir (default: the nvidia-cutlass wheel)
  MAX_JOBS                 parallel compile jobs (torch's ninja build)
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "third_party"))

from cutlass_locator import cutlass_include_dir  # noqa: E402

DEFAULT_ARCHS = "80;89;90a"
DEFAULT_PTX_ARCH = "90"  # forward compatibility: GPUs after Hopper JIT-compile this PTX (90a's PTX cannot serve them)

# torch infers CUDA_HOME from the nvcc on PATH; with /usr/local/bin/nvcc a symlink that gives /usr/local, whose
# include/ lacks the toolkit headers. Prefer the standard toolkit root when it is there.
if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").is_file():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def kernel_sources() -> list[str]:
    sources = []
    for line in (ROOT / "csrc" / "kernel_sources.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            sources += sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / line)))
    return sources


def glue_sources() -> list[str]:
    # csrc/emu/ is the CPU emulator's (test infrastructure, built by csrc/emu/build.py), not part of subq._C.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(str(ROOT / "csrc" / "*" / "*.cpp"))
                  if Path(p).parent.name != "emu")


def gencode_flags(archs: str, ptx_arch: str) -> list[str]:
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if ptx_arch:
        flags.append(f"-gencode=arch=compute_{ptx_arch},code=compute_{ptx_arch}")
    return flags


def want_cuda() -> bool:
    if os.environ.get("SUBQ_BUILD_CUDA", "1") == "0":
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    # torch reports CUDA_HOME for an existing /usr/local/cuda even without a compiler in it.
    nvcc = Path(CUDA_HOME or "", "bin", "nvcc")
    return torch.version.cuda is not None and CUDA_HOME is not None and nvcc.is_file()


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    include_dirs = [str(ROOT / "csrc")]
    # -fno-trapping-math (clang's default): lets GCC vectorise loops with compare-and-select (the fused CPU loops'
    # clamps); results are unchanged, only floating-point exception flags could differ.
    cxx = ["-O3", "-std=c++17", "-fno-trapping-math"]
    if want_cuda():
        archs = os.environ.get("SUBQ_CUDA_ARCHS", DEFAULT_ARCHS)
        ptx_arch = os.environ.get("SUBQ_PTX_ARCH", DEFAULT_PTX_ARCH)
        include_dirs.append(str(cutlass_include_dir()))
        defines = ["-DSUBQ_WITH_CUDA", f'-DSUBQ_CUDA_ARCHS_STRING="{archs}"']
        if "90a" in (a.strip() for a in archs.split(";")):
            defines.append("-DSUBQ_WITH_SM90A")  # compiles and enables the Hopper wgmma GEMMs
        nvcc = [
            "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG",
            # torch's defaults switch off the half/bfloat16 operators that CUTLASS relies on.
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
            *gencode_flags(archs, ptx_arch),
        ]
        print(f"subq: building the CUDA extension for SUBQ_CUDA_ARCHS={archs} (+ PTX {ptx_arch or 'none'})")
        return [CUDAExtension("subq._C", glue_sources() + kernel_sources(), include_dirs=include_dirs,
                              extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines})]
    print("subq: building the CPU-only extension (no CUDA torch or nvcc found, or SUBQ_BUILD_CUDA=0)")
    return [CppExtension("subq._C", glue_sources(), include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx + ['-DSUBQ_CUDA_ARCHS_STRING=""']})]


def build_kind() -> str:
    """What the compiled objects depend on besides the sources: CUDA or CPU, archs, torch and Python."""
    import torch

    if want_cuda():
        kind = "cuda" + os.environ.get("SUBQ_CUDA_ARCHS", DEFAULT_ARCHS).replace(";", "-")
        kind += "-ptx" + os.environ.get("SUBQ_PTX_ARCH", DEFAULT_PTX_ARCH)
    else:
        kind = "cpu"
    return f"{kind}-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


def write_build_info() -> None:
    """python/subq/_build_info.py: the torch (and CUDA) this build is for, which subq/__init__.py checks at import
    (an ImportError naming both versions, never an undefined symbol)."""
    import torch

    cuda = want_cuda()
    text = (
        '"""Written by setup.py at build time: what subq._C was compiled against."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {torch.version.cuda if cuda else None!r}\n"
        f"CUDA_ARCHS = {os.environ.get('SUBQ_CUDA_ARCHS', DEFAULT_ARCHS) if cuda else ''!r}\n"
    )
    path = ROOT / "python" / "subq" / "_build_info.py"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def version() -> str:
    """0.1.0+cu130torch2.11 (or +cputorch2.11): the wheel says which torch and CUDA it was built for."""
    import torch

    base = "0.1.0"
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if want_cuda() else "cpu"
    return f"{base}+{cuda}torch{major_minor}"


def cmdclass():
    import time

    from torch.utils.cpp_extension import BuildExtension

    class PersistentBuildExtension(BuildExtension):
        """Compiles into build/<kind>/ in the source tree instead of pip's throwaway temporary folder, so a second
        install (or the wheel after an editable install) recompiles only what changed: ninja keeps the objects.
        Says how many it reused (build/last_build.txt, printed by .ci/setup.sh)."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(ROOT / "build" / build_kind())

        def build_extensions(self):
            start = time.time()
            objects = lambda: {p: p.stat().st_mtime for p in Path(self.build_temp).rglob("*.o")}  # noqa: E731
            before = objects()
            super().build_extensions()
            after = objects()
            compiled = sum(1 for p, t in after.items() if before.get(p) != t)
            summary = (f"subq build ({build_kind()}): {compiled} of {len(after)} objects compiled, "
                       f"{len(after) - compiled} reused from {self.build_temp}, {time.time() - start:.0f} s")
            print(summary)
            (ROOT / "build").mkdir(exist_ok=True)
            (ROOT / "build" / "last_build.txt").write_text(summary + "\n")

    return {"build_ext": PersistentBuildExtension.with_options(use_ninja=True)}


write_build_info()
setup(
    version=version(),
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=extensions(),
    cmdclass=cmdclass(),
)
