"""Checkpoints: the model through its ``save_pretrained`` (config.json, model.safetensors) and, beside it,
``trainer.pt`` with what an exact continuation needs: optimizer, scheduler, step, RNG states, history, settings.
One folder per saved step, ``<out>/checkpoints/step_0000500``, written under a temporary name and then renamed,
so an interrupted save never leaves a half-written checkpoint to resume from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from subq.models._common import CONFIG_FILE, WEIGHTS_FILE
from subq.train import parallel
from subq.train.config import TrainConfig
from subq.train.errors import TrainError
from subq.train.loop import TrainState
from subq.train.parallel import Layout
from subq.train.registry import MODELS

FOLDER = "checkpoints"
TRAINER_FILE = "trainer.pt"
PREFIX = "step_"


TRAINER_KEYS = ("config", "step", "history", "optimizer", "scheduler", "rng")


class DamagedCheckpoint(Exception):
    """A checkpoint file that does not load: the message names the file and why."""


def save(out: Path, state: TrainState, config: TrainConfig, model: nn.Module | None = None,
         optimizer_state: dict | None = None) -> Path:
    """Write the checkpoint of ``state.step``. Never over another one: ``cli`` refuses, before training, a run whose
    steps would reach a checkpoint it did not make, and this refuses again rather than lose one. ``model`` and
    ``optimizer_state`` (default: the state's) are the one-process model and optimizer state dict a run across
    processes gathered, so every checkpoint has the one format, whatever the world size."""
    final = out / FOLDER / f"{PREFIX}{state.step:07d}"
    if final.exists():
        raise TrainError(f"{final} already exists: not overwriting a checkpoint this run did not make")
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (model or state.model).save_pretrained(partial)
    torch.save({
        "config": config.to_dict(),
        "step": state.step,
        "history": state.history,
        "optimizer": state.optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "scheduler": state.scheduler.state_dict(),
        "rng": {"data": state.data_rng.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }, partial / TRAINER_FILE)
    partial.rename(final)
    return final


def step_of(path: Path) -> int | None:
    digits = path.name[len(PREFIX):]
    return int(digits) if path.name.startswith(PREFIX) and digits.isdigit() else None


def listed(out: Path) -> list[Path]:
    """The checkpoint folders of output folder ``out``, newest first (damaged ones too; not the .partial ones)."""
    found = [p for p in (out / FOLDER).glob(f"{PREFIX}*") if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def find(path: Path) -> Path:
    """``path`` when it is a checkpoint, else the latest checkpoint in the output folder ``path``, whole or not
    (``load`` says what is wrong with a damaged one, rather than an older one being resumed and its newer one
    overwritten)."""
    if (path / TRAINER_FILE).is_file() or (step_of(path) is not None and path.parent.name == FOLDER):
        return path
    found = listed(path)
    if not found:
        raise TrainError(f"--resume {path}: not a checkpoint (no {TRAINER_FILE}) nor an output folder holding any")
    return found[0]


def read(path: Path) -> dict:
    """The trainer state of checkpoint ``path``; DamagedCheckpoint when trainer.pt is missing or does not load."""
    file = path / TRAINER_FILE
    if not file.is_file():
        raise DamagedCheckpoint(f"{TRAINER_FILE} is missing")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, empty or garbage: pickle, zip and torch each raise their own
        raise DamagedCheckpoint(f"{TRAINER_FILE} does not load ({_first_line(err)})") from None
    if not isinstance(saved, dict) or any(key not in saved for key in TRAINER_KEYS):
        raise DamagedCheckpoint(f"{TRAINER_FILE} lacks the trainer state ({', '.join(TRAINER_KEYS)})")
    return saved


def read_model(path: Path, model_class: type[nn.Module]) -> nn.Module:
    """The model of checkpoint ``path``; DamagedCheckpoint naming config.json or model.safetensors when one does
    not load or they do not fit ``model_class``."""
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file():
        raise DamagedCheckpoint(f"{CONFIG_FILE} is missing")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DamagedCheckpoint(f"{CONFIG_FILE} is not valid JSON ({_first_line(err)})") from None
    name = config.get("model") if isinstance(config, dict) else None
    if name != model_class.__name__:
        raise DamagedCheckpoint(f"{CONFIG_FILE} names the model {name!r}, but trainer.pt trained a "
                                f"{model_class.__name__}")
    if not weights_file.is_file():
        raise DamagedCheckpoint(f"{WEIGHTS_FILE} is missing")
    try:
        return model_class.from_pretrained(path)
    except (ValueError, TypeError) as err:
        raise DamagedCheckpoint(f"{CONFIG_FILE} does not build a {model_class.__name__} "
                                f"({_first_line(err)})") from None
    except Exception as err:  # safetensors' own error for a truncated file, RuntimeError for missing tensors
        raise DamagedCheckpoint(f"{WEIGHTS_FILE} does not load into the model of {CONFIG_FILE} "
                                f"({_first_line(err)})") from None


def load(path: Path) -> tuple[dict, nn.Module]:
    """(trainer state, model on the CPU) of checkpoint ``path``. A damaged checkpoint is a TrainError naming the
    file and the newest intact checkpoint beside it."""
    try:
        return _load(path)
    except DamagedCheckpoint as err:
        newer_first = [p for p in listed(path.parent.parent) if p != path] if path.parent.name == FOLDER else []
        intact = next((p for p in newer_first if _is_intact(p)), None)
        offer = (f"; the newest intact checkpoint there is {intact} (--resume {intact})" if intact
                 else "; no other checkpoint beside it is intact")
        raise TrainError(f"--resume {path}: damaged checkpoint: {err}{offer}") from None


def _load(path: Path) -> tuple[dict, nn.Module]:
    saved = read(path)
    name = saved["config"].get("model") if isinstance(saved["config"], dict) else None
    if name not in MODELS:
        raise DamagedCheckpoint(f"{TRAINER_FILE} names no known model (got {name!r})")
    return saved, read_model(path, MODELS[name].model_class)


def _is_intact(path: Path) -> bool:
    try:
        _load(path)
    except DamagedCheckpoint:
        return False
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def restore(state: TrainState, saved: dict, layout: Layout | None = None) -> None:
    """Loads ``saved`` (from ``read``) into ``state``, whose model already holds the checkpoint's weights (and, under
    FSDP2, is sharded: ``layout`` says so)."""
    parallel.load_optimizer_state(state.model, state.optimizer, saved["optimizer"], layout or Layout())
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step, state.history = saved["step"], saved["history"]
    state.data_rng.set_state(saved["rng"]["data"])
    torch.set_rng_state(saved["rng"]["torch"])
    if torch.cuda.is_available() and len(saved["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
