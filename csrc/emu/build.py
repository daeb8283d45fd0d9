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
`build_mutant` builds a target with one kernel compiled from changed sources (tests that seed bugs).
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
    "causal_conv1d/causal_conv1d_fwd.cu",
    "causal_conv1d/causal_conv1d_bwd.cu",
    "causal_conv1d/causal_conv1d_update.cu",
    "rmsnorm_gated/rmsnorm_gated.cu",
    "ssd/ssd_step.cu",
    "ssd/ssd_chunk_scan_fwd.cu",
    "ssd/ssd_chunk_scan_bwd.cu",
    "flash/flash_chunk_attention_fwd.cu",
    "flash/flash_chunk_attention_bwd.cu",
    "monarch_conv/monarch_conv_fused_fwd.cu",
    "monarch_conv/monarch_conv_fused_bwd.cu",
    "monarch/monarch_permute.cu",
    "grouped_matmul/grouped_matmul.cu",
]
GLUE = [
    "torch/causal_conv1d.cpp",
    "torch/rmsnorm_gated.cpp",
    "torch/ssd_step.cpp",
    "torch/ssd_chunk_scan.cpp",
    "torch/flash.cpp",
    "torch/monarch_conv.cpp",
    "torch/grouped_matmul.cpp",
]
COMPOSITES = [
    "causal_conv1d/causal_conv1d_cpu.cpp",
    "rmsnorm_gated/rmsnorm_gated_cpu.cpp",
    "rmsnorm_gated/rmsnorm_gated_cpu_fused.cpp",
    "ssd/ssd_step_cpu.cpp",
    "ssd/ssd_chunk_scan_cpu.cpp",
    "flash/flash_cpu.cpp",
    "monarch_conv/monarch_conv_cpu.cpp",
    "monarch_conv/monarch_dft.cpp",
    "grouped_matmul/grouped_matmul_cpu.cpp",
]
# Emulator-only stand-ins (csrc/emu/) for code the emulator cannot run, compiled like the kernels.
STAND_INS = [
    "grouped_matmul_host.cpp",  # the CUTLASS grouped GEMM behind grouped_matmul.cu's setup kernel
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


def unavailable_reason() -> str | None:
    """None when the emulator can be built here, else why not (its fibers switch x86-64 registers; it compiles
    against CUDA's headers)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "the emulator's fibers are x86-64 Linux only"
    try:
        cuda_include()
    except (FileNotFoundError, ImportError) as e:
        return str(e)
    return None


def _torch_paths() -> tuple[list[Path], Path]:
    import torch
    from torch.utils.cpp_extension import include_paths

    return [Path(p) for p in include_paths()], Path(torch.__file__).parent / "lib"


def _object(src: str, kind: str) -> str:
    return f"obj/{kind}/{src.replace('/', '_')}.o"


_RULES = [
    "ninja_required_version = 1.3",
    "rule cxx",
    "  command = c++ -MMD -MF $out.d $flags -c $in -o $out",
    "  depfile = $out.d",
    "  deps = gcc",
    "  description = CXX $out",
    "rule link",
    "  command = c++ $in -o $out $ldflags",
    "  description = LINK $out",
]


def _flags() -> dict[str, str]:
    """The compile flags of the glue (host) and the kernels (device), and the libraries every target links."""
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
    return {"host": host, "device": device, "libs": libs}


def _shared_objects() -> list[str]:
    """The objects every variant links besides its kernels (paths relative to OUT)."""
    return [_object(s, "host") for s in GLUE + COMPOSITES] + ["obj/host/emu_ops.o", "obj/host/emu_runtime.o"]


def _link(variant: str, objects: list[str], runner: str) -> list[str]:
    """The ninja statement that links `objects` into the variant's target (the runners add their main, `runner`)."""
    if variant == "plain":
        return [f"build libsubq_emu.so: link {' '.join(objects)}", "  ldflags = -shared -Wl,-Bsymbolic $libs"]
    return [f"build subq_emu_run_{variant}: link {' '.join(objects)} {runner}", f"  ldflags = {LINK[variant]} $libs"]


def write_ninja(variants: list[str]) -> Path:
    flags = _flags()
    src = OUT / "src"
    lines = _RULES + [f"host_flags = {flags['host']}", f"device_flags = {flags['device']}", f"libs = {flags['libs']}"]
    for s in GLUE + COMPOSITES:
        lines += [f"build {_object(s, 'host')}: cxx {src / s}", "  flags = $host_flags"]
    for name in ("emu_ops", "emu_runner"):
        lines += [f"build obj/host/{name}.o: cxx {EMU / (name + '.cpp')}", "  flags = $host_flags"]
    lines += [f"build obj/host/emu_runtime.o: cxx {EMU / 'emu_runtime.cpp'}", "  flags = $device_flags -O2"]
    # The rewritten kernels, and the stand-ins for what the emulator cannot run, with the variant's sanitizers.
    device_sources = [(k, src / (k + ".cpp")) for k in KERNELS] + [(k, EMU / k) for k in STAND_INS]
    for variant in variants:
        objects = [_object(name, variant) for name, _ in device_sources]
        for obj, (_, path) in zip(objects, device_sources, strict=True):
            lines += [f"build {obj}: cxx {path}", f"  flags = $device_flags {VARIANTS[variant]}"]
        lines += _link(variant, objects + _shared_objects(), "obj/host/emu_runner.o")
    return _write_if_changed(OUT / "build.ninja", "\n".join(lines) + "\n")


def _write_if_changed(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
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


def build_mutant(name: str, kernel: str, sources: dict[str, str], variant: str) -> Path:
    """Builds the variant's target in build/emu/mutants/<name>/ with the kernel source `kernel` (a KERNELS entry)
    compiled from changed sources: `sources` maps paths under csrc/ (the kernel's .cu or headers it includes) to
    their new text. Every other object is the main build's, so a mutant costs one compile and a link. Returns the
    target. Tests seed known bugs this way (tests/test_emulator_catches_bugs.py); the real sources stay as they are.

    A changed text must keep the original's line count, so that reports name the original file and line. The mutant
    object links first: where a changed header's inline functions are also compiled into other kernels' objects, the
    linker keeps the mutant's copy."""
    if kernel not in KERNELS:
        raise ValueError(f"{kernel} is not one of the emulated kernel sources {KERNELS}")
    build([variant])
    home = OUT / "mutants" / name
    for rel, text in sources.items():
        line_count = (CSRC / rel).read_text().count("\n")
        if text.count("\n") != line_count:
            raise ValueError(f"the changed {rel} must keep its {line_count} lines")
        rewritten = rewrite.rewrite_source(Path(rel), text, CSRC / rel)
        _write_if_changed(home / "src" / rewrite.rewritten_path(Path(rel)), rewritten)
    # The kernel compiles from the mutant's tree, changed or not, with that tree first on the include path: a
    # changed header is found before the main build's copy.
    tu = home / "src" / rewrite.rewritten_path(Path(kernel))
    if kernel not in sources:
        _write_if_changed(tu, rewrite.rewrite_source(Path(kernel), (CSRC / kernel).read_text(), CSRC / kernel))
    flags = _flags()
    mutant_object = _object(kernel, variant)
    others = [str(OUT / o) for o in [_object(s, variant) for s in KERNELS + STAND_INS if s != kernel]
              + _shared_objects()]
    lines = _RULES + [f"libs = {flags['libs']}",
                      f"build {mutant_object}: cxx {tu}",
                      f"  flags = -I{home / 'src'} {flags['device']} {VARIANTS[variant]}"]
    lines += _link(variant, [mutant_object] + others, str(OUT / "obj/host/emu_runner.o"))
    _write_if_changed(home / "build.ninja", "\n".join(lines) + "\n")
    with open(OUT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the main build's objects must not change under the link
        cmd = ["ninja", "-C", str(home)]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"mutant build failed: {shlex.join(cmd)}\n{(result.stdout + result.stderr)[-20000:]}")
    return home / target(variant).name


if __name__ == "__main__":
    if reason := unavailable_reason():
        print(f"subq emu: not built here ({reason}); the emulated tests skip")
        sys.exit(0)
    chosen = sys.argv[1:] or list(VARIANTS)
    seconds = build(chosen, verbose=True)
    print(f"subq emu: built {', '.join(chosen)} in {seconds:.0f} s")
