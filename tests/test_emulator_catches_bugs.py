"""The emulator's checks catch real bugs: known bugs seeded into copies of our kernel sources, each built into a
runner of its own (csrc/emu/build.py: build_mutant, one kernel compile and a link), must be reported on a small case
by the right check, naming the kernel's source line. The real sources are never edited: a seed is one textual
replacement that must find its text exactly once, so a change of the source fails here loudly instead of testing
nothing. The same case through the unseeded runner must be clean: the report is the seed's.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import emu_cases
from emu_support import Case, emu_build, record_calls, requires_emulator, run_runner

pytestmark = requires_emulator


@dataclass(frozen=True)
class Site:
    """The line of csrc/`file` on which `text` (found exactly once) ends."""

    file: str
    text: str

    def __str__(self) -> str:
        path = emu_build.CSRC / self.file
        source = path.read_text()
        assert source.count(self.text) == 1, f"{self.file} must hold {self.text!r} exactly once"
        line = source[: source.index(self.text) + len(self.text)].count("\n") + 1
        return f"{path.resolve()}:{line}"


@dataclass(frozen=True)
class SeededBug:
    name: str
    kernel: str  # the emulated kernel source (build.KERNELS) compiled from the seeded copy
    file: str  # the file seeded: that .cu or a header it includes
    old: str
    new: str  # replaces `old`, same number of lines
    runner: str  # "asan" (ASan + UBSan) or "tsan"
    case: Callable[[], Case]  # a small case whose forward runs the kernel
    check: str  # the start of the report
    sites: tuple[Site, ...]  # source lines the report must name
    # A race between blocks: run on one worker (blocks one after the other, so only the emulator's ordering, which
    # has none between blocks, decides), and the report must name threads of two blocks.
    between_blocks: bool = False

    def __repr__(self) -> str:
        return self.name


CONV_FWD = "causal_conv1d/causal_conv1d_fwd.cu"
CONV_COMMON = "causal_conv1d/causal_conv1d_common.cuh"
RMSNORM = "rmsnorm_gated/rmsnorm_gated.cu"
SSD_FWD = "ssd/ssd_chunk_scan_fwd.cu"
FLASH_FWD = "flash/flash_chunk_attention_fwd.cu"
TILES = "common/wmma_tiles.cuh"  # the tile toolkit: seeded in it, compiled into one kernel's file


def conv_case() -> Case:  # 2 channel tiles x 2 time tiles: 4 blocks
    return emu_cases.conv1d_cases(1, 34, 70, 4, torch.bfloat16, 1)[0]


def rmsnorm_case() -> Case:  # groups of 64: one warp per (row, group), 16-byte vector loads
    return emu_cases.rmsnorm_cases(3, 128, 64, torch.bfloat16, 3)[0]


def rmsnorm_block_case() -> Case:  # groups of 2048: one whole block per row, the statistic through shared memory
    return emu_cases.rmsnorm_cases(4, 2048, 2048, torch.bfloat16, 4)[0]


def ssd_case() -> Case:
    return emu_cases.ssd_cases(1, 80, 2, 32, 32, 1, 64, torch.bfloat16, 5)[0]


def flash_case() -> Case:
    return emu_cases.flash_cases(1, 128, 16, 32, 64, True, torch.bfloat16, 6)[0]


GROUP_SUM_BARRIER = "    if (threadIdx.x % 32 == 0) partials[warp] = v;\n    __syncthreads();\n"
TILE_BARRIER = "  load_weight_tile<W>(p, tile.c0, ws, bs);\n  __syncthreads();"
# accumulate_product's A fragment load: chunk_cb's is the SSD forward's first (row-major, ldm kStep + kPad = 40).
A_LOAD = "wmma::load_matrix_sync(fa[i], kARows ? &sA[r0 * lda + kk] : &sA[kk * lda + r0], lda);"
# spill's store: the FLASH forward's first is chunk_states'.
SPILL_STORE = "acc[i][j], ldm,"
# publish_tile's barrier after the spill, after the barriers of the product: TSan must see races past a block's
# first barrier (the SSD forward's first store epilogue is chunk_state's).
EPILOGUE_BARRIER = "  spill<M, N>(acc, tile);\n  __syncthreads();\n"
EPILOGUE_READ = "store(r, c, tile_at<N>(tile, r, c));"

SEEDED_BUGS = [
    SeededBug("shared_write_past_the_end", kernel=CONV_FWD, file=CONV_COMMON,
              old="for (int i = threadIdx.x; i < kTileChannels * len; i += kThreads) {",
              new="for (int i = threadIdx.x; i <= kTileChannels * len; i += kThreads) {",
              runner="asan", case=conv_case, check="ERROR: AddressSanitizer: heap-buffer-overflow",
              sites=(Site(CONV_COMMON, "xs[c * len + j] = v;"), Site(CONV_FWD, "load_input_tile<T, W>(p, tile.b"))),
    SeededBug("missing_barrier", kernel=RMSNORM, file=RMSNORM,
              old=GROUP_SUM_BARRIER, new=GROUP_SUM_BARRIER.replace("    __syncthreads();", ""),
              runner="tsan", case=rmsnorm_block_case, check="WARNING: ThreadSanitizer: data race",
              sites=(Site(RMSNORM, "partials[warp] = v;"), Site(RMSNORM, "total += partials[w];"))),
    SeededBug("missing_barrier_after_the_first", kernel=SSD_FWD, file=TILES,
              old=EPILOGUE_BARRIER, new=EPILOGUE_BARRIER.replace("  __syncthreads();\n", "\n"),
              runner="tsan", case=ssd_case, check="WARNING: ThreadSanitizer: data race",
              sites=(Site(TILES, EPILOGUE_READ),)),
    SeededBug("barrier_in_divergent_branch", kernel=CONV_FWD, file=CONV_FWD,
              old=TILE_BARRIER, new=TILE_BARRIER.replace("__syncthreads", "if (threadIdx.x < 32) __syncthreads"),
              runner="asan", case=conv_case,
              check="subq-emu synccheck: __syncthreads reached by part of the block: 32 of 256 threads",
              sites=(Site(CONV_FWD, TILE_BARRIER),)),
    SeededBug("misaligned_vector_load", kernel=RMSNORM, file=RMSNORM,
              old="*reinterpret_cast<const Pack<T, VEC>*>(ptr);",
              new="*reinterpret_cast<const Pack<T, VEC>*>(ptr + 1);",
              runner="asan", case=rmsnorm_case, check="runtime error: reference binding to misaligned address",
              sites=(Site(RMSNORM, "const Pack<T, VEC> pack = *reinterpret_cast"),)),
    # initcheck knows the op's output, not the store: the report names the kernels that wrote it and their launches.
    SeededBug("last_output_never_written", kernel=CONV_FWD, file=CONV_FWD,
              old="if (d >= p.dim || time >= p.seqlen) continue;",
              new="if (d >= p.dim || time >= p.seqlen - 1) continue;",
              runner="asan", case=conv_case,
              check="subq-emu initcheck: subq_emu::causal_conv1d_fwd output 0 has 34 of 2380 elements non-finite",
              sites=(Site(CONV_FWD, "causal_conv1d_fwd_kernel<T, decltype(w)::value><<<"),)),
    SeededBug("blocks_write_one_element", kernel=RMSNORM, file=RMSNORM,
              old="if (tid == 0) p.rstd[unit] = rstd;", new="if (tid == 0) p.rstd[0] = rstd;",
              runner="tsan", case=rmsnorm_block_case, check="WARNING: ThreadSanitizer: data race",
              sites=(Site(RMSNORM, "if (tid == 0) p.rstd[unit] = rstd;"),), between_blocks=True),
    SeededBug("wmma_ldm_not_16_bytes", kernel=SSD_FWD, file=TILES,
              old=A_LOAD, new=A_LOAD.replace("lda);", "lda + 1);"),
              runner="asan", case=ssd_case,
              check="subq-emu wmma: load_matrix_sync: ldm 41 (82 bytes) is not a multiple of 16 bytes",
              sites=(Site(TILES, A_LOAD),)),
    # Lanes 16..31 pass a row stride one 16-byte step longer: each value is allowed, their disagreement is not.
    SeededBug("wmma_ldm_differs_between_lanes", kernel=FLASH_FWD, file=TILES,
              old=SPILL_STORE, new="acc[i][j], ldm + (threadIdx.x & 16) / 4,",
              runner="asan", case=flash_case, check="subq-emu wmma: store_matrix_sync: lane 16 passes pointer",
              sites=(Site(TILES, SPILL_STORE),)),
]


def blocks_named(report: str) -> set[str]:
    """The blocks of the emulated threads a TSan report names (the runtime names each fiber after its thread)."""
    return set(re.findall(r"block \(\d+,\d+,\d+\)", report))


@pytest.mark.parametrize("bug", SEEDED_BUGS, ids=repr)
def test_seeded_bug_is_reported(bug, tmp_path):
    source = (emu_build.CSRC / bug.file).read_text()
    assert source.count(bug.old) == 1, f"{bug.file} must hold the text to seed exactly once: {bug.old!r}"
    runner = emu_build.build_mutant(bug.name, bug.kernel, {bug.file: source.replace(bug.old, bug.new)}, bug.runner)
    calls = record_calls([bug.case()], backward=False)

    clean_status, clean = run_runner(emu_build.target(bug.runner), calls, tmp_path / "calls.pt", timeout=300)
    assert clean_status == 0, f"the unseeded {bug.runner} runner already reports on this case:\n{clean[-8000:]}"

    # A hang (a barrier that never completes) fails by the timeout.
    status, output = run_runner(runner, calls, tmp_path / "calls.pt", timeout=300,
                                workers=1 if bug.between_blocks else 2)
    assert status != 0, f"the {bug.runner} runner exited 0 with {bug.name} seeded:\n{output[-8000:]}"
    at = output.find(bug.check)
    assert at >= 0, f"no {bug.check!r} with {bug.name} seeded:\n{output[-8000:]}"
    report = output[at:]
    for site in bug.sites:
        assert re.search(re.escape(str(site)) + r"(?!\d)", report), f"the report does not name {site}:\n{report[:8000]}"
    if bug.between_blocks:
        assert len(blocks_named(report)) == 2, f"not a race between two blocks:\n{report[:8000]}"


LAYOUT_PROBE = """
import sys
import pytest, torch
import emu_cases, emu_support

