"""Training checkpoints: save, manifest, verify, fall back, load.

A checkpoint is ``checkpoints/step_<n>/`` in the run directory, written through a temporary
folder and a rename (atomic), with a manifest of every file's size and SHA-256 checked on resume.
It holds the trainable tensors and the optimizer state as safetensors + JSON (no pickle), each
rank's RNG state, and ``state.json`` (step, sampler position, the run's counters); under
DeepSpeed the engine writes its own (partitioned) optimizer state into ``deepspeed/``, read back
only through :func:`launch.engine.load_deepspeed_state_safely`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from launch.config import RunError, read_json
from launch.distributed import barrier, fault_point, trainable_state
from vlpeft.adapters.base import gathered
from vlpeft.checkpoint import write_json, write_safetensors

log = logging.getLogger("vlpeft.train")
MANIFEST = "manifest.json"


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
    except (json.JSONDecodeError, RecursionError, UnicodeDecodeError, AttributeError, KeyError,
            TypeError):  # fmt: skip
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


def choose_checkpoint(run_dir: Path, rank: int, world: int) -> Path:
    """The checkpoint every rank resumes from: rank 0 picks the newest intact one (moving damaged
    ones aside) and tells the others."""
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    checkpoint = newest_intact(checkpoints) if rank == 0 else None
    if world > 1:
        shared = [str(checkpoint) if checkpoint else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        checkpoint = Path(shared[0])
    return checkpoint


def load_checkpoint(path: Path, model, optimizer, scheduler, engine=None, rank: int = 0) -> dict:
    """Restores a checkpoint into the model, optimizer, scheduler and RNGs; returns its
    ``state.json`` (step, sampler position, the run's counters)."""
    from safetensors.torch import load_file

    state = read_json(path / "state.json")
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
