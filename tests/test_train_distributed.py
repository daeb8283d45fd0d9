"""python -m subq.train across processes (gloo, on the CPU): W processes x batch b train exactly as one process x
batch W·b (DDP and FSDP2, causal and masked), checkpoints are written once in the one-process format and resume at
any world size, --cp splits the sequences, and bad layouts are one-line errors.

One torchrun launch checks the real command line end to end; the rest runs the trainer's ``main`` several times
inside one spawned process group per world size (``dist_support.run_ranks``), as each process start costs seconds.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_support import run_ranks
from subq.models import FlashLM, Mamba2LM
from subq.train import checkpoint
from subq.train.cli import main

# The tiny mamba2 at d_model 32 on 64-token blocks: a 4-step run takes about a second.
TINY = ["--override", "d_model=32", "--override", "n_layer=2", "--seq-len", "64", "--corpus-chars", "20000",
        "--eval-batches", "2", "--warmup", "1", "--lr", "1e-2", "--no-progress"]
RUN = ["--steps", "4", "--eval-every", "2", "--save-every", "2", *TINY]
MASKED = ["--model", "m2-bert", "--override", "d_model=32", "--override", "dropout=0.0", "--seq-len", "64",
          "--corpus-chars", "20000", "--eval-batches", "2", "--warmup", "1", "--lr", "1e-2", "--no-progress",
          "--steps", "2", "--eval-every", "2", "--save-every", "2"]
# FLASH (tiny: chunk 64): 128-token blocks, so that --cp 2 cuts each into two whole chunks.
FLASH = ["--model", "flash", "--seq-len", "128", "--corpus-chars", "20000", "--eval-batches", "1", "--warmup", "1",
         "--lr", "1e-2", "--no-progress", "--steps", "2", "--eval-every", "2", "--save-every", "2"]
RTOL = 1e-5  # float32: the sums over the batch and the ranks are taken in another order


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def history(out: Path) -> dict:
    return json.loads((Path(out) / "history.json").read_text())


def assert_same_curve(got: dict, want: dict, rtol: float = RTOL) -> None:
    """The same steps, and the same train loss, gradient norm and val loss at each, to ``rtol``."""
    assert [r["step"] for r in got["train"]] == [r["step"] for r in want["train"]]
    assert [r["step"] for r in got["val"]] == [r["step"] for r in want["val"]]
    for a, b in zip(got["train"], want["train"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=rtol) and a["lr"] == b["lr"], (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=10 * rtol), (a, b)
    for a, b in zip(got["val"], want["val"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=rtol), (a, b)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """One process, global batch 4, checkpoints at steps 2 and 4: the reference of every test here."""
    root = tmp_path_factory.mktemp("single")
    assert cli("--batch-size", 4, "--out", root / "mamba2", *RUN) == 0
    assert cli("--batch-size", 4, "--out", root / "masked", *MASKED) == 0
    if _has_cp(FlashLM):
        assert cli("--batch-size", 4, "--out", root / "flash", *FLASH) == 0
    return root


def test_torchrun_two_processes_equal_one_and_save_once(single, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "subq.train",
                           "--batch-size", "4", "--out", str(out), *RUN], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done: mamba2") == 1 and "2 processes (DDP, data-parallel 2)" in done.stdout
    assert_same_curve(history(out), history(single / "mamba2"))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "history.json", "loss.png"]
    for step in (2, 4):
        folder = out / "checkpoints" / f"step_{step:07d}"
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "trainer.pt"]
    # The one-process format: it loads and resumes in one process, where it continues as the one-process run did.
    saved, model = checkpoint.load(out / "checkpoints" / "step_0000004")
    assert type(model) is Mamba2LM and all(isinstance(k, int) for k in saved["optimizer"]["state"])
    resumed = tmp_path / "resumed_in_one"
    assert cli("--resume", out / "checkpoints" / "step_0000002", "--out", resumed, "--no-progress") == 0
    assert_same_curve(history(resumed), history(single / "mamba2"))


def _two_ranks(rank: int, world: int, single: str, out: str) -> dict:
    """Several runs in one process group of 2: FSDP2, resumes of a one-process checkpoint (DDP and FSDP2), the
    masked objective, context parallelism. Returns each run's exit status."""
    single, out = Path(single), Path(out)
    step2 = single / "mamba2" / "checkpoints" / "step_0000002"
    status = {
        "fsdp": cli("--batch-size", 4, "--fsdp", "--out", out / "fsdp", *RUN),
        "resume_ddp": cli("--resume", step2, "--out", out / "resume_ddp", "--no-progress"),
        "resume_fsdp": cli("--resume", step2, "--fsdp", "--out", out / "resume_fsdp", "--no-progress"),
        "masked": cli("--batch-size", 4, "--out", out / "masked", *MASKED),
    }
    if _has_cp(Mamba2LM):
        status["cp"] = cli("--batch-size", 4, "--cp", 2, "--out", out / "cp", *RUN)
    if _has_cp(FlashLM):
        status["cp_flash"] = cli("--batch-size", 4, "--cp", 2, "--out", out / "cp_flash", *FLASH)
    return status


