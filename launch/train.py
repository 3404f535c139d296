"""Multitask training: ``python -m launch.train --config FILE [--out RUN_DIR] [key=value …]``.

One process (plain PyTorch loop), or several under ``torchrun`` / ``deepspeed``: PyTorch's
``DistributedDataParallel`` (gloo on the CPU, NCCL on GPUs), or DeepSpeed's engine when
``deepspeed.enabled`` (ZeRO stages in ``launch/ds_zero*.json``, "auto" values filled from this
config). Each step: the sampler picks a task, the router activates its adapter set and routing
function, task loss + ReSoRA penalty, backward, clip, step. Progress with tqdm, scalars to
``metrics.jsonl`` and the ``train.loggers`` (TensorBoard, W&B); atomic checkpoints of trainable
tensors, optimizer, scheduler, sampler position and RNG states (``--resume`` continues from the
newest); at the end the test splits are evaluated, ``run.json`` + ``leaderboard.md`` written and
the run directory, scores and training time printed. ``train_seconds`` is the training loop's
time over the whole run, resumes included.

This file reads top to bottom: :func:`train` is setup → resume → the loop → finish. The parts
live by role: :mod:`launch.distributed` (ranks, collectives, the device), :mod:`launch.engine`
(optimizer, schedule, DeepSpeed, the step), :mod:`launch.checkpoints`, :mod:`launch.resume` (what
a run directory and a resume may hold), :mod:`launch.logger`, :mod:`launch.run` (model and tasks
from the config).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

import launch.run as launch_run
import vlpeft
from evaluation.evaluate import evaluate_all
from evaluation.leaderboard import render_markdown
from evaluation.scoring import reference_key
from launch import checkpoints, distributed, engine
from launch.config import STAGE_PREFIX, ConfigError, RunError, TrainConfig, load_config
from launch.logger import Logger, StepClock, truncate_metrics
from launch.resume import check_run_dir, config_changes, lock_run_dir, mark_run_dir
from launch.selection import Selector, voters
from tasks.base import DataError
from tasks.loader import multitask_loader
from tasks.router import TaskRouter
from tasks.sampler import MultitaskSampler, SamplerConfig
from vlpeft.checkpoint import atomic_write, write_json
from vlpeft.compile import compile_model

log = logging.getLogger("vlpeft.train")


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
    stepper: engine.PlainStepper  # the backend's step: plain, fp16 scaler or DeepSpeed
    selector: Selector  # eval.select: the weights the run keeps
    resora: vlpeft.ReSoRAConfig | None = None
    device: torch.device = torch.device("cpu")
    step: int = 0
    position: tuple[int, int] = (0, 0)
    last_finite_loss: float | None = None
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (on_nonfinite: skip)
    earlier_seconds: float = 0.0  # the training loop's time before this process (resumes)
    started: float = 0.0  # when this process's loop started

    def train_seconds(self) -> float:
        """The training loop's time over the whole run, resumes included (up to the checkpoint
        each resume started from)."""
        return self.earlier_seconds + (time.time() - self.started if self.started else 0.0)

    @property
    def engine(self):
        """DeepSpeed's engine, or None in the plain loop."""
        return self.stepper.engine

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.stepper.optimizer

    @property
    def scheduler(self):
        return self.stepper.scheduler


