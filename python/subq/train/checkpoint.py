"""Checkpoints: the model through its ``save_pretrained`` (config.json, model.safetensors) and, beside it,
``trainer.pt`` with what an exact continuation needs: optimizer, scheduler, step, RNG states, history, settings.
One folder per saved step, ``<out>/checkpoints/step_0000500``, written under a temporary name and then renamed,
so an interrupted save never leaves a half-written checkpoint to resume from."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from subq.train.config import TrainConfig
from subq.train.errors import TrainError
from subq.train.loop import TrainState

FOLDER = "checkpoints"
TRAINER_FILE = "trainer.pt"
PREFIX = "step_"


def save(out: Path, state: TrainState, config: TrainConfig) -> Path:
    final = out / FOLDER / f"{PREFIX}{state.step:07d}"
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    state.model.save_pretrained(partial)
    torch.save({
        "config": config.to_dict(),
        "step": state.step,
        "history": state.history,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": {"data": state.data_rng.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }, partial / TRAINER_FILE)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return final


def find(path: Path) -> Path:
    """``path`` when it is a checkpoint, else the latest checkpoint in the output folder ``path``."""
    if (path / TRAINER_FILE).is_file():
        return path
    found = [p for p in (path / FOLDER).glob(f"{PREFIX}*")
             if p.name[len(PREFIX):].isdigit() and (p / TRAINER_FILE).is_file()]
    if not found:
        raise TrainError(f"--resume {path}: not a checkpoint (no {TRAINER_FILE}) nor an output folder holding any")
    return max(found, key=lambda p: int(p.name[len(PREFIX):]))


def read(path: Path) -> dict:
    return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)


def restore(state: TrainState, saved: dict) -> None:
    """Loads ``saved`` (from ``read``) into ``state``, whose model already holds the checkpoint's weights."""
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step, state.history = saved["step"], saved["history"]
    state.data_rng.set_state(saved["rng"]["data"])
    torch.set_rng_state(saved["rng"]["torch"])
    if torch.cuda.is_available() and len(saved["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
