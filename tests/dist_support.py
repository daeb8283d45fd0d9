"""Run a function in W processes joined by a gloo process group, on the CPU, and collect what each returns.

``run_ranks(fn, world_size, *args)`` spawns W fresh processes (``torch.multiprocessing``'s spawn context), calls
``fn(rank, world_size, *args)`` in each after ``init_process_group("gloo")`` and returns the W results (anything
``torch.save`` takes). A failure on any rank raises here with that rank's traceback; a hang fails after ``timeout``.
``fn`` must be a module-level function of an importable module (a test module is). Do many checks per spawn: each
process start imports torch and subq (seconds on 2 cores).
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, out_dir, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # W processes share 2 cores
    result_path = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": result}, result_path)
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent with its traceback
        torch.save({"error": traceback.format_exc()}, result_path)


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, out_dir, fn, args))
                 for r in range(world_size)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout)
        hung = [r for r, proc in enumerate(procs) if proc.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        results = []
        for r in range(world_size):
            path = Path(out_dir) / f"rank{r}.pt"
            if not path.exists():
                why = "hung" if r in hung else f"exited with status {procs[r].exitcode}"
                raise AssertionError(f"rank {r} of {world_size} {why} without a result")
            got = torch.load(path, weights_only=False)
            if "error" in got:
                raise AssertionError(f"rank {r} of {world_size} failed:\n{got['error']}")
            results.append(got["ok"])
        return results
