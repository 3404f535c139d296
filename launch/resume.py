"""What a run directory may hold when a run starts, and what a resume may change.

A fresh run refuses a directory that holds a run; ``--resume`` needs a checkpoint. A resumed run
may change how it executes (:data:`EXECUTION_KEYS`: logging, checkpoint intervals, evaluation,
devices, workers, compilation) but not what it optimises, unless each such key is named with
``--allow-change`` (:func:`config_changes`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path

from launch.config import RunError, TrainConfig, load_config, read_json
from launch.distributed import all_ranks_agree, barrier, check_shared
from vlpeft.checkpoint import write_json

log = logging.getLogger("vlpeft.train")
# what vlpeft writes into every run directory it creates: the mark of a run, and the format of
# its checkpoints (a run of another format is refused on resume, naming both)
MARKER = ".vlpeft_run"
RUN_FORMAT = 1
LOCK = ".vlpeft_lock"

# keys that change how a run executes, not what it optimises: free to change on --resume
EXECUTION_KEYS = (
    "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.tensorboard",
    "train.loggers", "train.wandb_project",
    "train.on_nonfinite", "eval.", "deepspeed.config", "*.eval_batch_size",
    # how the run executes, for the keys the GPU/data-pipeline work adds
    "train.device", "train.num_workers", "train.compile", "train.gradient_checkpointing",
    "train.compile_mode", "train.compile_backend", "paper.", "train.max_skipped_share",
    "data.cache_dir",
)  # fmt: skip
# keys whose change no --allow-change can accept: the checkpoint's tensors have the old shapes
STRUCTURE_KEYS = ("model.family", "model.preset")
STRUCTURE_FIELDS = ("method", "r", "bottleneck", "targets", "components", "kinds")


def changes_structure(key: str) -> bool:
    """Whether changing ``key`` changes which tensors a checkpoint holds or their shapes: the
    family and preset, an adapter set's method, rank, bottleneck or placement."""
    parts = key.split(".")
    return key in STRUCTURE_KEYS or (
        parts[0] == "adapters" and len(parts) == 3 and parts[2] in STRUCTURE_FIELDS
    )


# keys a resume never changes: what ``eval.select: best`` chose so far was chosen by them
SELECTION_KEYS = ("eval.select",)
# with ``best``, what the compared validation scores were computed on and how
SELECTION_KEYS_BEST = ("eval.val_every", "eval.max_records", "eval.num_beams",
                       "eval.max_new_tokens", "eval.itm_k")  # fmt: skip
TASK_VALIDATION_FIELDS = ("num_beams", "max_new_tokens", "max_records", "prompt", "splits")


def fixed_by_selection(key: str, earlier: dict) -> bool:
    """Whether ``key`` is fixed for the run by its checkpoint selection (``eval.select``): the
    choice itself, and with ``best`` what the validation scores it compares were computed on
    (the eval section's settings, a task's generation settings, prompt, record limit and val
    split)."""
    if key in SELECTION_KEYS:
        return True
    if earlier.get("eval.select") != "best":
        return False
    parts = key.split(".")
    task_field = parts[:2] == ["data", "tasks"] and len(parts) >= 4
    if task_field and parts[3] == "splits":
        return len(parts) == 4 or parts[4] == "val"
    return key in SELECTION_KEYS_BEST or (task_field and parts[3] in TASK_VALIDATION_FIELDS)


# keys the launcher fills in when a run starts (a classifier's answer vocabulary from the data):
# a config that leaves them out asks for the same run
DERIVED_KEYS = ("model.overrides.answers",)
RESUME_HINT = (
    "the run's optimisation would continue under the old state while config.yaml said otherwise. "
    "Pass --allow-change KEY for each change you mean, or start another run"
)


@contextlib.contextmanager
def folder_lock(folder: Path, doing: str, enabled: bool = True):
    """Holds an exclusive lock on ``folder`` (``.vlpeft_lock``, the holder's pid inside) while the
    block runs: a second process ``doing`` the same there is refused at once, naming the lock,
    instead of both writing into one folder. ``enabled`` False (the other ranks of a run whose
    rank 0 holds it) takes nothing."""
    if not enabled:
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise RunError(f"--out {folder}: a file, not a folder: name a folder")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise RunError(
                f"{folder}: another process (pid {holder}) is {doing} there and holds {path}; "
                "wait for it to end or choose another folder"
            ) from None
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_run_dir(run_dir: Path, rank: int, world: int):
    """The run's lock, taken by rank 0 for the whole run; every rank learns whether it got it
    (so all stop together when another process holds it)."""
    stack = contextlib.ExitStack()
    error = None
    try:
        stack.enter_context(folder_lock(run_dir, "training", enabled=rank == 0))
    except RunError as err:
        error = err
    if not all_ranks_agree(error is None, world):
        stack.close()
        raise error or RunError(f"{run_dir}: rank 0 could not lock the run directory")
    return stack


