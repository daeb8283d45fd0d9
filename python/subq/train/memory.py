"""Will the run fit? An estimate of training memory, checked before the corpus is built or a step is taken, so a
request that cannot fit is a one-line error rather than an allocator failure or an OOM kill minutes in.

The estimate is deliberately simple: parameters with their gradients and AdamW's two moments (4 float32 copies),
plus the activations autograd keeps for the backward, per token: ``ACTIVATION_BYTES_PER_FEATURE`` bytes for each
feature of each layer (measured on the tiny presets of every registered model: 60 to 90 bytes in float32, from the
projections' inputs and outputs, the mixer's internals and the norms), and the logits with their float32 copy and
gradient (12 bytes per vocabulary entry). It is an "about", not a bound, and the check refuses only runs whose
estimate exceeds the whole memory of the device."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from subq.train.config import TrainConfig
from subq.train.errors import TrainError

PARAMETER_COPIES = 4  # the weights, their gradients, AdamW's exp_avg and exp_avg_sq
ACTIVATION_BYTES_PER_FEATURE = 64
LOGIT_BYTES = 12


def layers_of(config: object) -> int:
    """The residual blocks: n_layer, or for Mixture-of-Modules its bottom and top blocks and, per assembly step,
    the top_k attention and top_k FFN modules each token runs; one for a model that names neither."""
    if hasattr(config, "n_layer"):
        return config.n_layer
    if hasattr(config, "assembly_steps"):
        return config.n_bottom + config.n_top + 2 * config.assembly_steps * config.top_k
    return 1


def activation_bytes_per_token(model_config: object) -> int:
    return (layers_of(model_config) * model_config.d_model * ACTIVATION_BYTES_PER_FEATURE
            + model_config.vocab_size * LOGIT_BYTES)


def estimate_bytes(model: nn.Module, config: TrainConfig, dp: int = 1, cp: int = 1, param_shards: int = 1
                   ) -> tuple[int, int]:
    """(parameter and optimizer bytes, activation bytes) of one training step of one process: its ``1/dp`` of the
    batch, ``1/cp`` of each sequence, ``1/param_shards`` of the parameters (FSDP2)."""
    parameters = sum(p.numel() * p.element_size() for p in model.parameters()) * PARAMETER_COPIES // param_shards
    tokens = (config.batch_size // dp) * (config.seq_len // cp)
    return parameters, tokens * activation_bytes_per_token(model.config)


def device_bytes(device: torch.device) -> int:
    """All the memory of ``device``: the GPU's, or the machine's RAM (within its cgroup limit, if any)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's limit, which the OOM killer enforces, is often far below the host's RAM
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def check_fits(model: nn.Module, config: TrainConfig, device: torch.device, dp: int = 1, cp: int = 1,
               param_shards: int = 1) -> None:
    parameters, activations = estimate_bytes(model, config, dp, cp, param_shards)
    limit = device_bytes(device)
    if parameters + activations > limit:
        each = " in each process" if dp * cp * param_shards > 1 else ""
        raise TrainError(f"the run needs about {_gib(parameters + activations)}{each} ({_gib(parameters)} parameters "
                         f"and optimizer state, {_gib(activations)} activations for --batch-size {config.batch_size} "
                         f"x --seq-len {config.seq_len}), more than the {_gib(limit)} of {device}: lower "
                         "--batch-size or --seq-len, or choose a smaller model")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
