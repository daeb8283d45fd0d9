"""Builds the CPU emulator's copies of our CUDA kernels (see csrc/emu/rewrite.py and emu_runtime.cpp).

    python csrc/emu/build.py [plain] [asan] [tsan]     # default: all three

* plain: build/emu/libsubq_emu.so, loaded by tests with torch.ops.load_library: the kernels at -O2 behind the
  torch glue, as torch.ops.subq_emu.* on CPU tensors;
* asan:  build/emu/subq_emu_run_asan, the same ops with the kernels under ASan + UBSan (every shared array its own
  exactly sized allocation; misaligned vector accesses; -fno-sanitize-recover);
* tsan:  build/emu/subq_emu_run_tsan, the kernels under TSan with one fiber per emulated thread.
The two runners take a file of op calls written by torch.save (tests/emu_cases.py) and exit non-zero on any
report. ThreadSanitizer cannot run inside the Python interpreter, hence separate programs.

Incremental: the rewritten tree is rewritten only where a source changed, and ninja recompiles only what changed.
"""
from __future__ import annotations

import fcntl
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
EMU = CSRC / "emu"
OUT = ROOT / "build" / "emu"

sys.path.insert(0, str(EMU))
import rewrite  # noqa: E402

KERNELS = [
    "conv1d/causal_conv1d_fwd.cu",
    "conv1d/causal_conv1d_bwd.cu",
    "conv1d/causal_conv1d_update.cu",
    "norm/rmsnorm_gated.cu",
    "ssd/ssd_step.cu",
    "ssd/ssd_chunk_scan_fwd.cu",
    "ssd/ssd_chunk_scan_bwd.cu",
    "flash/flash_chunk_attention_fwd.cu",
    "flash/flash_chunk_attention_bwd.cu",
    "monarch_conv/monarch_conv_fused_fwd.cu",
    "monarch_conv/monarch_conv_fused_bwd.cu",
    "monarch/monarch_permute.cu",
    "grouped_gemm/grouped_gemm.cu",
]
GLUE = [
    "torch/causal_conv1d.cpp",
    "torch/rmsnorm_gated.cpp",
    "torch/ssd_step.cpp",
    "torch/ssd_chunk_scan.cpp",
    "torch/flash_attention.cpp",
    "torch/monarch_conv.cpp",
    "torch/grouped_matmul.cpp",
]
COMPOSITES = [
    "conv1d/causal_conv1d_cpu.cpp",
    "norm/rmsnorm_gated_cpu.cpp",
    "ssd/ssd_step_cpu.cpp",
    "ssd/ssd_chunk_scan_cpu.cpp",
    "flash/flash_attention_cpu.cpp",
    "monarch_conv/monarch_conv_cpu.cpp",
    "monarch_conv/monarch_dft.cpp",
    "grouped_gemm/grouped_gemm_cpu.cpp",
]
# Emulator-only stand-ins (csrc/emu/) for code the emulator cannot run, compiled like the kernels.
STAND_INS = [
    "grouped_gemm_host.cpp",  # the CUTLASS grouped GEMM behind grouped_gemm.cu's setup kernel
]
VARIANTS = {
    "plain": "-O2",
    "asan": "-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all",
    "tsan": "-O1 -g -fsanitize=thread",
}
LINK = {"plain": "", "asan": "-fsanitize=address,undefined", "tsan": "-fsanitize=thread"}


def cuda_include() -> Path:
    """CUDA's headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h): the toolkit's, else the pip runtime wheel's."""
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    if (home / "include" / "cuda_runtime.h").exists():
        return home / "include"
    import nvidia  # the CUDA runtime wheel that CUDA builds of torch depend on

    for base in map(Path, nvidia.__path__):
        for candidate in base.glob("cu*/include"):
            if (candidate / "cuda_runtime.h").exists():
                return candidate
    raise FileNotFoundError("no CUDA headers: set CUDA_HOME or install a CUDA build of torch")


def _torch_paths() -> tuple[list[Path], Path]:
    import torch
    from torch.utils.cpp_extension import include_paths

    return [Path(p) for p in include_paths()], Path(torch.__file__).parent / "lib"


def _object(src: str, kind: str) -> str:
    return f"obj/{kind}/{src.replace('/', '_')}.o"


