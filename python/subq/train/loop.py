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
from torch.distributed.tensor import DTensor

from subq.profile.progress import Progress
from subq.train.config import TrainConfig
from subq.train.errors import TrainError
from subq.train.objectives import IGNORE_INDEX, Objective
from subq.train.parallel import Layout
from subq.train.registry import ModelEntry

BETAS = (0.9, 0.95)
MIN_LR_RATIO = 0.1  # the cosine ends at a tenth of the peak learning rate rather than at zero


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """The peak learning rate's multiplier for update ``step`` (from 0): linear warm-up, then cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def not_decayed(model: nn.Module) -> set[str]:
    """The names of the parameters AdamW leaves undecayed: pulling norm gains, biases or Mamba-2's A_log, dt_bias
    and D (marked ``_no_weight_decay``) toward zero changes what they mean rather than regularising. Taken before
    FSDP2 shards the model (its sharded parameters lose the mark)."""
    return {name for name, param in model.named_parameters()
            if param.ndim < 2 or getattr(param, "_no_weight_decay", False)}


def make_optimizer(model: nn.Module, config: TrainConfig, no_decay_names: set[str] | None = None
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule; only matrices are decayed (``not_decayed``, of ``model`` unless given)."""
    names = not_decayed(model) if no_decay_names is None else no_decay_names
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name in names else decay).append(param)
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
    layout: Layout = field(default_factory=Layout)
    module: nn.Module | None = None  # what the steps call (the DDP wrapper); None: the state's model

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def batch(self, blocks: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(this rank's inputs, its labels, the global count of labelled positions). Every rank makes the whole
        batch (the same draws from ``generator`` as one process) and keeps its block."""
        inputs, labels = self.objective.make_batch(blocks, generator)
        return self.layout.shard(inputs), self.layout.shard(labels), (labels != IGNORE_INDEX).sum()

    def loss(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(summed cross-entropy over the labelled positions, the model's auxiliary loss or None)."""
        labels = labels.to(self.device)
        with self.autocast():
            logits, aux = self.entry.outputs(model(inputs.to(self.device)))
        total = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                                reduction="sum")
        return total, aux


def train_step(run: Run, state: TrainState) -> dict:
    config, optimizer, layout = run.config, state.optimizer, run.layout
    model = run.module or state.model
    model.train()
    rows = torch.randint(len(run.train_blocks), (config.batch_size,), generator=state.data_rng)
    inputs, labels, count = run.batch(run.train_blocks[rows], state.data_rng)
    total, aux = run.loss(model, inputs, labels)
    loss = total / count.to(total.device)  # this rank's share of the global mean
    optimizer.zero_grad(set_to_none=True)
    # DDP and FSDP2 average the gradients over the world: scaled by it, the shares add up to the global mean's.
    objective = loss * layout.world if layout.distributed else loss
    (objective if aux is None else objective + aux).backward()
    grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip or math.inf)
    if isinstance(grad_norm, DTensor):  # FSDP2's sharded gradients give a replicated norm
        grad_norm = grad_norm.full_tensor()
    record = {"step": state.step + 1, "loss": layout.sum(loss).item(), "lr": optimizer.param_groups[0]["lr"],
              "grad_norm": grad_norm.item()}
    if not math.isfinite(record["loss"]):
        raise TrainError(f"the training loss became {record['loss']} at step {record['step']}: lower --lr")
    optimizer.step()
    state.scheduler.step()
    state.step += 1
    if aux is None:
        return record
    return {**record, "aux_loss": (layout.sum(aux) / layout.world).item() if layout.distributed else aux.item()}


@torch.no_grad()
def evaluate(run: Run, model: nn.Module) -> float:
    """Mean cross-entropy (nats per predicted token) over the first ``eval_batches`` batches of the val split,
    each rank taking its block of each batch."""
    model.eval()
    generator = torch.Generator().manual_seed(run.config.seed)  # the same masks at every evaluation
    total = count = 0
    for blocks in run.val_blocks[: run.config.eval_batches * run.config.batch_size].split(run.config.batch_size):
        inputs, labels, batch_count = run.batch(blocks, generator)
        if inputs.shape[0] == 0:  # a short last batch left this rank no row: FSDP2 and CP need its forward anyway
            inputs = torch.zeros((1, inputs.shape[1]), dtype=torch.long)
            labels = torch.full_like(inputs, IGNORE_INDEX)
        batch_total, _ = run.loss(model, inputs, labels)
        total, count = total + batch_total.item(), count + batch_count.item()
    if run.layout.distributed:
        total = run.layout.sum(torch.tensor(total, dtype=torch.float64, device=run.device)).item()
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
