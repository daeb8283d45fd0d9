"""Past one GPU, on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Context parallelism splits the sequence across the ranks of a group in contiguous shards; tensor parallelism splits
a layer's heads. The collectives and their byte counter are in :mod:`subq.distributed._comm`.
"""

from subq.distributed._comm import bytes_sent, counting_bytes, reset_bytes_sent
from subq.distributed.causal_conv1d import causal_conv1d
from subq.distributed.flash import flash_chunk_attention
from subq.distributed.ssd import ssd_chunk_scan

__all__ = ["bytes_sent", "causal_conv1d", "counting_bytes", "flash_chunk_attention", "reset_bytes_sent",
           "ssd_chunk_scan"]
