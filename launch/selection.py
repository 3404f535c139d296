"""Which weights a run keeps: the last step's, or the best validation step's
(``eval.select: last | best``).

VL-Adapter's single-task scripts and BLIP's retrieval fine-tuning test the checkpoint of the best
validation epoch; VL-Adapter's multitask pipeline tests the last one. With ``best`` every
validation (``eval.val_every``) scores each *unit* of trained tensors by the mean validation
headline of its voters and keeps the unit's tensors of its best step so far (the first of equal
scores):

- a unit is one adapter set — its adapters and the parameters its config trains — or, when sets
  train a tensor in common (the family's visual projection under one adapter per task), all of
  those sets together: their tensors were trained together and are chosen at one step, never
  mixed from different steps;
- a set's voters are the tasks that train it, except a task whose validation split is part of its
  training data (GQA trained on ``train+val``): its validation score says nothing. The mean is of
  the headlines as they are (VQA accuracy 0–100 beside CIDEr ×100): a unit of tasks on different
  scales is chosen mostly by the widest-swinging one.

The kept tensors are ``selected/<unit>/step_<n>.safetensors`` in the run directory; the best step,
its score and each voter's score, and the last validated step are part of each checkpoint's state;
files no checkpoint refers to any more are removed, and checkpoint rotation
(``train.keep_checkpoints``) never touches them. A run resumed from a checkpoint whose step was due
a validation that did not happen (killed in between, or the validation failed) validates that step
first. At the end the selected tensors are loaded before ``adapters/`` is written and the test
splits are evaluated, so ``launch.evaluate`` and ``launch.export`` use them too.
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
    """Whether ``task``'s validation split shares data with what it trains on (``train:
    train+val``; splits joined by ``+`` share data when a part is common)."""
    splits = task.config.splits
    if "val" not in splits or "train" not in splits:
        return False
    return bool(set(str(splits["val"]).split("+")) & set(str(splits["train"]).split("+")))


def voters(router) -> dict[str, list[str]]:
    """Per adapter set: the tasks whose validation scores choose its step."""
    out: dict[str, list[str]] = {}
    for name, task in router.tasks.items():
        out.setdefault(task.config.adapter, [])
        if not val_in_training(task):
            out[task.config.adapter].append(name)
    return out


def groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """The trained tensors by unit: ``{set: names}``, and one ``{"setA+setB": names}`` for sets
    that train a tensor in common (all of their tensors)."""
    configs = adapter_configs(model)
    extras = {name: set(trainable_extra_names(model, config)) for name, config in configs.items()}
    owners: dict[str, list[str]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            found = _ADAPTER.search(name)
            owned = [found.group(1)] if found else [s for s, e in extras.items() if name in e]
            if owned:
                owners[name] = owned
    unit = {s: s for s in configs}  # union-find: sets that share a tensor are one unit

    def root(s: str) -> str:
        while unit[s] != s:
            s = unit[s]
        return s

    for owned in owners.values():
        for other in owned[1:]:
            unit[root(other)] = root(owned[0])
    members: dict[str, list[str]] = {}
    for s in configs:
        members.setdefault(root(s), []).append(s)
    label = {s: "+".join(sorted(members[root(s)])) for s in configs}
    out: dict[str, list[str]] = {}
    for name, owned in owners.items():
        out.setdefault(label[owned[0]], []).append(name)
    return out


class Selector:
    """Keeps each unit's best validation step (``eval.select: best``); a no-op for ``last``.

    Args:
        run_dir: the run directory (``selected/`` lives there).
        select: ``"last"`` or ``"best"``.
        set_voters: :func:`voters` of the run's router.
    """

    def __init__(self, run_dir: Path, select: str, set_voters: dict[str, list[str]]) -> None:
        self.run_dir, self.select, self.set_voters = Path(run_dir), select, set_voters
        self.best: dict[str, dict] = {}  # unit → {"step", "score", "voters", "scores"}
        self.validated = 0  # the last step whose validation the selection has seen

    @property
    def enabled(self) -> bool:
        return self.select == "best"

    def check(self, model: torch.nn.Module, router, max_records: int | None = None) -> None:
        """Before the first step: every unit has a task that votes for it, and every voter's
        validation split has answers to score."""
        if not self.enabled:
            return
        for unit in groups(model):
            chosen = self.unit_voters(unit)
            if not chosen:
                raise ConfigError(
                    f"eval.select: best: adapter set(s) {unit!r} have no task to choose their "
                    "step (each task that trains them validates on data it trains on); use "
                    "eval.select: last, or give such a task a validation split outside its "
                    "training data"
                )
            for name in chosen:
                task = router[name]
                if not task.scorable(task.read("val", limit=max_records)):
                    raise ConfigError(
                        f"eval.select: best: task {name}'s val split "
                        f"({task.split_name('val')}) has no answers to score; it would choose "
                        f"the step of {unit!r}"
                    )

    def unit_voters(self, unit: str) -> list[str]:
        found = (t for s in unit.split("+") for t in self.set_voters.get(s, []))
        return sorted(dict.fromkeys(found))

    def due(self, step: int, val_every: int) -> bool:
        """Whether ``step`` was due a validation the selection has not seen (a resume from the
        checkpoint written just before it)."""
        return self.enabled and step > 0 and step % val_every == 0 and self.validated < step

    def update(self, step: int, records: dict, model: torch.nn.Module) -> None:
        """After a validation at ``step`` (``records``: ``"<task>/val"`` → score record): keeps
        the tensors of every unit whose score beats its best so far."""
        if not self.enabled:
            return
        params = dict(model.named_parameters())
        for unit, names in groups(model).items():
            chosen = self.unit_voters(unit)
            scores = {t: records.get(f"{t}/val", {}).get("headline") for t in chosen}
            missing = [t for t, s in scores.items() if s is None or not math.isfinite(s)]
            if missing:
                raise RunError(
                    f"step {step}: eval.select: best needs a finite validation score of "
                    f"{missing} (unit {unit!r}); got {[scores[t] for t in missing]}"
                )
            score = sum(scores.values()) / len(scores)
            kept = self.best.get(unit)
            if kept is not None and score <= kept["score"]:
                continue
            write_safetensors(self.path(unit, step), {n: params[n] for n in names})
            self.best[unit] = {"step": step, "score": score, "voters": chosen, "scores": scores}
            log.info("eval.select: %s best at step %d (%.4f, mean of %s)", unit, step, score,
                     ", ".join(chosen))  # fmt: skip
        self.validated = step

    def path(self, unit: str, step: int) -> Path:
        return self.run_dir / FOLDER / unit / f"step_{step:07d}.safetensors"

    def state_dict(self) -> dict:
        if not self.enabled:
            return {}
        return {"selected": {u: dict(v) for u, v in self.best.items()}, "validated": self.validated}

    def load_state_dict(self, state: dict) -> None:
        self.best = {u: dict(v) for u, v in (state.get("selected") or {}).items()}
        self.validated = state.get("validated", 0)
        for unit, info in self.best.items():
            if not self.path(unit, info["step"]).is_file():
                raise RunError(
                    f"{self.path(unit, info['step'])}: the checkpoint's selected weights of "
                    f"{unit!r} (step {info['step']}) are missing; they were removed by hand?"
                )

    def prune(self) -> None:
        """Removes the selected files neither this run's state nor any of its checkpoints refers
        to, and what a killed write left (after a checkpoint is written)."""
        if not self.enabled:
            return
        wanted = {self.path(u, v["step"]) for u, v in self.best.items()}
        for checkpoint in (self.run_dir / "checkpoints").glob("step_*"):
            state = checkpoint / "state.json"
            if state.is_file():
                for u, v in (read_json(state).get("selected") or {}).items():
                    wanted.add(self.path(u, v["step"]))
        for file in (self.run_dir / FOLDER).glob("*/*"):
            if file.is_file() and file not in wanted:
                file.unlink()

    @torch.no_grad()
    def apply(self, model: torch.nn.Module) -> dict:
        """Loads every unit's selected tensors into ``model``; returns what was selected."""
        if not self.enabled:
            return {}
        from safetensors.torch import load_file

        if not self.best:
            log.warning("eval.select: best, but no validation ran (train.steps < eval.val_every?):"
                        " the last step's weights are kept")  # fmt: skip
        params = dict(model.named_parameters())
        for unit, info in self.best.items():
            for name, value in load_file(self.path(unit, info["step"])).items():
                params[name].data.copy_(value)
            log.info("eval.select: %s uses step %d (val %.4f)", unit, info["step"], info["score"])
        return {u: dict(v) for u, v in self.best.items()}
