"""The training loop: AdamW with linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA,
validation loss and perplexity every ``eval_every`` steps, a checkpoint every ``save_every`` steps and at the end."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from subq.profile.progress import Progress
from subq.train.config import TrainConfig
from subq.train.errors import TrainError
from subq.train.objectives import IGNORE_INDEX, Objective
from subq.train.registry import ModelEntry

BETAS = (0.9, 0.95)
MIN_LR_RATIO = 0.1  # the cosine ends at a tenth of the peak learning rate rather than at zero


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """The peak learning rate's multiplier for update ``step`` (from 0): linear warm-up, then cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule. Only matrices are decayed: pulling norm gains, biases or Mamba-2's A_log, dt_bias
    and D (marked ``_no_weight_decay``) toward zero changes what they mean rather than regularising."""
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim < 2 or getattr(param, "_no_weight_decay", False) else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=BETAS)
    schedule = functools.partial(lr_factor, warmup=config.warmup, steps=config.steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@dataclass
class TrainState:
    """Everything a step changes; a checkpoint saves it all, so a resumed run continues exactly."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    data_rng: torch.Generator  # draws the training batches and their masks
    step: int = 0
    history: dict[str, list[dict]] = field(default_factory=lambda: {"train": [], "val": []})


@dataclass
class Run:
    config: TrainConfig
    entry: ModelEntry
    objective: Objective
    train_blocks: torch.Tensor
    val_blocks: torch.Tensor
    device: torch.device

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def loss(self, model: nn.Module, blocks: torch.Tensor, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(summed cross-entropy over the labelled positions, their count, the model's auxiliary loss or None)."""
        inputs, labels = self.objective.make_batch(blocks, generator)
        labels = labels.to(self.device)
        with self.autocast():
            logits, aux = self.entry.outputs(model(inputs.to(self.device)))
        total = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum")
        return total, (labels != IGNORE_INDEX).sum(), aux


def train_step(run: Run, state: TrainState) -> dict:
    config, model, optimizer = run.config, state.model, state.optimizer
    model.train()
    rows = torch.randint(len(run.train_blocks), (config.batch_size,), generator=state.data_rng)
    total, count, aux = run.loss(model, run.train_blocks[rows], state.data_rng)
    loss = total / count
    optimizer.zero_grad(set_to_none=True)
    (loss if aux is None else loss + aux).backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
    record = {"step": state.step + 1, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
              "grad_norm": grad_norm.item()}
    if not math.isfinite(record["loss"]):
        raise TrainError(f"the training loss became {record['loss']} at step {record['step']}: lower --lr")
    optimizer.step()
    state.scheduler.step()
    state.step += 1
    return record if aux is None else {**record, "aux_loss": aux.item()}


@torch.no_grad()
def evaluate(run: Run, model: nn.Module) -> float:
    """Mean cross-entropy (nats per predicted token) over the first ``eval_batches`` batches of the val split."""
    model.eval()
    generator = torch.Generator().manual_seed(run.config.seed)  # the same masks at every evaluation
    total = count = 0
    for blocks in run.val_blocks[: run.config.eval_batches * run.config.batch_size].split(run.config.batch_size):
        batch_total, batch_count, _ = run.loss(model, blocks, generator)
        total, count = total + batch_total.item(), count + batch_count.item()
    return total / count


def train(run: Run, state: TrainState, progress: Progress, save: Callable[[TrainState], None],
          log: Callable[[str], None]) -> None:
    """Steps from ``state.step`` to ``config.steps``, evaluating (also before the first step) and saving."""
    config = run.config

    def record_eval() -> float:
        val = evaluate(run, state.model)
        state.history["val"].append({"step": state.step, "loss": val, "ppl": math.exp(val)})
        return val

    if state.step == 0:
        log(f"step 0/{config.steps}  val {record_eval():.4f}")
    since, seconds = state.step, 0.0  # training time since the last report, evaluations and saves left out
    while state.step < config.steps:
        last = state.history["train"][-1] if state.history["train"] else None
        progress.step(f"loss {last['loss']:.4f} lr {last['lr']:.2e}" if last else "")
        start = time.monotonic()
        state.history["train"].append(train_step(run, state))
        seconds += time.monotonic() - start
        if state.step % config.eval_every == 0 or state.step == config.steps:
            val = record_eval()
            recent = [r["loss"] for r in state.history["train"][-(state.step - since):]]
            speed = (state.step - since) * config.batch_size * config.seq_len / seconds
            progress.close()
            log(f"step {state.step}/{config.steps}  train {sum(recent) / len(recent):.4f}  val {val:.4f}  "
                f"ppl {math.exp(val):.4g}  lr {state.history['train'][-1]['lr']:.2e}  {speed:,.0f} tok/s")
            since, seconds = state.step, 0.0
        if state.step % config.save_every == 0 or state.step == config.steps:
            save(state)
