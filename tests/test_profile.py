"""subq-profile: FLOP formulas against brute-force counts, the CLI end to end on the CPU, --compare, bad arguments."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from subq.profile import cli
from subq.profile.ops import OPS
from subq.profile.ops.base import PASSES
from subq.profile.runner import make_call
from subq.reference import ssd_ref

ROOT = Path(__file__).resolve().parents[1]
MATMUL_EVENTS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}
MONARCH_SIZES = [{"batch": 2, "seqlen": 24, "n": 64, "nblocks": 4}, {"batch": 1, "seqlen": 5, "n": 48, "nblocks": 16}]
SSD_SIZES = [
    {"batch": 2, "seqlen": 128, "nheads": 4, "headdim": 8, "dstate": 16, "ngroups": 2, "chunk_size": 64},
    {"batch": 1, "seqlen": 100, "nheads": 3, "headdim": 5, "dstate": 7, "ngroups": 1, "chunk_size": 64},  # padded
]


def profiled_matmul_flops(fn) -> int:
    """Matmul FLOPs of every mm/bmm the dispatcher runs, C++ calls inside subq's ops included."""
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, acc_events=True) as prof:
        fn()
    return sum(e.flops or 0 for e in prof.events() if e.name in MATMUL_EVENTS)


def counted_flops(fn) -> int:
    """Matmul FLOPs seen at the Python dispatch level (torch's FlopCounterMode)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


# ---- matmul FLOPs: what each timed callable executes --------------------------------------------------------------


@pytest.mark.parametrize("op", ["blockdiag_matmul", "monarch_matmul"])
@pytest.mark.parametrize("size", MONARCH_SIZES, ids=["tile", "small"])
@pytest.mark.parametrize("pass_name", PASSES)
def test_monarch_matmul_flops_match_the_executed_products(op, size, pass_name):
    spec = OPS[op]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    for impl in spec.impls:
        call = make_call(impl, inputs, size, pass_name)
        assert profiled_matmul_flops(call) == impl.matmul_flops(size, pass_name), impl.name


@pytest.mark.parametrize("size", SSD_SIZES, ids=["groups", "padded"])
@pytest.mark.parametrize("pass_name", PASSES)
def test_ssd_matmul_flops_match_the_executed_products(size, pass_name):
    spec = OPS["ssd_chunk_scan"]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    for name in ("subq", "ssd_chunked_ref"):
        impl = spec.impl(name)
        call = make_call(impl, inputs, size, pass_name)
        assert profiled_matmul_flops(call) == impl.matmul_flops(size, pass_name), name
    ref = spec.impl("ssd_chunked_ref")
    assert counted_flops(make_call(ref, inputs, size, pass_name)) == ref.matmul_flops(size, pass_name)


@pytest.mark.parametrize("pass_name", PASSES)
def test_flash_reference_matmul_flops_match_the_executed_products(pass_name):
    size = {"batch": 2, "seqlen": 100, "qk_dim": 8, "value_dim": 16, "chunk_size": 64}  # padded last chunk
    spec = OPS["flash_chunk_attention"]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    ref = spec.impl("flash_chunked_ref")
    assert counted_flops(make_call(ref, inputs, size, pass_name)) == ref.matmul_flops(size, pass_name)


# monarch_conv (FFT estimate), causal_conv1d and rmsnorm_gated (elementwise counts) execute no matrix product that
# a counter could check exactly: their formulas are documented estimates, not tested against a count.


@pytest.mark.parametrize("size", SSD_SIZES, ids=["groups", "padded"])
def test_attention_matmul_flops_are_half_the_math_backends_square(size):
    spec = OPS["ssd_chunk_scan"]
    inputs = spec.make_inputs(size, torch.float32, torch.device("cpu"))
    impl = spec.impl("sdpa_causal")
    with sdpa_kernel(SDPBackend.MATH):
        square = counted_flops(make_call(impl, inputs, size, "fwd"))
    assert impl.matmul_flops(size, "fwd") * 2 == square
    assert impl.matmul_flops(size, "fwd+bwd") == 3.5 * impl.matmul_flops(size, "fwd")


# ---- useful FLOPs: the math, counted one scalar operation at a time -----------------------------------------------


def counted_recurrence(x, dt, A, B, C):
    """The SSD recurrence (batch 1, one group) in Python scalars, counting each multiply and add of the state update
    and the output. The decay exp(dt A) is one product and one exp per (t, h), not per state entry: not counted."""
    _, L, H, P = x.shape
    N = B.shape[-1]
    x, dt, A, B, C = (t.tolist() for t in (x[0], dt[0], A, B[0, :, 0], C[0, :, 0]))
    y = [[[0.0] * P for _ in range(H)] for _ in range(L)]
    flops = 0
    for h in range(H):
        state = [[0.0] * N for _ in range(P)]
        for t in range(L):
            a = math.exp(dt[t][h] * A[h])
            for p in range(P):
                u = dt[t][h] * x[t][h][p]
                flops += 1
                acc = 0.0
                for n in range(N):
                    state[p][n] = a * state[p][n] + u * B[t][n]
                    acc += state[p][n] * C[t][n]
                    flops += 3 + 2
                y[t][h][p] = acc
    return torch.tensor(y, dtype=torch.float64)[None], flops


def test_ssd_useful_flops_count_the_recurrence():
    size = {"batch": 1, "seqlen": 7, "nheads": 2, "headdim": 3, "dstate": 4, "ngroups": 1, "chunk_size": 64}
    spec = OPS["ssd_chunk_scan"]
    inputs = {k: v.detach().double() for k, v in spec.make_inputs(size, torch.float64, torch.device("cpu")).items()}
    y, flops = counted_recurrence(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
    want, _ = ssd_ref(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
    torch.testing.assert_close(y, want)  # the counter runs the real math
    for name in ("subq", "ssd_chunked_ref"):
        assert spec.impl(name).useful_flops(size, "fwd") == flops
        assert spec.impl(name).useful_flops(size, "fwd+bwd") == 3 * flops


def test_attention_useful_flops_count_the_causal_pairs():
    size = {"batch": 2, "seqlen": 9, "nheads": 3, "headdim": 5, "dstate": 4, "ngroups": 1, "chunk_size": 64}
    pairs = int(torch.ones(size["seqlen"], size["seqlen"]).tril().sum())  # (query, key) with key <= query
    per_pair = 2 * size["headdim"] + 2 * size["headdim"]  # q . k and p * v
    impl = OPS["ssd_chunk_scan"].impl("sdpa_causal")
    assert impl.useful_flops(size, "fwd") == size["batch"] * size["nheads"] * pairs * per_pair


@pytest.mark.parametrize("op", ["blockdiag_matmul", "monarch_matmul"])
def test_monarch_useful_flops_count_the_factor_nonzeros(op):
    size = MONARCH_SIZES[0]
    spec = OPS[op]
    inputs = spec.make_inputs(size, torch.float64, torch.device("cpu"))
    factors = [inputs["w1"]] + ([inputs["w2"]] if "w2" in inputs else [])
    nonzeros = sum(int(torch.block_diag(*w.detach()).count_nonzero()) for w in factors)
    tokens = size["batch"] * size["seqlen"]
    assert spec.subq.useful_flops(size, "fwd") == 2 * tokens * nonzeros
    assert spec.impl("dense").useful_flops(size, "fwd") == 2 * tokens * int(inputs["dense_w"].count_nonzero())


def test_min_bytes_are_the_inputs_and_output_once():
    size = MONARCH_SIZES[0]
    spec, e = OPS["monarch_matmul"], 2
    tokens, n, nb = size["batch"] * size["seqlen"], size["n"], size["nblocks"]
    inputs, output = (tokens * n + 2 * nb * (n // nb) ** 2) * e, tokens * n * e
    assert spec.min_bytes(spec.subq, size, torch.bfloat16, "fwd") == inputs + output
    assert spec.min_bytes(spec.subq, size, torch.bfloat16, "fwd+bwd") == 3 * inputs + 2 * output


# ---- the CLI end to end on the CPU ---------------------------------------------------------------------------------

TINY = ["--quick", "--device", "cpu", "--seqlen", "64", "--grid", "n=64", "nblocks=4", "headdim=16", "dstate=16",
        "--repeats", "2", "--no-progress"]
ROW_KEYS = {"op", "size_label", "pass", "input_sets", "impls", "ms", "tflops", "pct_peak", "useful_tflops", "gbs",
            "pct_bandwidth", "matmul_flops", "useful_flops", "min_bytes", "intensity", "speedup_subq_vs", "errors",
            "check_subq_vs"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    assert cli.main([*TINY, "--out", str(out)]) == 0
    return out


def test_cli_writes_json_in_the_bench_results_schema(tiny_run):
    payload = json.loads((tiny_run / "profile_cpu.json").read_text())
    bench = json.loads((ROOT / "bench" / "results" / "monarch_h100.json").read_text())
    assert payload.keys() == bench.keys()
    assert {"ms", "tflops", "pct_peak", "speedup_subq_vs", "errors", "pass"} <= bench["rows"][0].keys()
    assert payload["peak"]["matmul_tflops"] > 0 and payload["peak"]["copy_gbs"] > 0
    assert payload["env"]["timer"] == "perf_counter"
    # quick grids with the overrides: one size per op (seqlen=64; monarch nblocks=4); two passes each
    assert len(payload["rows"]) == len(OPS) * 2
    for row in payload["rows"]:
        assert ROW_KEYS <= row.keys()
        assert row["errors"] == {}
        assert all(row["ms"][impl] > 0 for impl in row["impls"])
        assert row["speedup_subq_vs"].keys() == set(row["impls"][1:])
        assert row["seqlen"] == 64
    assert {row["op"] for row in payload["rows"]} == set(OPS)


def test_cli_writes_csv_and_png(tiny_run):
    payload = json.loads((tiny_run / "profile_cpu.json").read_text())
    with (tiny_run / "profile_cpu.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == sum(len(row["impls"]) for row in payload["rows"])
    assert all(float(line["ms"]) > 0 for line in lines)
    pytest.importorskip("matplotlib")
    png = (tiny_run / "profile_cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_quick_default_grid_fwd_only(tmp_path, capsys):
    assert cli.main(["--quick", "--device", "cpu", "--fwd", "--repeats", "1", "--no-progress",
                     "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "profile_cpu.json").read_text())
    assert {row["pass"] for row in payload["rows"]} == {"fwd"}
    assert len(payload["rows"]) == sum(len(spec.sizes(True, {})) for spec in OPS.values())
    table = capsys.readouterr().out
    assert "TFLOP/s" in table and "%peak" in table and "speedup" in table


NEW_OPS = ["monarch_conv", "flash_chunk_attention", "causal_conv1d", "rmsnorm_gated"]


def test_list_names_every_op(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NEW_OPS)


def test_quick_run_of_the_new_ops_writes_rows(tmp_path):
    argv = ["--quick", "--device", "cpu", "--ops", *NEW_OPS, "--seqlen", "256", "--repeats", "1", "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "profile_cpu.json").read_text())["rows"]
    for name in NEW_OPS:
        mine = [row for row in rows if row["op"] == name]
        assert {row["pass"] for row in mine} == set(PASSES), name
        for row in mine:
            assert row["errors"] == {}, name
            assert all(row["ms"][impl] > 0 for impl in row["impls"]), name
            assert row["check_subq_vs"]["max_rel_err"] < 1e-3, name
            assert row["min_bytes"]["subq"] > 0 and row["useful_flops"]["subq"] > 0, name


def test_without_matplotlib_everything_but_the_plot_is_written(tmp_path, capsys, monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(cli.roofline, "plot", missing)
    argv = ["--quick", "--device", "cpu", "--ops", "blockdiag_matmul", "--fwd", "--repeats", "1", "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "subq-profile: no roofline plot: matplotlib is not installed (pip install matplotlib)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile_cpu.csv", "profile_cpu.json"]


def test_compare_prints_the_ratio_per_row(tiny_run, tmp_path, capsys):
    a = tiny_run / "profile_cpu.json"
    payload = json.loads(a.read_text())
    for row in payload["rows"]:
        row["ms"] = {impl: 2 * ms for impl, ms in row["ms"].items()}
    b = tmp_path / "slower.json"
    b.write_text(json.dumps(payload))
    capsys.readouterr()
    assert cli.main(["--compare", str(a), str(b)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.rstrip().endswith(" 2")]
    assert len(lines) == sum(len(row["impls"]) for row in payload["rows"])


def test_compare_reads_the_bench_results(capsys):
    bench = ROOT / "bench" / "results" / "monarch_h100.json"
    assert cli.main(["--compare", str(bench), str(bench)]) == 0
    out = capsys.readouterr().out
    assert out.count(" 1\n") == 3 * len(json.loads(bench.read_text())["rows"])


# ---- bad arguments: one line, exit status 2, no traceback ----------------------------------------------------------


def assert_one_line_error(capsys, argv, needle):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("subq-profile: error:") and needle in err, err


@pytest.mark.parametrize("argv, needle", [
    (["--ops", "flash_attention"], "unknown op 'flash_attention'"),
    (["--dtype", "fp8", "--device", "cpu"], "--dtype 'fp8'"),
    (["--device", "tpu"], "--device"),
    (["--device", "cpu", "--seqlen", "abc"], "invalid int value"),
    (["--device", "cpu", "--ops", "monarch_matmul", "--grid", "n=100", "nblocks=16"], "not a multiple"),
    (["--device", "cpu", "--grid", "n"], "AXIS=V"),
    (["--device", "cpu", "--ops", "monarch_matmul", "--grid", "dstate=16"], "no selected op has that axis"),
    (["--device", "cpu", "--ops", "ssd_chunk_scan", "--grid", "chunk_size=32"], "chunk_size"),
    (["--compare", "/nonexistent/a.json", "/nonexistent/b.json"], "cannot read"),
])
def test_bad_arguments(capsys, argv, needle):
    assert_one_line_error(capsys, argv, needle)


def test_size_that_does_not_fit(capsys):
    argv = ["--device", "cpu", "--ops", "monarch_matmul", "--seqlen", "100000000", "--grid", "n=65536", "nblocks=4"]
    assert_one_line_error(capsys, argv, "needs about")


def test_memory_is_estimated_before_allocating(capsys, monkeypatch):
    monkeypatch.setattr(cli, "free_bytes", lambda device: 2**20)
    assert_one_line_error(capsys, ["--quick", "--device", "cpu", "--ops", "ssd_chunk_scan"], "choose smaller sizes")


def test_dtype_the_device_cannot_run(capsys, monkeypatch):
    import subq.profile.device as device

    real = device._probe

    def no_half(dtype, dev):
        if dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        real(dtype, dev)

    monkeypatch.setattr(device, "_probe", no_half)
    assert_one_line_error(capsys, ["--device", "cpu", "--dtype", "fp16"], "cannot run torch.float16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_requested_without_a_gpu(capsys):
    assert_one_line_error(capsys, ["--device", "cuda"], "no CUDA device")


def test_module_entry_point_exits_with_one_line():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"),
                                                                     os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "subq.profile", "--ops", "nope"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"subq-profile: error: unknown op 'nope'; known ops: {', '.join(OPS)}"]
