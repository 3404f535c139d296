"""Processes and devices: ranks, the process group, collectives, the run's device, rank-0 work.

One process needs none of it beyond :func:`distributed_env` (DeepSpeed reads the variables it
sets); several (``torchrun`` / ``deepspeed``; DistributedDataParallel or DeepSpeed's engine,
:mod:`launch.engine`) share a run directory on one filesystem
(:func:`check_shared`) and agree on every decision that stops or skips a step
(:func:`all_ranks_agree`).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from launch.config import ConfigError, RunError, TrainConfig
from vlpeft.adapters.base import gathered

# fault injection for the resume tests: "RANK:EVENT:STEP" (EVENT: step — after that step's update;
# checkpoint — mid-way through writing that step's checkpoint) kills that rank with SIGKILL
FAULT = os.environ.get("VLPEFT_FAULT", "")


def fault_point(event: str, step: int, rank: int) -> None:
    """SIGKILLs this process at a deterministic point when ``VLPEFT_FAULT`` names it."""
    if FAULT and FAULT == f"{rank}:{event}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def distributed_env() -> tuple[int, int]:
    """(rank, world size); sets the variables DeepSpeed needs even for one process."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def init_distributed(config: TrainConfig, world: int) -> None:
    """The process group (gloo on the CPU, NCCL with GPUs); under NCCL each process first takes
    its local rank's GPU, so that the collectives before DeepSpeed's engine (the shared-folder
    check, the resume choice) do not all land on GPU 0."""
    if torch.cuda.is_available() and world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local}, but this process sees {torch.cuda.device_count()} GPU(s): "
                "start one process per visible GPU (CUDA_VISIBLE_DEVICES, --num_gpus)"
            )
        torch.cuda.set_device(local)
    if config.deepspeed.enabled:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    elif world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def collective_device() -> torch.device:
    """Where a collective's tensor must live: this rank's GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_mean(value: torch.Tensor, world: int) -> float:
    """The mean of a scalar over all processes (every rank must call it)."""
    if world > 1:
        value = value.float().clone().to(collective_device())
        torch.distributed.all_reduce(value)
        value /= world
    return value.item()


def all_ranks_agree(flag: bool, world: int) -> bool:
    """True only if ``flag`` holds on every process (so all ranks stop or skip together)."""
    if world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def check_shared(run_dir: Path, world: int) -> None:
    """Several processes: the run directory must be one folder for all of them (every rank writes
    its checkpoint shard and RNG state there, rank 0 moves the checkpoint into place). Rank 0
    writes a marker that every rank must see, or the run stops before training."""
    if world == 1:
        return
    rank = torch.distributed.get_rank()
    token = [f"{os.getpid()}-{time.time_ns()}" if rank == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    marker = run_dir / f".shared_check_{token[0]}"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(token[0])
    barrier(world)
    seen = marker.is_file()
    everyone = all_ranks_agree(seen, world)  # a collective: every rank has looked by now
    if rank == 0:
        marker.unlink(missing_ok=True)
    if not everyone:
        raise RunError(
            f"{run_dir}: not the same folder on every node (rank {rank} "
            f"{'sees' if seen else 'does not see'} rank 0's files): put the run directory on a "
            "shared filesystem (NFS, Lustre, …); every rank writes its checkpoint shard there"
        )


def resolve_device(config: TrainConfig, engine=None) -> torch.device:
    """``train.device``: ``auto`` is the local rank's GPU when there is one, else the CPU; under
    DeepSpeed the engine's device, which an explicit value must agree with."""
    want = config.train.device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device {want!r}: no CUDA device is visible (auto picks the CPU)")
    if want == "auto":
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    elif want == "cuda":
        device = torch.device("cuda", local)
    else:
        device = torch.device(want)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device {want!r}: GPU {device.index} does not exist "
            f"({torch.cuda.device_count()} visible)"
        )
    if engine is not None:
        ours = torch.device(engine.device)
        same = ours.type == device.type and (ours.index or 0) == (device.index or 0)
        if want != "auto" and not same:
            raise ConfigError(
                f"train.device {want!r} disagrees with DeepSpeed's device {ours} (one process "
                "per GPU: the launcher's LOCAL_RANK picks it; train.device: auto follows it)"
            )
        device = ours
    return device


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (asynchronous from pinned memory); the rest as is."""
    if device.type == "cpu":
        return batch
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def num_workers(config: TrainConfig, device: torch.device) -> int:
    """``train.num_workers``, or its default: 0 on the CPU (the cores train), 4 on a GPU."""
    if config.train.num_workers is not None:
        return config.train.num_workers
    return 4 if device.type == "cuda" else 0


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a run trains, by name (what checkpoints and the rank-0 replica carry)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class RankZero:
    """Runs work on rank 0 with a whole model while the other ranks wait.

    ZeRO-3 partitions every parameter and its forward hooks are collectives, so a forward on one
    rank alone would hang: there rank 0 evaluates a replica (built once, like the training model)
    into which the trainable tensors are gathered from all ranks. Otherwise the model itself.
    """

    def __init__(self, model, rank: int, world: int, replica_factory=None) -> None:
        self.model, self.rank, self.world = model, rank, world
        self.replica_factory, self.replica = replica_factory, None

    def run(self, work):
        """``work(model)`` on rank 0; returns its result there (None elsewhere)."""
        target = self.model
        trainable = trainable_state(self.model)
        with gathered(trainable.values()):
            if self.rank == 0 and self.replica_factory is not None:
                if self.replica is None:
                    self.replica = self.replica_factory()
                params = dict(self.replica.named_parameters())
                for name, value in trainable.items():
                    params[name].data.copy_(value.data)
                target = self.replica
        result = work(target) if self.rank == 0 else None
        barrier(self.world)
        return result
