"""Training across processes on torch.distributed (NCCL when the device is CUDA, gloo on the CPU).

``torchrun --nproc-per-node W -m subq.train ...`` runs W copies of the trainer. They form a world of
``dp x cp`` ranks: ``--cp N`` consecutive ranks share each sequence (context parallelism: rank ``r`` of a CP group
holds the ``r``-th contiguous shard of every sequence, for the models whose layers take a ``cp_group``), and the
``dp = W / N`` CP groups take disjoint rows of the global batch (data parallelism).

Every rank draws the same global batch from the same seeded generator (so the data, the masks and the random state
are what one process drawing ``--batch-size`` rows would have) and keeps its block of it. The loss a rank
differentiates is its share of the global mean, ``sum of its token losses / global token count``; DDP (or FSDP2)
averages the gradients over the world, so the loss is scaled by the world size and the update is the one process's
update of the whole batch, up to the order of the float sums. Parameters are replicated across every rank (DDP), or
sharded across every rank (FSDP2's ``fully_shard``), the CP ranks included: the gradient a CP rank computes is its
shard's part of the total, and the world-wide reduction adds the parts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from subq.train.errors import TrainError

CP_MODELS = ("flash", "mamba2")  # the models whose layers take a context-parallel group
# FSDP2 shards the parameters, gradients and AdamW moments (16 bytes a parameter) instead of replicating them; below
# a billion parameters (16 GB replicated) DDP's one all-reduce per step is simpler and faster, above it the
# replicated state is a large part of a GPU. --fsdp / --no-fsdp override this default.
FSDP_DEFAULT_PARAMS = 1_000_000_000


def process_rank() -> int:
    """This process's global rank: torch.distributed's when it is initialised, else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def process_count() -> int:
    """The number of trainer processes: torch.distributed's world, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Layout:
    """Where this process sits: ``rank`` of ``world``, in CP groups of ``cp`` consecutive ranks."""

    world: int = 1
    rank: int = 0
    cp: int = 1
    fsdp: bool = False
    cp_group: dist.ProcessGroup | None = None
    owns_process_group: bool = False  # init_process_group was called here: destroy it at the end

    @property
    def dp(self) -> int:
        return self.world // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's block of a global ``(batch, seqlen)`` tensor: its data-parallel rows, then its
        context-parallel contiguous shard of each row. A row count that does not divide (the last val batch) gives
        the first ranks one row more, and maybe some ranks none."""
        rows = batch.tensor_split(self.dp)[self.dp_rank]
        return rows.tensor_split(self.cp, dim=1)[self.cp_rank] if self.cp > 1 else rows

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the world (a new tensor; ``value`` itself when there is one process)."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value


