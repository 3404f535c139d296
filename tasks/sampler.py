"""The multitask sampler: which task each step trains, and which records each process reads.

Modes (one epoch = ``sum`` of the tasks' batch counts, so epochs are comparable across modes):

- ``proportional`` (VL-Adapter's round-robin): every batch of every task exactly once per epoch, in
  a shuffled order — tasks appear in proportion to their number of batches.
- ``balanced``: every task the same number of steps (the mean batch count); small tasks cycle.
- ``temperature``: each step draws task t with probability ∝ n_t^(1/T) (T = 1: proportional in
  expectation, T → ∞: uniform).

Deterministic for (seed, epoch). In a distributed run every process follows the same task
schedule (so all ranks run the same adapters at each step) and reads its own shard of each task's
records (padded like ``DistributedSampler`` so all shards have the same length).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator

from vlpeft.config import Config

MODES = ("proportional", "balanced", "temperature")


@dataclasses.dataclass
class SamplerConfig(Config):
    """Args:
    mode: ``proportional`` | ``balanced`` | ``temperature``.
    temperature: T of temperature sampling.
    seed: base seed; each epoch reshuffles deterministically.
    """

    mode: str = "proportional"
    temperature: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sampler.mode {self.mode!r}: choose one of {list(MODES)}")
        if self.temperature <= 0:
            raise ValueError(f"sampler.temperature must be > 0, got {self.temperature}")


class MultitaskSampler:
    """Yields ``(task, record indices)`` for one process, one epoch at a time.

    Args:
        sizes: task → number of records.
        batch_sizes: task → per-process batch size.
        config: the sampling mode, temperature and seed.
        rank, world_size: this process and the number of processes.
    """

    def __init__(
        self,
        sizes: dict[str, int],
        batch_sizes: dict[str, int],
        config: SamplerConfig | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        empty = [t for t, n in sizes.items() if n <= 0]
        if empty:
            raise ValueError(f"sampler: tasks with no records: {empty}")
        self.sizes, self.batch_sizes = dict(sizes), dict(batch_sizes)
        self.config = config or SamplerConfig()
        self.rank, self.world_size = rank, world_size

    def shard_size(self, task: str) -> int:
        return math.ceil(self.sizes[task] / self.world_size)

    def num_batches(self, task: str) -> int:
        return math.ceil(self.shard_size(task) / self.batch_sizes[task])

    def schedule(self, epoch: int) -> list[str]:
        """The task of every step of ``epoch`` (the same on every process)."""
        rng = random.Random(f"{self.config.seed}-schedule-{epoch}")
        counts = {t: self.num_batches(t) for t in sorted(self.sizes)}
        total = sum(counts.values())
        if self.config.mode == "proportional":
            steps = [t for t, n in counts.items() for _ in range(n)]
            rng.shuffle(steps)
            return steps
        if self.config.mode == "balanced":
            each = max(1, round(total / len(counts)))
            steps = [t for t in counts for _ in range(each)]
            rng.shuffle(steps)
            return steps
        weights = [n ** (1 / self.config.temperature) for n in counts.values()]
        return rng.choices(list(counts), weights=weights, k=total)

    def shard(self, task: str, epoch: int, cycle: int = 0) -> list[int]:
        """This process's record indices of ``task`` for one pass (shuffled per epoch and cycle)."""
        order = list(range(self.sizes[task]))
        random.Random(f"{self.config.seed}-{task}-{epoch}-{cycle}").shuffle(order)
        padded = self.shard_size(task) * self.world_size
        order += order[: padded - len(order)]
        return order[self.rank :: self.world_size]

    def epoch(self, epoch: int) -> Iterator[tuple[str, list[int]]]:
        """``(task, indices)`` per step; a task whose pass runs out starts a new shuffled pass.
        A step costs O(batch): each task's pass is read through a cursor, never re-sliced."""
        passes: dict[str, list[int]] = {}
        cursors = dict.fromkeys(self.sizes, 0)
        cycles = dict.fromkeys(self.sizes, 0)
        for task in self.schedule(epoch):
            size, start = self.batch_sizes[task], cursors[task]
            if task not in passes or start >= len(passes[task]):
                passes[task], start = self.shard(task, epoch, cycles[task]), 0
                cycles[task] += 1
            cursors[task] = start + size
            yield task, passes[task][start : start + size]