def train(
    config: TrainConfig, run_dir: Path, resume: bool = False, allow_change=(),
    restart: bool = False,
) -> dict:  # fmt: skip
    """Runs training (and the final evaluation); returns the run summary written to run.json.
    ``restart``: a run that stopped before its first checkpoint starts again from scratch
    (``launch.reproduce`` reruns its seeds so).

    Raises :class:`ConfigError`, :class:`RunError` or :class:`tasks.base.DataError` for what the
    user has to fix; ``main`` turns them into an exit code."""
    # setup
    check_data_file(config)
    rank, world = distributed.distributed_env()
    distributed.init_distributed(config, world)
    with lock_run_dir(run_dir, rank, world):  # one process at a time trains into a run directory
        check_run_dir(run_dir, resume, world, restart)
        if rank == 0:
            mark_run_dir(run_dir)
        config.data.file = str(Path(config.data.file).resolve())
        resuming = resume and any((run_dir / "checkpoints").glob("step_*"))
        # a change the resume refuses is named before any heavy work
        changed = config_changes(run_dir, config, allow_change) if resuming else {}
        run = setup(config, run_dir, rank, world, resume)
        # resume
        resume_or_start(run, resuming, changed)
        logger = Logger(
            run_dir, rank == 0, config.train.loggers, config.train.wandb_project,
            config.to_dict(),
        )  # fmt: skip
        zero3 = run.engine is not None and run.engine.zero_optimization_stage() == 3
        replica = (lambda: launch_run.build_model(config, run.router)) if zero3 else None
        rank0 = distributed.RankZero(run.model, rank, world, replica)
        if run.selector.due(run.step, config.eval.val_every):  # resumed before that validation
            validate(run, logger, rank0)
        # steps, with logging, checkpoints and validation
        run.started = time.time()
        workers = distributed.num_workers(config, run.device)
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
            losses, per_task = engine.train_step(run, micro_batches)  # (its loss.item() syncs)
            bar.update(1)
            clock.step(sum(len(b["ids"]) for _, b in micro_batches))
            distributed.fault_point("step", run.step, run.rank)
            if run.step % config.train.log_every == 0 or run.step == config.train.steps:
                log_step(run, losses, per_task, logger, bar, clock)
            with clock.excluded():  # not the loop's time: left out of the perf/* figures
                checkpoint_and_validate(run, logger, rank0)
        del stream, loader  # its workers end here
        bar.close()
        seconds = run.train_seconds()
        if run.resora:
            vlpeft.enable_resora(run.model, False)
        # finish
        summary = rank0.run(lambda model: finish(run, model, seconds, logger)) or {}
        logger.close()
        return summary


def check_data_file(config: TrainConfig) -> None:
    """A missing ``data.file`` named with what writes it, before any process group or model."""
    file = Path(config.data.file)
    if file.is_file():
        return
    where = "" if file.is_absolute() else (
        " (a relative path is taken from the working directory, else from the config's folder)")  # fmt: skip
    demo = ".demo" in file.parts
    hint = (
        "the demo configs read what `make demo` (python -m launch.demo) writes into .demo/: run "
        "it first, from the repository root, or set data.file= (and the demo's "
        "model.overrides.weights.text=) to where it wrote them"
        if demo
        else "python -m tasks.synthetic --out DIR writes a small data set (data.file=DIR/tasks.yaml); "
        "python -m tasks.check DATA_YAML checks one"
    )
    raise ConfigError(f"data.file {config.data.file}: not found{where}; {hint}")


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
    router = launch_run.build_router(config)
    if world > 1:  # one process per node parses each split into the record cache, then the
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # others map what it wrote
            launch_run.warm_record_caches(router, config)
        distributed.barrier(world)
    launch_run.check_eval_splits(router, config)
    model = launch_run.build_model(config, router)
    resuming = resume and any((run_dir / "checkpoints").glob("step_*"))
    if source and not resuming:  # before the optimizer copies any weight
        init_from_run(model, config, Path(source))
    if config.train.gradient_checkpointing:
        log.info("gradient checkpointing on %s", launch_run.enable_gradient_checkpointing(model))
    device = distributed.resolve_device(config)
    if not config.deepspeed.enabled:
        model.to(device)  # (DeepSpeed moves it to the engine's device)
    datasets = {name: router.dataset(name, "train", model) for name in router.tasks}
    for name, dataset in datasets.items():
        if not router[name].scorable(dataset.records):
            raise DataError(
                f"task {name}: its train split ({router[name].split_name('train')}) has no "
                "annotations to train on (a test split for an evaluation server?)"
            )
        dataset.check_features()  # once per process, before the workers fork
    launch_run.check_eval_features(router, config, model)
    selector = Selector(run_dir, config.eval.select, voters(router))
    selector.check(model, router, config.eval.max_records)
    sampler = MultitaskSampler(
        {n: len(d) for n, d in datasets.items()},
        {n: router[n].config.batch_size for n in datasets},
        SamplerConfig(**vars(config.sampler)),
        rank=rank,
        world_size=world,
    )
    micro = max(router[n].config.batch_size for n in router.tasks)
    stepper = engine.build_stepper(config, model, world, device, micro)
    if stepper.engine is not None:
        device = distributed.resolve_device(config, stepper.engine)
    if config.train.compile:  # on the device (its backend's tool chain is checked for it); in
        # place: names, state dicts and checkpoints stay the eager ones
        compile_model(model, config.train.compile_mode, config.train.compile_backend)
    resora = vlpeft.ReSoRAConfig(**config.resora) if config.resora else None
    if resora and resora.samples != "weight":
        vlpeft.enable_resora(model)  # the recorder keeps each training forward's activations
    return Run(config, run_dir, rank, world, router, model, datasets, sampler, stepper, selector,
               resora, device)  # fmt: skip


