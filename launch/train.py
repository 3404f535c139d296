"""Multitask training: ``python -m launch.train --config FILE [--out RUN_DIR] [key=value …]``.

One process (plain PyTorch loop), or several under ``torchrun`` / ``deepspeed`` (DeepSpeed engine
when ``deepspeed.enabled``; ZeRO stages in ``launch/ds_zero*.json``, "auto" values filled from this
config). Each step: the sampler picks a task, the router activates its adapter set and routing
function, task loss + ReSoRA penalty, backward, clip, step. Progress with tqdm, scalars to
TensorBoard and ``metrics.jsonl``; atomic checkpoints of trainable tensors, optimizer, scheduler,
sampler position and RNG states (``--resume`` continues from the newest); at the end the test
splits are evaluated and ``run.json`` + ``leaderboard.md`` written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

import vlpeft
from evaluation.evaluate import evaluate_all
from evaluation.leaderboard import render_markdown
from launch.config import (
    STAGE_PREFIX,
    ConfigError,
    TrainConfig,
    load_config,
    read_recipe,
    stage_names,
)  # fmt: skip
from launch.run import (
    RunError,
    build_model,
    build_router,
    check_offline,
    enable_gradient_checkpointing,
    finished_run_config,
)  # fmt: skip
from tasks.base import DataError
from tasks.loader import multitask_loader
from tasks.router import TaskRouter
from tasks.sampler import MultitaskSampler, SamplerConfig
from vlpeft.adapters.base import gathered
from vlpeft.checkpoint import atomic_write, write_json, write_safetensors
from vlpeft.compile import compile_model

log = logging.getLogger("vlpeft.train")
REPO = Path(__file__).resolve().parent.parent
# fault injection for the resume tests: "RANK:EVENT:STEP" (EVENT: step — after that step's update;
# checkpoint — mid-way through writing that step's checkpoint) kills that rank with SIGKILL
FAULT = os.environ.get("VLPEFT_FAULT", "")


def fault_point(event: str, step: int, rank: int) -> None:
    """SIGKILLs this process at a deterministic point when ``VLPEFT_FAULT`` names it."""
    if FAULT and FAULT == f"{rank}:{event}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# -- distributed ----------------------------------------------------------------------------------
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


def global_mean(value: torch.Tensor, world: int) -> float:
    """The mean of a scalar over all processes (every rank must call it)."""
    if world > 1:
        value = value.float().clone().to(collective_device())
        torch.distributed.all_reduce(value)
        value /= world
    return value.item()


def collective_device() -> torch.device:
    """Where a collective's tensor must live: this rank's GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIN_LOSS_SCALE = 1e-4  # fp16: a loss scale driven below this by overflows means non-finite values


# -- optimisation ---------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and normalisation weights (every tensor with < 2 dims)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_steps(steps: int, warmup: float) -> int:
    """The number of warm-up steps: a fraction of ``steps`` when ``warmup`` < 1, else a count."""
    return int(warmup * steps) if warmup < 1 else int(warmup)


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float):
    """transformers' linear warm-up from 0 then linear decay to 0 (the papers' schedule)."""
    return get_linear_schedule_with_warmup(optimizer, warmup_steps(steps, warmup), steps)


def deepspeed_config(config: TrainConfig, world: int, micro: int = 1) -> dict:
    """The ds_config JSON with "auto" filled from our config (one source of truth); a value the
    JSON sets that contradicts our config is an error naming both."""
    path = resolve_ds_path(config.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed.config {path}: malformed JSON ({err})") from None
    # One sampler step = one task batch per process (``micro``: the largest task batch);
    # DeepSpeed uses the batch sizes only for reporting, since we feed it our own batches.
    accum = config.train.grad_accum
    given = ds.get("gradient_accumulation_steps", "auto")
    if given != "auto" and given != accum:
        raise ConfigError(
            f"deepspeed.config {path}: gradient_accumulation_steps is {given!r} but "
            f'train.grad_accum is {accum}: set one of them ("auto" in the JSON takes ours)'
        )
    filled = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": config.train.grad_clip or 0.0,  # DeepSpeed: 0 = no clipping
    }
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    dora = [n for n, spec in config.adapters.items() if spec.get("method") == "dora"]
    if stage == 3 and dora:
        raise ConfigError(
            f"deepspeed.config {path}: ZeRO-3 partitions the base weights, and DoRA (adapter set "
            f"{dora[0]!r}) reads the whole W0 at every forward for its norm: use ZeRO-2"
        )
    for block, precision in (("bf16", "bf16"), ("fp16", "fp16")):
        settings = ds.setdefault(block, {})
        if settings.get("enabled", "auto") == "auto":
            settings["enabled"] = config.train.precision == precision
        elif bool(settings["enabled"]) != (config.train.precision == precision):
            raise ConfigError(
                f"deepspeed.config {path}: {block}.enabled is {settings['enabled']} but "
                f"train.precision is {config.train.precision!r}"
            )
    return ds