def check(world: int, cp: int, model: str, config, chunk_size: int | None) -> None:
    """The layout's requests against the run, before any process group or model exists: one-line errors."""
    if cp < 1:
        raise TrainError(f"--cp must be positive, got {cp}")
    if cp > 1 and model not in CP_MODELS:
        raise TrainError(f"--cp {cp}: context parallelism is implemented for {' and '.join(CP_MODELS)}, "
                         f"not {model} (train it with --cp 1)")
    if world % cp:
        raise TrainError(f"--cp {cp} must divide the number of processes, {world} (torchrun --nproc-per-node)")
    dp = world // cp
    if config.batch_size % dp:
        raise TrainError(f"--batch-size {config.batch_size} is the global batch: it must divide by the {dp} "
                         f"data-parallel ranks ({world} processes / --cp {cp})")
    if config.seq_len % cp:
        raise TrainError(f"--seq-len {config.seq_len} must split into --cp {cp} equal shards")
    if cp > 1 and chunk_size is not None and (config.seq_len // cp) % chunk_size:
        raise TrainError(f"--seq-len {config.seq_len} / --cp {cp} = {config.seq_len // cp} tokens per shard must be "
                         f"a multiple of {model}'s chunk_size {chunk_size}")


def local_device(device: torch.device, world: int) -> torch.device:
    """This process's device: with several processes on CUDA, the GPU of torchrun's LOCAL_RANK."""
    if world == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise TrainError(f"--device {device}: with {world} processes each takes the GPU of its LOCAL_RANK; "
                         "use --device cuda (or auto)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def start(world: int, cp: int, fsdp: bool, device: torch.device) -> Layout:
    """Joins (or creates, under torchrun) the process group and makes the CP groups. Every rank calls
    ``new_group`` for every group, in the same order, as torch.distributed requires."""
    if world == 1:
        return Layout(fsdp=False)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    layout = Layout(world=world, rank=dist.get_rank(), cp=cp, fsdp=fsdp, owns_process_group=owns)
    if cp > 1:
        for first in range(0, world, cp):
            group = dist.new_group(list(range(first, first + cp)))
            if first <= layout.rank < first + cp:
                layout.cp_group = group
    return layout


def stop(layout: Layout, finished: bool = True) -> None:
    """Leaves the process group. A finished run first waits for every rank, so none tears the group down while
    another's last collective (FSDP2's are asynchronous) may still be talking to it."""
    if not layout.distributed:
        return
    if finished:
        dist.barrier()
    if layout.owns_process_group:
        dist.destroy_process_group()


def _outer_blocks(module: nn.Module):
    """The blocks of the outermost ModuleLists (a model's layers), which FSDP2 shards one by one."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield from child
        else:
            yield from _outer_blocks(child)


def wrap(model: nn.Module, layout: Layout, device: torch.device, routed: bool = False) -> nn.Module:
    """The module the training steps call: DDP around ``model``, or ``model`` itself sharded in place by FSDP2
    (each block, then the root: a block's parameters are gathered just for its forward and backward). ``routed``:
    some parameters get no gradient in a step (a router picks the modules), which DDP must be told."""
    if not layout.distributed:
        return model
    if layout.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (layout.world,))
        for block in list(_outer_blocks(model)):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               find_unused_parameters=routed)


_FULL = {"full_state_dict": True, "cpu_offload": True}


def full_model_state(model: nn.Module, layout: Layout) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on the CPU of rank 0 (None elsewhere). A collective under FSDP2."""
    if not layout.fsdp:
        return model.state_dict() if layout.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(**_FULL))
    return state if layout.is_main else None


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, layout: Layout) -> dict | None:
    """The optimizer's state dict in the one-process format (parameters numbered in the optimizer's order) on
    rank 0, None elsewhere. Under FSDP2, torch.distributed.checkpoint gathers it keyed by parameter name; the names
    are renumbered in the order of the optimizer's groups, which is how ``Optimizer.state_dict`` numbers them."""
    if not layout.fsdp:
        return optimizer.state_dict() if layout.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**_FULL))
    if not layout.is_main:
        return None
    index: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        groups.append({**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]})
    return {"state": {index[name]: value for name, value in named["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict, layout: Layout) -> None:
    """Loads a one-process optimizer state dict (every rank has read it) into the optimizer of ``model``."""
    if not layout.fsdp:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(param): name for name, param in model.named_parameters()}
    names = [name_of[id(param)] for group in optimizer.param_groups for param in group["params"]]
    named = {"state": {names[i]: value for i, value in saved["state"].items()},
             "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                              for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def plain_copy(model: nn.Module, model_class: type[nn.Module], layout: Layout, without_cp: bool = False
               ) -> nn.Module | None:
    """On rank 0, a ``model_class`` holding ``model``'s whole weights on the CPU, for a checkpoint to save (FSDP2's
    sharded model is of another class) or, ``without_cp``, for one process to generate with; ``model`` itself when
    it already is one; None on the other ranks. A collective under FSDP2."""
    if not layout.fsdp and (layout.cp == 1 or not without_cp):
        return model if layout.is_main else None
    state = full_model_state(model, layout)
    if state is None:
        return None
    copy = model_class(model.config)
    copy.load_state_dict(state)
    return copy