def init_from_run(model, config: TrainConfig, source: Path) -> None:
    """Loads a finished run's adapters and trained tensors into ``model`` (``train.init_from``),
    refusing a run of another family, preset or adapter layout."""
    earlier = launch_run.finished_run_config(source, "train.init_from")
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


def resume_or_start(run: Run, resuming: bool, changed: dict) -> None:
    """Loads the newest intact checkpoint when resuming (the config's allowed ``changed`` keys are
    appended to ``config_history.jsonl``); writes the resolved config (rank 0)."""
    if resuming:
        checkpoint = checkpoints.choose_checkpoint(run.run_dir, run.rank, run.world)
        state = checkpoints.load_checkpoint(
            checkpoint, run.model, run.optimizer, run.scheduler, run.engine, run.rank
        )
        run.step, run.position = state["step"], tuple(state["position"])
        run.skipped, run.last_finite_loss = state.get("skipped", 0), state.get("last_finite_loss")
        run.earlier_seconds = state.get("train_seconds", 0.0)
        run.stepper.load_state_dict(state)
        engine.apply_optimizer_settings(run.optimizer, run.config)
        run.selector.load_state_dict(state)
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


def log_step(run: Run, losses: tuple, per_task: dict, logger, bar, clock) -> None:
    """The step's losses (averaged over the processes), the learning rate, the skip and
    overflow counters, and the clock's figures since the last log."""
    loss, penalty = losses
    value = distributed.global_mean(loss, run.world)
    values = {"train/loss": value, "train/lr": run.scheduler.get_last_lr()[0]}
    for task, task_loss in per_task.items():  # the same tasks on every rank
        values[f"train/loss_{task}"] = distributed.global_mean(task_loss, run.world)
    if run.resora:
        values["train/resora"] = penalty.item()
    if run.config.train.on_nonfinite == "skip":
        values["train/skipped"] = run.skipped
    values.update(run.stepper.log_values())
    values.update(clock.report())
    logger.log(run.step, values)
    bar.set_postfix(task=",".join(per_task), loss=f"{value:.3f}")


def checkpoint_and_validate(run: Run, logger, rank0) -> None:
    """The checkpoint and the validation the config's intervals ask for at this step."""
    config, step = run.config, run.step
    if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
        counters = {"skipped": run.skipped, "last_finite_loss": run.last_finite_loss,
                    "train_seconds": round(run.train_seconds(), 3),
                    **run.stepper.state_dict(), **run.selector.state_dict()}  # fmt: skip
        try:
            checkpoints.save_checkpoint(
                run.run_dir, step, run.model, run.optimizer, run.scheduler, run.position,
                config.train.keep_checkpoints, run.engine, run.rank, run.world, counters,
            )  # fmt: skip
        except OSError as err:  # a full disk, a lost mount: the previous checkpoint is untouched
            previous = sorted((run.run_dir / "checkpoints").glob("step_*"))
            kept = f"{previous[-1]} is intact (--resume continues from it)" if previous else (
                "no earlier checkpoint exists")  # fmt: skip
            raise RunError(
                f"step {step}: the checkpoint could not be written ({err}); {kept}"
            ) from err
        if run.rank == 0:
            run.selector.prune()
    if config.eval.val_every and step % config.eval.val_every == 0:
        validate(run, logger, rank0)


