"""What a run reports while it trains: ``metrics.jsonl`` and the loggers ``train.loggers`` names
(TensorBoard, Weights & Biases — the same metric names in each; rank 0), and where a step's time
goes (:class:`StepClock`: ``perf/step_s``, ``perf/examples_per_s``,
``perf/data_wait``)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from pathlib import Path

from launch.config import RunError
from vlpeft.checkpoint import atomic_write


class Logger:
    """metrics.jsonl + the ``loggers`` named (``tensorboard``, ``wandb``), on rank 0 only.

    W&B is imported only when named (``pip install wandb``); the run's W&B id is kept in
    ``wandb_id`` in the run directory, so a resumed run continues the same W&B run. W&B follows
    its own environment (``WANDB_MODE=offline``, ``WANDB_API_KEY``, …); files under
    ``<run>/wandb``.

    Example:
        >>> logger = Logger(run_dir, True, ["tensorboard"])  # doctest: +SKIP
        >>> logger.log(10, {"train/loss": 0.5})  # doctest: +SKIP
    """

    def __init__(
        self, run_dir: Path, enabled: bool, loggers=("tensorboard",), project: str = "vlpeft",
        config: dict | None = None,
    ) -> None:  # fmt: skip
        self.enabled = enabled
        self.file = self.writer = self.wandb = None
        if not enabled:
            return
        # never through a symbolic link (O_NOFOLLOW): a run writes only its own files
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
        self.file = os.fdopen(os.open(run_dir / "metrics.jsonl", flags, 0o666), "a")
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(run_dir / "tensorboard")
        if "wandb" in loggers:
            self.wandb = start_wandb(run_dir, project, config)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        # strict JSON: a non-finite value (a skipped step's loss) is written as null, never NaN;
        # None (no score: a split an evaluation server scores) too, and left out of the loggers
        clean = {k: (v if v is not None and math.isfinite(v) else None) for k, v in values.items()}
        self.file.write(json.dumps({"step": step, **clean}, allow_nan=False) + "\n")
        self.file.flush()
        if self.writer:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)
        if self.wandb:
            scalars = {k: v for k, v in values.items() if v is not None}
            if scalars:
                self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


def start_wandb(run_dir: Path, project: str, config: dict | None):
    """A W&B run named after the run directory; the same W&B run again on resume."""
    try:
        import wandb
    except ImportError:
        raise RunError(
            "train.loggers names wandb but it is not installed: pip install wandb "
            "(or drop wandb from train.loggers)"
        ) from None
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    if not id_file.is_file():
        atomic_write(id_file, lambda t: Path(t).write_text(run_id))
    return wandb.init(
        project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
        config=config,
    )  # fmt: skip


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