def resolve_ds_path(name: str) -> Path:
    """A ds_config path as given, else relative to the repository (``launch/ds_zero2.json``)."""
    path = Path(name)
    if not path.is_file() and (REPO / name).is_file():
        path = REPO / name
    if not path.is_file():
        found = sorted(str(p.relative_to(REPO)) for p in (REPO / "launch").glob("ds_zero*.json"))
        raise ConfigError(f"deepspeed.config {name!r}: file not found; shipped: {found}")
    return path


# -- checkpoints ----------------------------------------------------------------------------------
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimizer state as (tensors for safetensors, JSON-able rest) — no pickle."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, rest: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in {**tensors, **rest["scalars"]}.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def save_checkpoint(
    run_dir: Path, step: int, model, optimizer, scheduler, position, keep: int,
    engine=None, rank: int = 0, world: int = 1, extra: dict | None = None,
) -> None:  # fmt: skip
    """Writes checkpoints/step_<n>/ through a temp directory + rename; keeps the last ``keep``.

    Every rank calls it. The plain loop's optimizer state goes to safetensors + JSON; under
    DeepSpeed the engine writes its (partitioned) optimizer and scheduler states, trainable
    tensors only, into ``deepspeed/`` (DeepSpeed's own format, read back only by this launcher).
    """
    root = run_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)
    # every rank makes the folder it writes into (on another node rank 0's mkdir may not be
    # visible yet); the run directory must be on a filesystem every node shares (check_shared)
    tmp.mkdir(parents=True, exist_ok=True)
    write_safetensors(tmp / f"rng_rank{rank}.safetensors", {"torch": torch.get_rng_state()})
    if engine is not None:
        engine.save_checkpoint(
            str(tmp), tag="deepspeed", save_latest=False, exclude_frozen_parameters=True
        )
    state = {
        "step": step,
        "position": list(position),
        "python_rng": random.getstate(),
        **(extra or {}),
    }
    with gathered(trainable_state(model).values()):
        if rank == 0:
            write_safetensors(tmp / "trainable.safetensors", trainable_state(model))
    fault_point("checkpoint", step, rank)
    if rank == 0:
        if engine is None:
            tensors, state["optimizer"] = optimizer_tensors(optimizer)
            write_safetensors(tmp / "optimizer.safetensors", tensors)
            state["scheduler"] = scheduler.state_dict()
        write_json(tmp / "state.json", state)
    barrier(world)
    if rank == 0:
        write_json(tmp / MANIFEST, manifest(tmp))  # sizes and checksums, checked on resume
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step_*"))[:-keep]:
            shutil.rmtree(old)
    barrier(world)


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(directory: Path) -> dict:
    """Every file of a checkpoint directory: its size and SHA-256."""
    return {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint (a missing, truncated or altered file), or None. One
    written before checkpoints had a manifest is checked for its files only."""
    path = checkpoint / MANIFEST
    if not path.is_file():
        missing = [
            n for n in ("state.json", "rng_rank0.safetensors") if not (checkpoint / n).is_file()
        ]
        if missing:
            return f"{checkpoint / missing[0]} is missing"
        log.warning("checkpoint %s has no manifest (an older vlpeft): not verified", checkpoint)
        return None
    try:
        expected = json.loads(path.read_text())
        for name, info in expected.items():
            file = checkpoint / name
            if not file.is_file():
                return f"{file} is missing"
            if file.stat().st_size != info["bytes"]:
                return f"{file} has {file.stat().st_size} bytes, {info['bytes']} were written"
            if _sha256(file) != info["sha256"]:
                return f"{file} does not match its checksum"
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        return f"{path} is not a manifest of this launcher"
    return None


def newest_intact(checkpoints: list[Path]) -> Path:
    """The newest checkpoint whose files all match their manifest. A damaged newer one is named
    in a warning and moved aside (``.damaged_step_*``), so checkpoint rotation never keeps it in
    place of an intact one."""
    problems = []
    for checkpoint in reversed(checkpoints):
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint
        problems.append(problem)
        aside = checkpoint.with_name(f".damaged_{checkpoint.name}")
        log.warning("checkpoint %s is damaged (%s); moved to %s", checkpoint, problem, aside.name)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(checkpoint, aside)
    raise RunError("no intact checkpoint to resume from: " + "; ".join(problems))


def load_checkpoint(path: Path, model, optimizer, scheduler, engine=None, rank: int = 0) -> dict:
    """Restores a checkpoint into the model, optimizer, scheduler and RNGs; returns its
    ``state.json`` (step, sampler position, the run's counters)."""
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    if engine is not None:
        engine.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False)
    else:
        params = dict(model.named_parameters())
        for name, value in load_file(path / "trainable.safetensors").items():
            params[name].data.copy_(value)
        restore_optimizer(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    rng = path / f"rng_rank{rank}.safetensors"
    if not rng.is_file():
        raise RunError(f"{path}: no {rng.name}: the checkpoint was written by fewer processes")
    torch.set_rng_state(load_file(rng)["torch"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return state


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


# -- the loop -------------------------------------------------------------------------------------
class Logger:
    """metrics.jsonl + TensorBoard (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool) -> None:
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(run_dir / "tensorboard")

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        # strict JSON: a non-finite value (a skipped step's loss) is written as null, never NaN
        clean = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
        self.file.write(json.dumps({"step": step, **clean}, allow_nan=False) + "\n")
        self.file.flush()
        if self.writer:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


class StepClock:
    """Where a step's time goes: waiting for the next batch vs the rest (the device's work)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.wait = self.steps = self.examples = self.excluded_s = 0.0

    @contextlib.contextmanager
    def waiting(self):
        started = time.perf_counter()
        yield
        self.wait += time.perf_counter() - started

    @contextlib.contextmanager
    def excluded(self):
        """Time that is not the training loop's (checkpoints, validation): left out of the
        figures of the interval it falls in."""
        started = time.perf_counter()
        yield
        self.excluded_s += time.perf_counter() - started

    def step(self, examples: int) -> None:
        self.steps += 1
        self.examples += examples

    def report(self) -> dict:
        """Over the steps since the last report: ``perf/step_s``, ``perf/examples_per_s`` and
        ``perf/data_wait`` (the fraction 0–1 of the time spent waiting for batches)."""
        now = time.perf_counter()
        elapsed = max(now - self.last - self.excluded_s, 1e-9)
        figures = {
            "perf/step_s": elapsed / max(self.steps, 1),
            "perf/examples_per_s": self.examples / elapsed,
            "perf/data_wait": self.wait / elapsed,
        }
        self.last, self.wait, self.steps, self.examples, self.excluded_s = now, 0.0, 0, 0, 0.0
        return figures


@dataclasses.dataclass
class Run:
    """Everything a training run holds between its phases."""

    config: TrainConfig
    run_dir: Path
    rank: int
    world: int
    router: TaskRouter
    model: torch.nn.Module
    datasets: dict
    sampler: MultitaskSampler
    optimizer: torch.optim.Optimizer
    scheduler: object
    engine: object = None
    resora: vlpeft.ReSoRAConfig | None = None
    device: torch.device = torch.device("cpu")
    scaler: torch.amp.GradScaler | None = None  # fp16 in the plain loop
    step: int = 0
    position: tuple[int, int] = (0, 0)
    last_finite_loss: float | None = None
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (on_nonfinite: skip)
    overflows: int = 0  # fp16 steps the loss scaler skipped (plain loop)


def check_run_dir(run_dir: Path, resume: bool, world: int) -> None:
    """A fresh run refuses a directory that already holds one, before any heavy work."""
    checkpoints = any((run_dir / "checkpoints").glob("step_*"))
    used = checkpoints or (run_dir / "metrics.jsonl").exists() or (run_dir / "adapters").exists()
    if used and not resume:
        raise RunError(
            f"{run_dir} holds a run already: pass --resume to continue it, or another --out"
        )
    if resume and not checkpoints:  # restarting would overwrite what the run wrote
        raise RunError(
            f"{run_dir}: --resume, but there is no checkpoint to resume from "
            f"({'the run wrote none: train.checkpoint_every is 0?' if used else 'no run there'}); "
            "start a fresh run with another --out"
        )
    barrier(world)  # every rank has looked before rank 0 writes
    check_shared(run_dir, world)


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


def check_eval_splits(router: TaskRouter, config: TrainConfig) -> None:
    """Reads every split the run will evaluate before training, so a bad test file (an image
    without captions, a missing image) is an error now, not after the training."""
    splits = list(config.eval.splits) + (["val"] if config.eval.val_every else [])
    for task in router.tasks.values():
        for split in dict.fromkeys(splits):
            task.read(split, limit=config.eval.max_records)


def load_deepspeed_state_safely(engine) -> None:
    """DeepSpeed reads its engine state with ``torch.load(weights_only=False)``: a crafted ``.pt``
    in a shared run directory would run code on resume. Its loads go through
    ``weights_only=True`` instead, with the three DeepSpeed types its checkpoints hold (the
    ZeRO-stage enum, the loss scaler's state, fragment addresses) allow-listed; anything else is
    refused with the file's name."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address]

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            reason = str(err).strip().splitlines()[-1][:300]
            raise RunError(
                f"{path}: refused: it holds more than tensors and DeepSpeed's plain state, and "
                f"loading it could run code ({reason})"
            ) from None

    engine.checkpoint_engine.load = load


def setup(config: TrainConfig, run_dir: Path, rank: int, world: int, resume: bool = False) -> Run:
    """Router, model with adapters (``train.init_from``'s when a fresh run names one) on the
    device, data sets, sampler, optimizer and schedule (DeepSpeed's engine when enabled)."""
    source = config.train.init_from
    if source and source.startswith(STAGE_PREFIX):
        raise ConfigError(
            f"train.init_from {source!r} names a stage of a recipe: python -m launch.reproduce "
            "runs the stages in order; with launch.train pass train.init_from=<that stage's run>"
        )
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    router = build_router(config)
    check_eval_splits(router, config)
    model = build_model(config, router)
    resuming = resume and any((run_dir / "checkpoints").glob("step_*"))
    if source and not resuming:  # before the optimizer copies any weight
        init_from_run(model, config, Path(source))
    if config.train.gradient_checkpointing:
        log.info("gradient checkpointing on %s", enable_gradient_checkpointing(model))
    device = resolve_device(config)
    if not config.deepspeed.enabled:
        model.to(device)  # (DeepSpeed moves it to the engine's device)
    datasets = {name: router.dataset(name, "train", model) for name in router.tasks}
    for name, dataset in datasets.items():
        if not router[name].scorable(dataset.records):
            raise DataError(
                f"task {name}: its train split ({router[name].split_name('train')}) has no "
                "annotations to train on (a test split for an evaluation server?)"
            )
    sampler = MultitaskSampler(
        {n: len(d) for n, d in datasets.items()},
        {n: router[n].config.batch_size for n in datasets},
        SamplerConfig(**vars(config.sampler)),
        rank=rank,
        world_size=world,
    )
    optimizer = torch.optim.AdamW(
        param_groups(model, config.train.weight_decay), lr=config.train.lr
    )
    scheduler = linear_schedule(optimizer, config.train.steps, config.train.warmup)
    engine, scaler = None, None
    if config.deepspeed.enabled:
        import deepspeed  # heavy and optional: only DeepSpeed runs load it

        micro = max(router[n].config.batch_size for n in router.tasks)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(config, world, micro),
        )  # fmt: skip
        load_deepspeed_state_safely(engine)
        device = resolve_device(config, engine)
    elif world > 1:
        raise ConfigError(
            "several processes need deepspeed.enabled=true (gradients are averaged by DeepSpeed)"
        )
    elif config.train.precision == "fp16":
        scaler = torch.amp.GradScaler(device.type)
    if config.train.compile:  # on the device (its backend's tool chain is checked for it); in
        # place: names, state dicts and checkpoints stay the eager ones
        compile_model(model, config.train.compile_mode, config.train.compile_backend)
    resora = vlpeft.ReSoRAConfig(**config.resora) if config.resora else None
    if resora and resora.samples != "weight":
        vlpeft.enable_resora(model)  # the recorder keeps each training forward's activations
    return Run(config, run_dir, rank, world, router, model, datasets, sampler, optimizer,
               scheduler, engine, resora, device, scaler)  # fmt: skip


def init_from_run(model, config: TrainConfig, source: Path) -> None:
    """Loads a finished run's adapters and trained tensors into ``model`` (``train.init_from``),
    refusing a run of another family, preset or adapter layout."""
    earlier = finished_run_config(source, "train.init_from")
    differ = [
        key
        for key, mine, theirs in (
            ("model.family", config.model.family, earlier.model.family),
            ("model.preset", config.model.preset, earlier.model.preset),
            ("adapters", config.adapters, earlier.adapters),
            # a classifier's answer vocabulary: the same size in another order misaligns it
            (
                "model.overrides.answers",
                config.model.overrides.get("answers"),
                earlier.model.overrides.get("answers"),
            ),
        )  # fmt: skip
        if mine != theirs
    ]
    if differ:
        raise RunError(
            f"train.init_from {source}: that run differs in {differ}; a later stage starts from "
            "the same model with the same adapter sets"
        )
    vlpeft.load_adapter(model, source / "adapters")
    log.info("initialised the adapters from %s", source)


# keys that change how a run executes, not what it optimises: free to change on --resume
EXECUTION_KEYS = (
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.tensorboard",
    "train.on_nonfinite", "eval.", "deepspeed.config", "*.eval_batch_size",
    # how the run executes, for the keys the GPU/data-pipeline work adds
    "train.device", "train.num_workers", "train.compile", "train.gradient_checkpointing",
    "train.compile_mode", "train.compile_backend", "paper.",
)  # fmt: skip


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}`` (dicts only; lists are values)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# keys the launcher fills in when a run starts (a classifier's answer vocabulary from the data):
# a config that leaves them out asks for the same run
DERIVED_KEYS = ("model.overrides.answers",)
RESUME_HINT = (
    "the run's optimisation would continue under the old state while config.yaml said otherwise. "
    "Pass --allow-change KEY for each change you mean, or start another run"
)


def config_changes(
    run_dir: Path, config: TrainConfig, allow_change=(), doing: str = "resuming",
    hint: str = RESUME_HINT, free: tuple[str, ...] = EXECUTION_KEYS,
) -> dict:  # fmt: skip
    """The keys ``config`` changes against the run's config.yaml; a key that changes the
    optimisation (lr, schedule, steps, batch sizes, tasks, seeds, adapters, …) without
    ``--allow-change KEY`` (a key or a section prefix) is refused, naming each. ``free``: the
    keys that may change (default: how the run executes)."""

    def flat(data: dict) -> dict:  # an empty section equals an absent one
        return {k: v for k, v in flatten(data).items() if v != {}}

    earlier = flat(load_config(run_dir / "config.yaml").to_dict())
    now = flat(config.to_dict())
    changed = {
        k: [earlier.get(k), now.get(k)]
        for k in sorted(set(earlier) | set(now))
        if earlier.get(k) != now.get(k) and not (k in DERIVED_KEYS and now.get(k) is None)
    }
    allowed = [*free, *allow_change]

    def matches(key: str, rule: str) -> bool:
        if rule.startswith("*."):
            return key.endswith(rule[1:])
        return key == rule or key.startswith(rule.rstrip(".") + ".")

    refused = [k for k in changed if not any(matches(k, a) for a in allowed)]
    if refused:
        listed = ", ".join(f"{k}: {changed[k][0]!r} → {changed[k][1]!r}" for k in refused)
        raise RunError(f"{run_dir}: {doing} with a changed config ({listed}); {hint}")
    return changed


def resume_or_start(run: Run, resume: bool, allow_change=()) -> None:
    """Loads the newest checkpoint when resuming (refusing config changes not allowed; every
    change is appended to ``config_history.jsonl``); writes the resolved config (rank 0)."""
    checkpoints = sorted((run.run_dir / "checkpoints").glob("step_*"))
    if resume and checkpoints:
        changed = config_changes(run.run_dir, run.config, allow_change)
        checkpoint = newest_intact(checkpoints) if run.rank == 0 else None
        if run.world > 1:  # rank 0 chose (and moved damaged ones aside): every rank loads it
            shared = [str(checkpoint) if checkpoint else None]
            torch.distributed.broadcast_object_list(shared, src=0)
            checkpoint = Path(shared[0])
        state = load_checkpoint(
            checkpoint, run.model, run.optimizer, run.scheduler, run.engine, run.rank
        )
        run.step, run.position = state["step"], tuple(state["position"])
        run.skipped, run.last_finite_loss = state.get("skipped", 0), state.get("last_finite_loss")
        run.overflows = state.get("overflows", 0)
        if run.scaler is not None and "scaler" in state:
            run.scaler.load_state_dict(state["scaler"])
        if changed and run.rank == 0:
            with open(run.run_dir / "config_history.jsonl", "a") as f:
                entry = {"time": time.time(), "step": run.step, "changes": changed}
                f.write(json.dumps(entry, default=str) + "\n")
        log.info("resumed from %s", checkpoint)

    if run.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(run.config.to_dict(), sort_keys=False)
        atomic_write(run.run_dir / "config.yaml", lambda t: Path(t).write_text(text))
        # which checkpoint each pretrained part started from (pre-trained vs fine-tuned matters
        # when comparing with the papers), and the run a later stage started from
        started = {"weights": getattr(run.model, "weight_sources", {}),
                   "init_from": run.config.train.init_from}  # fmt: skip
        write_json(run.run_dir / "weights.json", started)
        truncate_metrics(run.run_dir / "metrics.jsonl", run.step)


class NonFiniteError(RunError):
    """A non-finite loss or gradient norm stopped the run (``train.on_nonfinite: stop``)."""


def all_ranks_agree(flag: bool, world: int) -> bool:
    """True only if ``flag`` holds on every process (so all ranks stop or skip together)."""
    if world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def nonfinite(run: Run, task: str, what: str, value, can_skip: bool = True) -> bool:
    """Stops the run with a clear error (``on_nonfinite: stop``, or a step that cannot be undone),
    or counts a skipped step (``skip``: returns True, the caller drops the step's gradients)."""
    if run.config.train.on_nonfinite == "skip" and can_skip:
        run.skipped += 1
        log.warning("step %d (task %s): %s is %s; step skipped", run.step + 1, task, what, value)
        return True
    last = "none yet" if run.last_finite_loss is None else f"{run.last_finite_loss:.4g}"
    raise NonFiniteError(
        f"step {run.step + 1} (task {task}): {what} is {value}; last finite loss {last}. The run "
        "stopped, its last checkpoint is intact (train.on_nonfinite: skip drops such steps "
        "instead; a lower train.lr or train.grad_clip usually cures a diverging run)"
    )


def skip_step(run: Run) -> None:
    """Drops a step's gradients; the step counts (the schedule advances — under DeepSpeed too:
    the engine holds the same scheduler —, the run still ends at train.steps)."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1


def skipped_losses(micro_batches) -> tuple[tuple, dict]:
    """What a skipped step logs: a NaN loss (written as null) for it and each of its tasks."""
    nan = torch.full((), float("nan"))
    return (nan, torch.zeros(())), {task: nan for task, _ in micro_batches}


def forward_loss(run: Run, task: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(task loss, ReSoRA penalty) of one batch of ``task`` under the run's autocast."""
    run.router.activate(run.model, task)
    dtype = AUTOCAST.get(run.config.train.precision)
    with torch.autocast(run.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = (run.engine or run.model)(to_device(batch, run.device)).loss
        penalty = (
            vlpeft.resora_penalty(run.model, run.resora, run.step)
            if run.resora
            else torch.zeros((), device=loss.device)
        )
    return loss, penalty


def micro_batch_weights(micro_batches: list[tuple[str, dict]]) -> list[float]:
    """Each accumulated batch's loss weight. A task's batches share its part (its number of
    batches / all of them) by their examples, so one task's step is the per-example mean over
    all of them — ``batch_size: b, grad_accum: N`` trains as ``batch_size: N·b`` even when a
    pass ends in a short batch — and tasks weigh per batch, as they would in N separate steps."""
    sizes: dict[str, list[int]] = {}
    for task, batch in micro_batches:
        sizes.setdefault(task, []).append(len(batch["ids"]))
    share = {task: len(n) / len(micro_batches) for task, n in sizes.items()}
    return [share[t] * len(b["ids"]) / sum(sizes[t]) for t, b in micro_batches]


def train_step(run: Run, micro_batches: list[tuple[str, dict]]) -> tuple[tuple, dict]:
    """One optimisation step on ``train.grad_accum`` consecutive sampler batches, their losses
    weighted by :func:`micro_batch_weights`: returns the mean (task loss, ReSoRA penalty) and
    each task's mean loss, detached. A non-finite loss or gradient norm stops the run or skips
    the step (``on_nonfinite``)."""
    config, count = run.config, len(micro_batches)
    losses: dict[str, list[torch.Tensor]] = {}
    penalties = []
    weights = micro_batch_weights(micro_batches)
    for i, (task, batch) in enumerate(micro_batches):
        try:
            loss, penalty = forward_loss(run, task, batch)
            total = loss + penalty
            value = total.item()  # one host sync: the value and its finiteness
            finite = math.isfinite(value)
        except FloatingPointError as err:  # a model that refuses non-finite values (BLIP's ITC)
            finite, value = False, f"non-finite ({err})"
        finite = all_ranks_agree(finite, run.world)
        # DeepSpeed has taken earlier micro-batches' gradients: a later one cannot be dropped
        can_skip = run.engine is None or i == 0
        if not finite and nonfinite(run, task, "the loss", value, can_skip):
            skip_step(run)
            return skipped_losses(micro_batches)
        if run.engine is not None:  # DeepSpeed divides by gradient_accumulation_steps itself
            run.engine.backward(total * weights[i] * count)
            run.engine.step()  # applies the update at the accumulation boundary only
        elif run.scaler is not None:
            run.scaler.scale(total * weights[i]).backward()
        else:
            (total * weights[i]).backward()
        losses.setdefault(task, []).append(loss.detach())
        penalties.append(penalty.detach())
        run.last_finite_loss = value
    if run.engine is not None:
        norm = run.engine.get_global_grad_norm()  # fp16: the loss scaler skips overflows itself
        bad = norm is not None and not math.isfinite(float(norm)) and not run.engine.fp16_enabled()
        if not all_ranks_agree(not bad, run.world):  # the engine applied it: nothing to skip
            nonfinite(run, task, "the gradient norm (DeepSpeed applied the step)", norm, False)
    else:
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        params = [p for p in run.model.parameters() if p.requires_grad]
        clip = config.train.grad_clip if config.train.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        overflow = run.scaler is not None and not torch.isfinite(norm)
        if overflow:  # fp16: the scaler skips this update and lowers its scale (as DeepSpeed's,
            run.overflows += 1  # the schedule waits); a scale that collapses is divergence
            if run.scaler.get_scale() < MIN_LOSS_SCALE:
                nonfinite(run, task, f"the gradient norm at loss scale {run.scaler.get_scale():g}",
                          norm.item(), can_skip=False)  # fmt: skip
        elif not torch.isfinite(norm) and nonfinite(run, task, "the gradient norm", norm.item()):
            skip_step(run)
            return skipped_losses(micro_batches)
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        if not overflow:
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    every = [value for values in losses.values() for value in values]
    means = (torch.stack(every).mean(), torch.stack(penalties).mean())
    return means, {t: torch.stack(v).mean() for t, v in losses.items()}


def counters(run: Run) -> dict:
    """The run's counters and the fp16 loss scaler's state, kept in a checkpoint's state.json."""
    state = {"skipped": run.skipped, "last_finite_loss": run.last_finite_loss,
             "overflows": run.overflows}  # fmt: skip
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    return state


def after_step(run: Run, losses: tuple, per_task: dict, logger, bar, rank0, clock=None) -> None:
    """Logs (with the clock's figures since the last log), checkpoints and evaluates on
    validation as the config's intervals ask."""
    config, step = run.config, run.step
    fault_point("step", step, run.rank)
    if step % config.train.log_every == 0 or step == config.train.steps:
        loss, penalty = losses
        value = global_mean(loss, run.world)
        values = {"train/loss": value, "train/lr": run.scheduler.get_last_lr()[0]}
        for task, task_loss in per_task.items():  # the same tasks on every rank
            values[f"train/loss_{task}"] = global_mean(task_loss, run.world)
        if run.resora:
            values["train/resora"] = penalty.item()
        if config.train.on_nonfinite == "skip":
            values["train/skipped"] = run.skipped
        if run.engine is not None and run.engine.fp16_enabled():  # normal: the scaler's overflows
            values["train/overflow_skipped"] = run.engine.skipped_steps
        if run.scaler is not None:
            values["train/overflow_skipped"] = run.overflows
            values["train/loss_scale"] = run.scaler.get_scale()
        if clock is not None:
            values.update(clock.report())
        logger.log(step, values)
        bar.set_postfix(task=",".join(per_task), loss=f"{value:.3f}")
    outside = clock.excluded() if clock is not None else contextlib.nullcontext()
    with outside:  # not the loop's time: left out of the perf/* figures
        checkpoint_and_validate(run, logger, rank0)


def checkpoint_and_validate(run: Run, logger, rank0) -> None:
    """The checkpoint and the validation the config's intervals ask for at this step."""
    config, step = run.config, run.step
    if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
        try:
            save_checkpoint(
                run.run_dir, step, run.model, run.optimizer, run.scheduler, run.position,
                config.train.keep_checkpoints, run.engine, run.rank, run.world,
                counters(run),
            )  # fmt: skip
        except OSError as err:  # a full disk, a lost mount: the previous checkpoint is untouched
            previous = sorted((run.run_dir / "checkpoints").glob("step_*"))
            kept = f"{previous[-1]} is intact (--resume continues from it)" if previous else (
                "no earlier checkpoint exists")  # fmt: skip
            raise RunError(
                f"step {step}: the checkpoint could not be written ({err}); {kept}"
            ) from err
    if config.eval.val_every and step % config.eval.val_every == 0:
        rank0.run(
            lambda m: run_evaluation(m, run.router, config, run.run_dir, ["val"], logger, step)
        )
        run.model.train()


def finish(run: Run, model, seconds: float, logger) -> dict:
    """Saves the adapters, evaluates the test splits, writes run.json and leaderboard.md."""
    config, run_dir = run.config, run.run_dir
    vlpeft.save_adapter(model, run_dir / "adapters")
    results = run_evaluation(
        model, run.router, config, run_dir, config.eval.splits, logger, run.step
    )
    trainable, total_params = vlpeft.count_parameters(model)
    summary = {
        "run": run_dir.name, "family": config.model.family, "preset": config.model.preset,
        "method": method_name(config), "trainable": trainable, "total": total_params,
        "processes": run.world, "deepspeed": config.deepspeed.enabled,
        "train_seconds": round(seconds, 1), "steps": run.step, "results": results,
        "weights": getattr(model, "weight_sources", {}), "init_from": config.train.init_from,
    }  # fmt: skip
    write_json(run_dir / "run.json", summary)
    markdown = render_markdown([summary])
    atomic_write(run_dir / "leaderboard.md", lambda t: Path(t).write_text(markdown))
    return summary


def train(config: TrainConfig, run_dir: Path, resume: bool = False, allow_change=()) -> dict:
    """Runs training (and the final evaluation); returns the run summary written to run.json.

    Raises :class:`ConfigError`, :class:`RunError` or :class:`tasks.base.DataError` for what the
    user has to fix; ``main`` turns them into an exit code."""
    # setup
    rank, world = distributed_env()
    init_distributed(config, world)
    check_run_dir(run_dir, resume, world)
    config.data.file = str(Path(config.data.file).resolve())
    run = setup(config, run_dir, rank, world, resume)
    # resume
    resume_or_start(run, resume, allow_change)
    logger = Logger(run_dir, rank == 0, config.train.tensorboard)
    zero3 = run.engine is not None and run.engine.zero_optimization_stage() == 3
    replica = (lambda: build_model(config, run.router)) if zero3 else None
    rank0 = RankZero(run.model, rank, world, replica)
    # steps, with logging, checkpoints and validation
    started = time.time()
    workers = num_workers(config, run.device)
    loader = multitask_loader(
        run.datasets, run.sampler, run.position, workers, pin_memory=run.device.type == "cuda"
    )
    stream = iter(loader)
    bar = tqdm(total=config.train.steps, initial=run.step, desc="train", disable=rank != 0)
    run.model.train()
    clock = StepClock()
    while run.step < config.train.steps:
        micro_batches = []
        for _ in range(config.train.grad_accum):
            with clock.waiting():
                run.position, task, batch = next(stream)
            micro_batches.append((task, batch))
        losses, per_task = train_step(run, micro_batches)  # (its loss.item() syncs the device)
        bar.update(1)
        clock.step(sum(len(b["ids"]) for _, b in micro_batches))
        after_step(run, losses, per_task, logger, bar, rank0, clock)
    del stream, loader  # its workers end here
    bar.close()
    seconds = time.time() - started
    if run.resora:
        vlpeft.enable_resora(run.model, False)
    # finish
    summary = rank0.run(lambda model: finish(run, model, seconds, logger)) or {}
    logger.close()
    return summary


def truncate_metrics(path: Path, step: int) -> None:
    """Drops the lines a killed run logged after its last checkpoint (they are logged again),
    and a partial last line (killed mid-write)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the line a killed process was writing
            raise RunError(f"{path}: line {number} is not JSON") from None
        if record["step"] <= step:
            kept.append(line)
    atomic_write(path, lambda t: Path(t).write_text("".join(line + "\n" for line in kept)))


def method_name(config: TrainConfig) -> str:
    """A short description of the adapter sets, e.g. ``lora r=8 proj``."""
    parts = []
    for spec in config.adapters.values():
        words = [spec.get("method", "?")]
        for key in ("r", "bottleneck", "routing"):
            if spec.get(key) is not None:
                words.append(f"{key}={spec[key]}" if key != "routing" else str(spec[key]))
        parts.append(" ".join(words))
    name = " + ".join(dict.fromkeys(parts))
    return name + (f" + resora {config.resora.get('kind', 'linear')}" if config.resora else "")


def run_evaluation(
    model, router, config: TrainConfig, run_dir: Path, splits, logger, step: int
) -> dict:
    """Evaluates every task on ``splits``; logs and returns ``{"<task>/<split>": headline}``."""
    records = evaluate_all(model, router, splits, run_dir / "eval", config.eval)
    for record in records.values():
        logger.log(
            step, {f"{record['split']}/{record['task']}_{record['metric']}": record["headline"]}
        )
    return {key: record["headline"] for key, record in records.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description="Multitask PEFT training (plain loop or DeepSpeed)."
    )
    parser.add_argument("--config", required=True, type=Path, help="training YAML")
    parser.add_argument(
        "--out", type=Path, default=None, help="run directory (default runs/<config stem>)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument(
        "--allow-change", action="append", default=[], metavar="KEY",
        help="with --resume: accept a changed config key (or section) that changes the optimisation",
    )  # fmt: skip
    parser.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed passes it
    parser.add_argument("--stage", default=None, help="the stage of a recipe that lists stages")
    parser.add_argument(
        "--validate", action="store_true",
        help="check the config (every stage) without data or weights, then exit",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_dir = args.out or Path("runs") / args.config.stem
    try:
        if args.validate:
            return validate_config(args.config, args.overrides, args.stage)
        config = load_config(args.config, args.overrides, stage=args.stage)
        return train(config, run_dir, args.resume, args.allow_change)
    except (ConfigError, RunError, DataError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


def validate_config(path: Path, overrides=(), stage: str | None = None) -> dict:
    """``--validate``: loads the config (each stage of a recipe, or ``stage``) and checks what can
    be checked without data or weights (:func:`launch.run.check_offline`); prints a report."""
    names = [stage] if stage else stage_names(read_recipe(path), str(path)) or [None]
    reports = {}
    for name in names:
        config = load_config(path, overrides, stage=name)
        if config.deepspeed.enabled:
            deepspeed_config(config, world=1)  # the JSON parses and agrees with the config
        report = check_offline(config)
        reports[name or "config"] = report
        sets = ", ".join(
            f"{set_name}: {info['method']} on {info['layers']} layers"
            + (f" ({info['checked']})" if "checked" in info else "")
            for set_name, info in report["sets"].items()
        )
        trainable = report["trainable"]
        counted = (
            "an unknown number (ranks from the weights)" if trainable is None else f"{trainable:,}"
        )
        print(
            f"{path}{f' (stage {name})' if name else ''}: valid — {report['family']}/"
            f"{report['preset']}, {counted} of {report['total']:,} parameters train; "
            f"{sets or 'no adapters'}"
        )
    return reports


if __name__ == "__main__":
    main()