def _has_cp(model_class) -> bool:
    return "cp_group" in inspect.signature(model_class.__init__).parameters


def test_two_processes_fsdp_resume_masked_and_cp(single, tmp_path):
    statuses = run_ranks(_two_ranks, 2, str(single), str(tmp_path))
    assert all(s == statuses[0] for s in statuses) and set(statuses[0].values()) == {0}, statuses
    reference = history(single / "mamba2")
    assert_same_curve(history(tmp_path / "fsdp"), reference)  # FSDP2 from scratch
    assert_same_curve(history(tmp_path / "resume_ddp"), reference)  # 1 -> 2 processes
    assert_same_curve(history(tmp_path / "resume_fsdp"), reference)  # 1 -> 2, sharded
    assert_same_curve(history(tmp_path / "masked"), history(single / "masked"))  # masks drawn as one process does
    # FSDP2's checkpoint is the one-process format too: it resumes in one process and continues alike.
    saved, model = checkpoint.load(tmp_path / "fsdp" / "checkpoints" / "step_0000002")
    assert type(model) is Mamba2LM and all(isinstance(k, int) for k in saved["optimizer"]["state"])
    assert cli("--resume", tmp_path / "fsdp" / "checkpoints" / "step_0000002", "--out", tmp_path / "fsdp_in_one",
               "--no-progress") == 0
    assert_same_curve(history(tmp_path / "fsdp_in_one"), reference)
    if not _has_cp(Mamba2LM):
        pytest.skip("Mamba2LM takes no cp_group yet: --cp 2 untested")
    assert_same_curve(history(tmp_path / "cp"), reference)  # --cp 2 equals --cp 1
    if _has_cp(FlashLM):
        assert_same_curve(history(tmp_path / "cp_flash"), history(single / "flash"))


# 8 val batches of 4 ask for 32 blocks where the val split has 30: the last batch has 2 rows, and 2 of 4 ranks none.
SHORT_VAL = ["--eval-batches", "8", "--no-progress"]


def _four_ranks(rank: int, world: int, single: str, out: str) -> dict:
    single, out = Path(single), Path(out)
    step2 = single / "mamba2" / "checkpoints" / "step_0000002"
    status = {"resume_ddp": cli("--resume", step2, "--out", out / "resume4", *SHORT_VAL)}
    if _has_cp(Mamba2LM):
        status["cp"] = cli("--resume", step2, "--cp", 2, "--out", out / "cp4", *SHORT_VAL)
    return status


def test_four_processes_resume_a_checkpoint(single, tmp_path):
    """2 -> 4 processes (one row each), and a val batch that leaves ranks without a row."""
    step2 = single / "mamba2" / "checkpoints" / "step_0000002"
    assert cli("--resume", step2, "--out", tmp_path / "resume1", *SHORT_VAL) == 0
    reference = history(tmp_path / "resume1")
    statuses = run_ranks(_four_ranks, 4, str(single), str(tmp_path))
    assert set(statuses[0].values()) == {0}, statuses
    assert_same_curve(history(tmp_path / "resume4"), reference)
    if "cp" in statuses[0]:
        assert_same_curve(history(tmp_path / "cp4"), reference)  # dp 2 x cp 2


@pytest.mark.parametrize("world, argv, message", [
    (2, ["--batch-size", "3"], "--batch-size 3 is the global batch: it must divide by the 2 data-parallel ranks"),
    (4, ["--batch-size", "5", "--cp", "2"], "--batch-size 5 is the global batch: it must divide by the 2 data-"),
    (2, ["--model", "mom", "--cp", "2"], "--cp 2: context parallelism is implemented for flash and mamba2, not mom"),
    (2, ["--cp", "3"], "--cp 3 must divide the number of processes, 2"),
    (2, ["--cp", "0"], "--cp must be positive, got 0"),
    (2, ["--cp", "2", "--seq-len", "63"], "--seq-len 63 must split into --cp 2 equal shards"),
    (2, ["--model", "flash", "--cp", "2", "--seq-len", "64"],
     "--seq-len 64 / --cp 2 = 32 tokens per shard must be a multiple of flash's chunk_size 64"),
])
def test_bad_layouts(tmp_path, capsys, monkeypatch, world, argv, message):
    """Refused before any process group is joined: the same on every rank, said by rank 0 only."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        assert cli("--out", tmp_path / "run", "--steps", 2, "--corpus-chars", 5000, "--no-progress", *argv) == 2
        err = capsys.readouterr().err
        if rank == 0:
            assert err.startswith("subq.train: error: ") and message in err and err.count("\n") == 1, err
        else:
            assert err == ""


def test_shards_of_a_batch():
    """Rows split over the data-parallel ranks (the first ones take the remainder), then each row into the CP
    group's contiguous shards."""
    from subq.train.parallel import Layout

    batch = torch.arange(3 * 8).view(3, 8)
    assert [Layout(world=4, rank=r).shard(batch).shape[0] for r in range(4)] == [1, 1, 1, 0]
    cp = [Layout(world=4, rank=r, cp=2).shard(batch) for r in range(4)]
    assert torch.equal(torch.cat(cp[:2], 1), batch[:2]) and torch.equal(torch.cat(cp[2:], 1), batch[2:])