def write_ninja(variants: list[str]) -> Path:
    torch_includes, torch_lib = _torch_paths()
    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    src = OUT / "src"
    cuda = cuda_include()
    cccl = f" -isystem {cuda / 'cccl'}" if (cuda / "cccl").is_dir() else ""  # CUDA 13 keeps libcu++ there
    common = f"-std=c++17 -fPIC -Wno-attributes -I{EMU / 'include'} -I{EMU} -I{src} -isystem {cuda}{cccl}"
    host = (f"{common} -O1 -DSUBQ_WITH_CUDA -D_GLIBCXX_USE_CXX11_ABI={abi} "
            + " ".join(f"-isystem {p}" for p in torch_includes) + f" -include {EMU / 'emu_glue.h'}")
    sys.path.insert(0, str(ROOT / "third_party"))
    from cutlass_locator import cutlass_include_dir

    device = f"{common} -isystem {cutlass_include_dir()} -include {EMU / 'emu_device.h'}"
    libs = f"-L{torch_lib} -Wl,-rpath,{torch_lib} -ltorch_cpu -lc10 -lpthread"
    lines = [
        "ninja_required_version = 1.3",
        f"host_flags = {host}",
        f"device_flags = {device}",
        "rule cxx",
        "  command = c++ -MMD -MF $out.d $flags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $out",
        "rule link",
        "  command = c++ $in -o $out $ldflags",
        "  description = LINK $out",
    ]
    host_objects = []
    for s in GLUE + COMPOSITES:
        obj = _object(s, "host")
        lines += [f"build {obj}: cxx {src / s}", "  flags = $host_flags"]
        host_objects.append(obj)
    ops = "obj/host/emu_ops.o"
    lines += [f"build {ops}: cxx {EMU / 'emu_ops.cpp'}", "  flags = $host_flags"]
    runner = "obj/host/emu_runner.o"
    lines += [f"build {runner}: cxx {EMU / 'emu_runner.cpp'}", "  flags = $host_flags"]
    runtime = "obj/host/emu_runtime.o"
    lines += [f"build {runtime}: cxx {EMU / 'emu_runtime.cpp'}", "  flags = $device_flags -O2"]
    for variant in variants:
        objects = []
        for s in KERNELS:
            obj = _object(s, variant)
            lines += [f"build {obj}: cxx {src / (s + '.cpp')}", f"  flags = $device_flags {VARIANTS[variant]}"]
            objects.append(obj)
        for s in STAND_INS:
            obj = _object(s, variant)
            lines += [f"build {obj}: cxx {EMU / s}", f"  flags = $device_flags {VARIANTS[variant]}"]
            objects.append(obj)
        # The permutation kernel is reached through emu_ops, compiled with the same sanitizers as the kernels.
        everything = " ".join(objects + host_objects + [ops, runtime])
        if variant == "plain":
            lines += [f"build libsubq_emu.so: link {everything}", f"  ldflags = -shared -Wl,-Bsymbolic {libs}"]
        else:
            lines += [f"build subq_emu_run_{variant}: link {everything} {runner}",
                      f"  ldflags = {LINK[variant]} {libs}"]
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "build.ninja"
    text = "\n".join(lines) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def target(variant: str) -> Path:
    return OUT / ("libsubq_emu.so" if variant == "plain" else f"subq_emu_run_{variant}")


def build(variants: list[str] | None = None, verbose: bool = False) -> float:
    """Rewrites and compiles what changed; returns the seconds it took."""
    variants = variants or list(VARIANTS)
    start = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel test processes share build/emu)
        rewrite.rewrite_tree(CSRC, OUT / "src")
        write_ninja(variants)
        targets = [str(target(v).relative_to(OUT)) for v in variants]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        cmd = ["ninja", "-C", str(OUT), "-j", jobs] + targets
        result = subprocess.run(cmd, capture_output=not verbose, text=True)
    if result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "")
        raise RuntimeError(f"emulator build failed: {shlex.join(cmd)}\n{output[-20000:]}")
    return time.time() - start


if __name__ == "__main__":
    chosen = sys.argv[1:] or list(VARIANTS)
    seconds = build(chosen, verbose=True)
    print(f"subq emu: built {', '.join(chosen)} in {seconds:.0f} s")