class Env:
    def setenv(self, name, value):
        import os
        os.environ[name] = value

case = emu_cases.monarch_conv_cases(1, 1, 256, torch.float16, 9, bidirectional=False, gates=False)[0]
outs = []
for schedule in emu_support.SCHEDULES[:2]:
    with pytest.raises(AssertionError, match="exceeds budget"):
        emu_support.check(case, Env(), schedule)
    with emu_support.emulated(Env(), schedule):
        outs.append(case.op(**case.inputs))
print("layouts differ:", not torch.equal(outs[0], outs[1]))
"""


def test_code_that_depends_on_the_fragment_layout_fails(tmp_path):
    """WMMA leaves a fragment's per-lane layout unspecified: code that treats elements by position (here the
    tensor-core DFT's 3xTF32 split negating only the first half of each lane's elements) is wrong under the
    emulator's layouts, which differ from the hardware's and between schedules: the emulated case fails its budget
    in both schedules, with different results."""
    file = "monarch_conv/monarch_dft_tensor_core.cuh"
    old = "    const float x = sign * s.hi.x[i];"
    new = "    const float x = (2 * i < s.hi.num_elements ? -sign : sign) * s.hi.x[i];"
    source = (emu_build.CSRC / file).read_text()
    assert source.count(old) == 1
    library = emu_build.build_mutant("fragment_layout", "monarch_conv/monarch_conv_fused_fwd.cu",
                                     {file: source.replace(old, new)}, "plain")
    env = dict(os.environ, SUBQ_EMU_LIBRARY=str(library),
               PYTHONPATH=os.pathsep.join([str(emu_build.ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", LAYOUT_PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    assert "layouts differ: True" in result.stdout, result.stdout