def is_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a vlpeft run: its marker, or (runs from before the marker) a
    checkpoint or a metrics log."""
    return (
        (run_dir / MARKER).is_file()
        or any((run_dir / "checkpoints").glob("step_*"))
        or (run_dir / "metrics.jsonl").is_file()
    )


def check_run_dir(run_dir: Path, resume: bool, world: int, restart: bool = False) -> None:
    """Before any heavy work: ``--out`` is a folder; a fresh run refuses a folder that holds a
    run (``restart``: a run without any checkpoint starts again from scratch) or anything that
    is not a run; ``--resume`` needs a checkpoint of this launcher's format."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"--out {run_dir}: a file, not a folder: name a folder")
    own = {MARKER, LOCK}
    foreign = (
        sorted(p.name for p in run_dir.iterdir() if p.name not in own) if run_dir.is_dir() else []
    )
    if foreign and not is_run(run_dir):
        raise RunError(
            f"--out {run_dir}: a folder that is not a vlpeft run and not empty ({len(foreign)} "
            f"entries, e.g. {foreign[0]!r}): training would overwrite them; name a new or empty folder"
        )
    check_format(run_dir)
    check_no_links(run_dir)
    checkpoints = any((run_dir / "checkpoints").glob("step_*"))
    finished = (run_dir / "adapters").exists() or (run_dir / "run.json").exists()
    used = checkpoints or finished or (run_dir / "metrics.jsonl").exists()
    if used and not resume and restart and not checkpoints and not finished:
        log.info("%s: the run stopped before its first checkpoint; starting it again", run_dir)
    elif used and not resume:
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


def check_no_links(run_dir: Path) -> None:
    """A symbolic link inside a run directory is refused: writing the run's files through it
    would write wherever it points (another run, a user's file)."""
    if not run_dir.is_dir():
        return
    for folder, dirs, files in os.walk(run_dir):  # does not descend into linked folders
        for name in [*dirs, *files]:
            if os.path.islink(os.path.join(folder, name)):
                raise RunError(
                    f"{os.path.join(folder, name)}: a symbolic link inside the run directory; "
                    "vlpeft writes no run file through a link: remove it"
                )


def check_format(run_dir: Path) -> None:
    """A run directory written by a vlpeft whose checkpoint format differs is refused, naming the
    marker's key; other version differences do not matter."""
    path = run_dir / MARKER
    if not path.is_file():
        return
    marker = read_json(path)
    if not isinstance(marker, dict):
        raise RunError(f"{path}: not a vlpeft run marker (expected a JSON object)")
    found = marker.get("format")
    if found != RUN_FORMAT:
        raise RunError(
            f"{path}: format is {found!r}, this vlpeft reads run format {RUN_FORMAT}: the run was "
            "written by another version; resume it with that version, or start another run"
        )


def mark_run_dir(run_dir: Path) -> None:
    """Rank 0 marks a folder as a vlpeft run (once, when the run starts)."""
    if not (run_dir / MARKER).is_file():
        write_json(run_dir / MARKER, {"format": RUN_FORMAT, "created": time.time()})


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

    never = (
        (changes_structure, "the checkpoint holds tensors of the old model and adapters (their "
         "shapes and names). Start another run, or train.init_from a finished one"),
        (lambda key: fixed_by_selection(key, earlier), "the run's checkpoint selection "
         "(eval.select) compares validation scores of the same steps and records from its "
         "start. Start another run"),
    )  # fmt: skip
    for fixed, why in never if doing == "resuming" else ():
        keys = [k for k in changed if fixed(k)]
        if keys:
            listed = ", ".join(f"{k}: {changed[k][0]!r} → {changed[k][1]!r}" for k in keys)
            raise RunError(
                f"{run_dir}: resuming with a changed config ({listed}); no --allow-change can "
                f"take it: {why}"
            )
    refused = [k for k in changed if not any(matches(k, a) for a in allowed)]
    if refused:
        listed = ", ".join(f"{k}: {changed[k][0]!r} → {changed[k][1]!r}" for k in refused)
        raise RunError(f"{run_dir}: {doing} with a changed config ({listed}); {hint}")
    return changed
