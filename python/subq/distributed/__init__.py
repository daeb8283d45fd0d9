"""Past one GPU, on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Context parallelism splits the sequence across the ranks of a group in contiguous shards; tensor parallelism splits
a layer's heads. The collectives and their byte counter are in :mod:`subq.distributed._comm`.
"""

from subq.distributed._comm import bytes_sent, counting_bytes, reset_bytes_sent

__all__ = ["bytes_sent", "counting_bytes", "reset_bytes_sent"]