def validate(run: Run, logger, rank0) -> None:
    """Evaluates the val splits at this step (rank 0) and lets ``eval.select`` keep what wins.
    The random states are the training's again afterwards — validation's data loaders and a
    ZeRO-3 replica's first build draw from them — so a run continues as it would without it
    (a resumed run skips or repeats validations)."""
    config, step = run.config, run.step

    def work(model) -> None:
        records = run_evaluation(model, run.router, config, run.run_dir, ["val"], logger, step)
        run.selector.update(step, records, model)

    devices = [run.device] if run.device.type == "cuda" else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        rank0.run(work)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    run.model.train()


def finish(run: Run, model, seconds: float, logger) -> dict:
    """Loads the selected weights (``eval.select``), saves the adapters, evaluates the test
    splits, writes run.json and leaderboard.md."""
    config, run_dir = run.config, run.run_dir
    selected = run.selector.apply(model)
    vlpeft.save_adapter(model, run_dir / "adapters")
    records = run_evaluation(
        model, run.router, config, run_dir, config.eval.splits, logger, run.step
    )
    results = {}
    for key, record in records.items():
        results[key] = record["headline"]
        for evaluator, score in (record.get("reference") or {}).items():
            results[reference_key(key, evaluator)] = score  # scored by a reference's rules
    trainable, total_params = vlpeft.count_parameters(model)
    summary = {
        "run": run_dir.name, "family": config.model.family, "preset": config.model.preset,
        "method": launch_run.method_name(config), "trainable": trainable, "total": total_params,
        "processes": run.world, "deepspeed": config.deepspeed.enabled,
        "train_seconds": round(seconds, 1), "steps": run.step, "steps_skipped": run.skipped,
        "select": config.eval.select, "selected": selected,
        "results": results,
        "metrics": {key: record["metric"] for key, record in records.items()},
        # what each score was computed on: the leaderboard compares only the same evaluation
        "evaluations": {key: record["data"] for key, record in records.items()},
        "weights": getattr(model, "weight_sources", {}), "init_from": config.train.init_from,
    }  # fmt: skip
    write_json(run_dir / "run.json", summary)
    markdown = render_markdown([summary])
    atomic_write(run_dir / "leaderboard.md", lambda t: Path(t).write_text(markdown))
    return summary


def run_evaluation(
    model, router, config: TrainConfig, run_dir: Path, splits, logger, step: int
) -> dict:
    """Evaluates every task on ``splits``; logs the headlines and returns the score records
    (:func:`evaluation.evaluate.evaluate_task`) by ``"<task>/<split>"``."""
    records = evaluate_all(model, router, splits, run_dir / "eval", config.eval)
    for record in records.values():
        if record["headline"] is not None:  # None: an evaluation server scores that split
            name = f"{record['split']}/{record['task']}_{record['metric']}"
            logger.log(step, {name: record["headline"]})
    return records


def report(summary: dict, run_dir: Path) -> str:
    """What the end of a run prints: where it is, its scores, how long it trained."""
    seconds = summary["train_seconds"]
    lines = [
        f"finished {run_dir}: {summary['steps']} steps in {seconds:.1f} s "
        f"({seconds / 3600:.2f} h; resumes included)"
    ]
    for key, value in summary["results"].items():
        shown = "scored by the evaluation server (see eval/)" if value is None else f"{value:.2f}"
        lines.append(f"  {key}: {shown}")
    if not summary["results"]:
        lines.append("  no evaluation (eval.splits is empty)")
    lines.append(f"summary: {run_dir / 'run.json'}, table: {run_dir / 'leaderboard.md'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m launch.train",
        description="Multitask PEFT training (one process, or several under torchrun / deepspeed: "
        "DistributedDataParallel, or DeepSpeed with deepspeed.enabled=true).",
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
    args = parser.parse_intermixed_args(argv)  # options before or after the overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_dir = args.out or Path("runs") / args.config.stem
    try:
        if args.validate:
            return launch_run.validate_config(args.config, args.overrides, args.stage)
        config = load_config(args.config, args.overrides, stage=args.stage)
        summary = train(config, run_dir, args.resume, args.allow_change)
        if summary:  # rank 0
            print(report(summary, run_dir), flush=True)
        return summary
    except (ConfigError, RunError, DataError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
