"""What a run directory may hold when a run starts, and what a resume may change.

A fresh run refuses a directory that holds a run; ``--resume`` needs a checkpoint. A resumed run
may change how it executes (:data:`EXECUTION_KEYS`: logging, checkpoint intervals, evaluation,
devices, workers, compilation) but not what it optimises, unless each such key is named with
``--allow-change`` (:func:`config_changes`).
"""

from __future__ import annotations

from pathlib import Path

from launch.config import RunError, TrainConfig, load_config
from launch.distributed import barrier, check_shared

# keys that change how a run executes, not what it optimises: free to change on --resume
EXECUTION_KEYS = (
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.tensorboard",
    "train.on_nonfinite", "eval.", "deepspeed.config", "*.eval_batch_size",
    # how the run executes, for the keys the GPU/data-pipeline work adds
    "train.device", "train.num_workers", "train.compile", "train.gradient_checkpointing",
    "train.compile_mode", "train.compile_backend", "paper.",
)  # fmt: skip
# keys the launcher fills in when a run starts (a classifier's answer vocabulary from the data):
# a config that leaves them out asks for the same run
DERIVED_KEYS = ("model.overrides.answers",)
RESUME_HINT = (
    "the run's optimisation would continue under the old state while config.yaml said otherwise. "
    "Pass --allow-change KEY for each change you mean, or start another run"
)


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


def flatten(data: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` → ``{"train.lr": 1}`` (dicts only; lists are values)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
