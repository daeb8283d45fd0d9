"""Builds subq._C: the torch glue plus, when CUDA is available, the CUTLASS kernel core.

Environment:
  SUBQ_BUILD_CUDA=0        CPU-only extension even with a CUDA build of torch
  SUBQ_CUDA_ARCHS="80;89;90a"   compute capabilities to compile for ("90a" enables Hopper-only instructions)
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


def gencode_flags(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
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
    cxx = ["-O3", "-std=c++17"]
    if want_cuda():
        archs = os.environ.get("SUBQ_CUDA_ARCHS", DEFAULT_ARCHS)
        include_dirs.append(str(cutlass_include_dir()))
        defines = ["-DSUBQ_WITH_CUDA", f'-DSUBQ_CUDA_ARCHS_STRING="{archs}"']
        if "90a" in (a.strip() for a in archs.split(";")):
            defines.append("-DSUBQ_WITH_SM90A")  # compiles and enables the Hopper wgmma GEMMs
        nvcc = [
            "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG",
            # torch's defaults switch off the half/bfloat16 operators that CUTLASS relies on.
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
            *gencode_flags(archs),
        ]
        print(f"subq: building the CUDA extension for SUBQ_CUDA_ARCHS={archs}")
        return [CUDAExtension("subq._C", glue_sources() + kernel_sources(), include_dirs=include_dirs,
                              extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines})]
    print("subq: building the CPU-only extension (no CUDA torch or nvcc found, or SUBQ_BUILD_CUDA=0)")
    return [CppExtension("subq._C", glue_sources(), include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx + ['-DSUBQ_CUDA_ARCHS_STRING=""']})]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=extensions(),
    cmdclass=cmdclass(),
)
