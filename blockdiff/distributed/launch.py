"""Start the ranks of a split model: blockdiff spawns its own, or runs under ``torchrun``.

- Spawned (the default): the calling process is rank 0; ranks 1..N-1 are ``torch.multiprocessing`` spawn
  processes that load the checkpoint, keep their shard and follow rank 0 (``runtime.follow``) until it closes.
  Rendezvous over TCP on 127.0.0.1 and a free port.
- ``torchrun --nproc-per-node N script.py``: every process runs the user's script; ``LLM(...,
  tensor_parallel_size=N)`` joins the group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...). On
  rank 0 it returns as usual; on the other ranks it follows rank 0 and, when rank 0 closes, ends the process
  (``SystemExit(0)``): code after the constructor runs on rank 0 only.

Backend: NCCL when the model runs on CUDA (rank r on ``cuda:LOCAL_RANK``), gloo on CPU. A collective that waits
longer than ``BLOCKDIFF_DIST_TIMEOUT`` seconds (default 600) fails instead of hanging forever.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket

import torch
import torch.distributed as dist

from ..config import ModelConfig
from .runtime import Channel, LeaderModel, farewell, follow
from .shard import check_int4_split, check_world_size, shard_model


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("BLOCKDIFF_DIST_TIMEOUT", "600")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _device(device, local_rank: int) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda":
        d = torch.device("cuda", local_rank if d.index is None else d.index + local_rank)
        torch.cuda.set_device(d)
    return d


def _load_shard(path: str, world: int, rank: int, expert_parallel: bool, device: torch.device, load: dict,
                quant_kernels: bool = True):
    from ..loader import load_model
    model = load_model(path, device=device, prepare_quantized=False, **load)
    model = shard_model(model, world, rank, expert_parallel, prepare=quant_kernels)
    if device.type == "cpu":  # the whole model was read: give the other ranks' share back to the system
        import gc

        from ..heap import malloc_trim
        gc.collect()
        malloc_trim()
    return model


def _follow(rank: int, world: int, dev: torch.device) -> None:
    channel = Channel(rank, world, dev if dev.type == "cuda" else torch.device("cpu"))
    follow(channel, lambda path, expert_parallel, load, quant_kernels: _load_shard(path, world, rank, expert_parallel,
                                                                                 dev, load, quant_kernels))


def _end_with_rank0() -> None:
    """A spawned follower ends when rank 0's process does, whatever it is doing then. Rank 0 killed while the ranks
    met (before it hosted the rendezvous) left each follower retrying for ``BLOCKDIFF_DIST_TIMEOUT`` (600 s), an
    orphan; killed mid-load or mid-call, NCCL may wait as long in a collective. The sentinel: the pipe rank 0 holds
    open for its child, at EOF once rank 0's process is gone."""
    import multiprocessing.connection
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        logging.getLogger(__name__).warning("rank 0 (pid %s) ended: this rank ends with it", parent.pid)
        os._exit(1)
    threading.Thread(target=watch, name="blockdiff-rank0-watch", daemon=True).start()


def _follower_main(rank: int, world: int, port: int, device: str, threads: int) -> None:
    """Entry of a spawned follower (``rank`` >= 1)."""
    _end_with_rank0()
    torch.set_num_threads(threads)
    dev = _device(device, rank)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=_timeout())
    try:
        _follow(rank, world, dev)
    finally:
        dist.destroy_process_group()


