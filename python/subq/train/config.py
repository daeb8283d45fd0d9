"""The settings of a training run: saved in every checkpoint, so ``--resume`` continues with them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from subq.train.errors import TrainError

# What a resumed run may change: how long it trains (the cosine then stretches to the new end) and how often it
# reports. The rest (model, data, optimizer) comes from the checkpoint, which keeps the continuation exact.
ADJUSTABLE_ON_RESUME = ("steps", "eval_every", "eval_batches", "save_every")


@dataclass
class TrainConfig:
    model: str = "mamba2"
    preset: str = "tiny"
    override: list[str] = field(default_factory=list)
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    seed: int = 0
    corpus_chars: int = 1_000_000

    def validate(self) -> TrainConfig:
        positive = ["steps", "batch_size", "seq_len", "lr", "eval_every", "eval_batches", "save_every",
                    "corpus_chars"]
        for name in positive:
            if not getattr(self, name) > 0:  # also false for NaN
                raise TrainError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise TrainError(f"{flag(name)} must not be negative, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise TrainError(f"{flag(name)} must be a finite number, got {getattr(self, name)}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def merge(saved: dict | None, given: dict) -> TrainConfig:
    """The defaults, replaced by a checkpoint's settings (``saved``), replaced by those given on the command line
    (``given``, None where not given)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = {name: value for name, value in (saved or {}).items() if name in names}
    for name, value in given.items():
        if name not in names or value is None:
            continue
        if saved is not None and name not in ADJUSTABLE_ON_RESUME and value != saved.get(name):
            raise TrainError(f"{flag(name)} {value!r} differs from the checkpoint's {saved.get(name)!r}: a resumed "
                             f"run can change only {', '.join(map(flag, ADJUSTABLE_ON_RESUME))}")
        settings[name] = value
    return TrainConfig(**settings).validate()
