"""The training data pipeline: one DataLoader over every task, driven by the multitask sampler.

The sampler decides everything — which task each step trains and which records of this process's
shard it reads — so the loader is its batch sampler: each sampler step becomes one batch, opened,
decoded and collated in worker processes. Nothing random happens in a worker (images are resized,
not augmented), and the loader draws its worker seeds from its own generator rather than torch's
global one, so the number of workers changes nothing but speed: the batches, their order and the
training process's RNG stream are the same with ``num_workers=0`` and ``num_workers=N``.

Each batch carries its sampler position (epoch, steps done within it), so a resumed run rebuilds
the loader at the checkpoint's position and reads exactly the batches an uninterrupted run would.

    loader = multitask_loader(datasets, sampler, position=(0, 0), num_workers=4, pin_memory=True)
    for position, task, batch in loader: ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .base import DataLoader, TaskDataset
from .sampler import MultitaskSampler


class MultitaskDataset(torch.utils.data.Dataset):
    """Items of several tasks' data sets, addressed by ``(epoch, step, task, index)`` keys.
    ``seed`` (the sampler's) and the step key what a task draws for a training batch."""

    def __init__(self, datasets: dict[str, TaskDataset], seed: int = 0) -> None:
        self.datasets, self.seed = datasets, seed

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values())

    def __getitem__(self, key: tuple[int, int, str, int]):
        return key, self.datasets[key[2]][key[3]]

    def collate(self, items: list) -> tuple[tuple[int, int], str, dict[str, Any]]:
        """(position after this step, task, the task's collated batch)."""
        (epoch, step, task, _), _ = items[0]
        draw = (self.seed, epoch, step)  # the same in every worker process and after a resume
        batch = self.datasets[task].collate([item for _, item in items], draw=draw)
        return (epoch, step), task, batch


class SamplerSteps(torch.utils.data.Sampler):
    """The sampler's steps from ``position`` = (epoch, steps done within it), forever: each a list
    of ``(epoch, step, task, index)`` keys (``step`` counts the steps done after it)."""

    def __init__(self, sampler: MultitaskSampler, position: tuple[int, int] = (0, 0)) -> None:
        self.sampler, self.position = sampler, tuple(position)

    def __iter__(self) -> Iterator[list[tuple[int, int, str, int]]]:
        epoch, skip = self.position
        while True:
            for i, (task, indices) in enumerate(self.sampler.epoch(epoch)):
                if i >= skip:
                    yield [(epoch, i + 1, task, index) for index in indices]
            epoch, skip = epoch + 1, 0


def multitask_loader(
    datasets: dict[str, TaskDataset],
    sampler: MultitaskSampler,
    position: tuple[int, int] = (0, 0),
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
) -> torch.utils.data.DataLoader:
    """A loader yielding ``(position, task, batch)`` per sampler step from ``position``.

    Args:
        datasets: task → its training data set.
        sampler: the multitask sampler of this process.
        position: where to start (a checkpoint's sampler position).
        num_workers: worker processes (0: load in this process).
        pin_memory: page-locked batches for asynchronous copies to a GPU.
        prefetch_factor: batches each worker prepares ahead.
    """
    dataset = MultitaskDataset(datasets, sampler.config.seed)
    workers = num_workers > 0
    return DataLoader(  # a worker's DataError arrives as its one line, not its traceback
        dataset,
        batch_sampler=SamplerSteps(sampler, position),
        collate_fn=dataset.collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers else None,
        persistent_workers=workers,
        # worker seeds come from this generator, not from torch's global one (which the training
        # step's dropout draws from): the worker count leaves the training RNG stream untouched
        generator=torch.Generator().manual_seed(0),
    )