class Group:
    """Rank 0's handle on the ranks: ``load()`` a checkpoint split over all of them (any number of times, one model
    at a time), ``close()`` to end the followers and the process group."""

    def __init__(self, world: int, device: torch.device, procs: list):
        self.world, self.device, self.procs = world, device, procs
        self.channel = Channel(0, world, device if device.type == "cuda" else torch.device("cpu"))
        self.closed = False

    @classmethod
    def spawn(cls, world: int, device: str = "cpu") -> "Group":
        """Rank 0 here, ranks 1..world-1 spawned (or, under torchrun, the processes torchrun started: on ranks > 0
        this follows rank 0 and then raises ``SystemExit(0)``)."""
        if world < 2:
            raise ValueError(f"tensor_parallel_size must be >= 2 to split the model, got {world}")
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group is already running in this process")
        if under_torchrun():
            rank, env_world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if env_world != world:
                raise ValueError(f"tensor_parallel_size is {world} but torchrun started {env_world} processes")
            dev = _device(device, int(os.environ.get("LOCAL_RANK", rank)))
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=_timeout())
            if rank != 0:
                try:
                    _follow(rank, world, dev)
                finally:
                    dist.destroy_process_group()
                raise SystemExit(0)
            return cls(world, dev, [])
        port = _free_port()
        ctx = torch.multiprocessing.get_context("spawn")
        procs = []
        for r in range(1, world):
            p = ctx.Process(target=_follower_main, daemon=True,
                            args=(r, world, port, str(device), torch.get_num_threads()))
            p.start()
            procs.append(p)
        dev = _device(device, 0)
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                    rank=0, world_size=world, timeout=_timeout())
        except BaseException:
            for p in procs:
                p.terminate()
            raise
        return cls(world, dev, procs)

    def dead_ranks(self) -> str | None:
        """'rank 1 (exit code -9), ...' for spawned followers that ended, else None (torchrun's ranks: not known
        here; a collective with one of them fails instead)."""
        gone = [f"rank {r} (exit code {p.exitcode})" for r, p in enumerate(self.procs, 1) if not p.is_alive()]
        return ", ".join(gone) or None

    def load(self, path: str, expert_parallel: bool = False, quant_kernels: bool = True, **load) -> LeaderModel:
        """Every rank loads ``path`` and keeps its shard; returns rank 0's ``LeaderModel``. ``load``: keyword arguments
        of ``load_model`` (dtype, quantization, quantize_embedding). ``quant_kernels=False``: quantized layers computed from
        their dequantized weights (``load_model(prepare_quantized=False)``): no dynamic int8 activations or bf16
        casts, whose roundings are discontinuous - the path on which shards equal one process to 1e-5."""
        if self.closed:
            raise RuntimeError("this group of ranks is closed")
        self.channel.send("load", path=path, expert_parallel=bool(expert_parallel), load=load,
                          quant_kernels=bool(quant_kernels))
        try:
            model = _load_shard(path, self.world, 0, expert_parallel, self.device, load, quant_kernels)
        except Exception as e:  # the followers learn it (and stay in step: ``close`` can still tell them to stop)
            try:
                self.channel.share_ranges(f"{type(e).__name__}: {e}")
            except Exception as broken:  # a follower gone too: this load's own error is the one to raise
                logging.getLogger(__name__).warning("could not tell the other ranks the load failed: %s", broken)
            raise
        failed = self.channel.share_ranges(model.vocab_range)
        if failed:
            rank, why = failed[0]
            raise RuntimeError(f"rank {rank} of the split model could not load {path}: {why}")
        return LeaderModel(model, self.channel, self)

    def close(self, failed: str | None = None) -> None:
        """End the followers and the process group. ``failed``: why the ranks are out of step (``LeaderModel.failure``):
        no "stop" is sent (a follower mid-call would read it as part of that call), the followers are terminated."""
        if self.closed:
            return
        self.closed = True
        try:
            gone = failed or self.dead_ranks()
            if gone:  # no acknowledgement to wait for from a rank that is not there (nor a broadcast to reach it)
                raise RuntimeError(gone if failed else f"{gone} had already ended")
            self.channel.send("stop")
            farewell()  # (torchrun's ranks: no handles here, so always)
        except Exception as e:  # a follower already gone (crashed, killed): close still releases the rest
            logging.getLogger(__name__).warning("could not tell every rank to stop: %s", e)
        finally:
            for p in self.procs:
                p.join(timeout=0 if failed else 30)
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
            if dist.is_initialized():
                dist.destroy_process_group()


def start(path: str, tensor_parallel_size: int, expert_parallel: bool = False, device: str = "cpu",
          **load) -> LeaderModel:
    """Load ``path`` split over ``tensor_parallel_size`` ranks (started here, or torchrun's); returns rank 0's
    ``LeaderModel`` (its ``close()`` ends the ranks). ``load``: keyword arguments of ``load_model``."""
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):  # (a missing one is the loader's error, said the loader's way)
        cfg = ModelConfig.from_file(config)
        check_world_size(cfg.text, int(tensor_parallel_size), expert_parallel)
        from ..quant import plan_for_checkpoint
        plan = plan_for_checkpoint(cfg, load.get("quantization"), device, torch.float32,
                                   load.get("quantize_embedding", True))
        check_int4_split(plan, int(tensor_parallel_size), expert_parallel)
    group = Group.spawn(int(tensor_parallel_size), device)
    try:
        return group.load(path, expert_parallel, **load)
    except Exception:  # a failed load is shared by every rank: they are in step, and told to stop
        group.close()
        raise
    except BaseException:  # interrupted mid-load (Ctrl-C): the followers are not where "stop" reaches them
        group.close(failed="interrupted while loading")
        raise
