"""Which weights a run keeps: the last step's, or each adapter set's best validation step's
(``eval.select: last | best``).

VL-Adapter's single-task scripts test the checkpoint of the best validation epoch; its multitask
pipeline tests the last one. With ``best`` every validation (``eval.val_every``) scores each
*group* of trained tensors by the mean validation headline of its voters and keeps the tensors of
the best step so far:

- a group is the tensors of one adapter set (its adapters and the parameters only its config
  trains); tensors that several sets train (a family's visual projection under one adapter per
  task) form a group of their own, voted on by all of those sets' voters;
- a set's voters are the tasks that train it, except a task whose validation split is part of
  its training data (GQA trained on train + val): its validation score says nothing.

The kept tensors are ``selected/<group>/step_<n>.safetensors`` in the run directory; the best
step and score of every group are part of each checkpoint's state (an interrupted run resumes
with them), files no checkpoint refers to any more are removed, and checkpoint rotation
(``train.keep_checkpoints``) never touches them. At the end the selected tensors are loaded before
``adapters/`` is written and the test splits are evaluated, so ``launch.evaluate`` and
``launch.export`` use them too.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch

from launch.config import ConfigError, RunError, read_json
from vlpeft.adapters.base import adapter_configs
from vlpeft.checkpoint import write_safetensors
from vlpeft.inject import trainable_extra_names

log = logging.getLogger("vlpeft.train")
FOLDER = "selected"
_ADAPTER = re.compile(r"\.adapters\.([^.]+)\.")


def val_in_training(task) -> bool:
    """Whether ``task``'s validation split is part of what it trains on (``train: train+val``)."""
    splits = task.config.splits
    if "val" not in splits or "train" not in splits:
        return False
    return splits["val"] in str(splits["train"]).split("+")


def voters(router) -> dict[str, list[str]]:
    """Per adapter set: the tasks whose validation scores choose its step."""
    out: dict[str, list[str]] = {}
    for name, task in router.tasks.items():
        out.setdefault(task.config.adapter, [])
        if not val_in_training(task):
            out[task.config.adapter].append(name)
    return out


def groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """The trained tensors by group: ``{set: names}`` and, for tensors several sets train,
    ``{"setA+setB": names}``."""
    configs = adapter_configs(model)
    extras = {name: set(trainable_extra_names(model, config)) for name, config in configs.items()}
    out: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        found = _ADAPTER.search(name)
        owners = [found.group(1)] if found else sorted(s for s, e in extras.items() if name in e)
        if owners:
            out.setdefault("+".join(owners), []).append(name)
    return out


class Selector:
    """Keeps each group's best validation step (``eval.select: best``); a no-op for ``last``.

    Args:
        run_dir: the run directory (``selected/`` lives there).
        select: ``"last"`` or ``"best"``.
        set_voters: :func:`voters` of the run's router.
    """

    def __init__(self, run_dir: Path, select: str, set_voters: dict[str, list[str]]) -> None:
        self.run_dir, self.select, self.set_voters = Path(run_dir), select, set_voters
        self.best: dict[str, dict] = {}  # group → {"step", "score", "voters"}

    @property
    def enabled(self) -> bool:
        return self.select == "best"

    def check(self, model: torch.nn.Module) -> None:
        """Every group has a task that votes for it, before the first step."""
        if not self.enabled:
            return
        for group in groups(model):
            if not self.group_voters(group):
                raise ConfigError(
                    f"eval.select: best: adapter set(s) {group!r} have no task to choose their "
                    "step (each task that trains them validates on data it trains on); use "
                    "eval.select: last, or give such a task a validation split outside its "
                    "training data"
                )

    def group_voters(self, group: str) -> list[str]:
        found = (t for s in group.split("+") for t in self.set_voters.get(s, []))
        return sorted(dict.fromkeys(found))

    def update(self, step: int, records: dict, model: torch.nn.Module) -> None:
        """After a validation at ``step`` (``records``: ``"<task>/val"`` → score record): keeps
        the tensors of every group whose score beats its best so far."""
        if not self.enabled:
            return
        params = dict(model.named_parameters())
        for group, names in groups(model).items():
            chosen = self.group_voters(group)
            scores = [records.get(f"{task}/val", {}).get("headline") for task in chosen]
            if any(s is None or not math.isfinite(s) for s in scores):
                missing = [t for t, s in zip(chosen, scores) if s is None or not math.isfinite(s)]
                raise RunError(
                    f"step {step}: eval.select: best needs a finite validation score of "
                    f"{missing} (group {group!r}); their val split has none"
                )
            score = sum(scores) / len(scores)
            kept = self.best.get(group)
            if kept is not None and score <= kept["score"]:
                continue
            write_safetensors(self.path(group, step), {n: params[n] for n in names})
            self.best[group] = {"step": step, "score": score, "voters": chosen}
            log.info("eval.select: %s best at step %d (%.4f, mean of %s)", group, step, score,
                     ", ".join(chosen))  # fmt: skip

    def path(self, group: str, step: int) -> Path:
        return self.run_dir / FOLDER / group / f"step_{step:07d}.safetensors"

    def state_dict(self) -> dict:
        return {"selected": {g: dict(v) for g, v in self.best.items()}} if self.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        self.best = {g: dict(v) for g, v in (state.get("selected") or {}).items()}
        for group, info in self.best.items():
            if not self.path(group, info["step"]).is_file():
                raise RunError(
                    f"{self.path(group, info['step'])}: the checkpoint's selected weights of "
                    f"{group!r} (step {info['step']}) are missing; they were removed by hand?"
                )

    def prune(self) -> None:
        """Removes the selected files neither this run's state nor any of its checkpoints refers
        to (after a checkpoint is written)."""
        if not self.enabled:
            return
        wanted = {self.path(g, v["step"]) for g, v in self.best.items()}
        for checkpoint in (self.run_dir / "checkpoints").glob("step_*"):
            state = checkpoint / "state.json"
            if state.is_file():
                for g, v in (read_json(state).get("selected") or {}).items():
                    wanted.add(self.path(g, v["step"]))
        for file in (self.run_dir / FOLDER).glob("*/step_*.safetensors"):
            if file not in wanted:
                file.unlink()

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> dict:
        """Loads every group's selected tensors into ``model``; returns what was selected."""
        if not self.enabled:
            return {}
        from safetensors.torch import load_file

        if not self.best:
            log.warning("eval.select: best, but no validation ran (train.steps < eval.val_every?):"
                        " the last step's weights are kept")  # fmt: skip
        params = dict(model.named_parameters())
        for group, info in self.best.items():
            for name, value in load_file(self.path(group, info["step"])).items():
                params[name].data.copy_(value)
            log.info("eval.select: %s uses step %d (val %.4f)", group, info["step"], info["score"])
        return {g: dict(v) for g, v in self.best.items()}
