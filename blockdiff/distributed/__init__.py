"""A model split over several processes/devices on torch.distributed (tensor and expert parallel).

``LLM(path, tensor_parallel_size=N, expert_parallel=False)`` (and ``--tensor-parallel-size N [--expert-parallel]``
on ``serve``/``run``/``bench``): ``launch.start`` starts the ranks, ``shard.shard_model`` cuts each rank's weights,
``runtime`` runs every model call on all ranks with rank 0 leading. See docs/scaling.md.
"""

from .launch import Group, start, under_torchrun
from .runtime import LeaderModel, ParallelPrefixCache
from .shard import shard_model, split, weight_bytes

__all__ = ["Group", "LeaderModel", "ParallelPrefixCache", "shard_model", "split", "start", "under_torchrun", "weight_bytes"]
