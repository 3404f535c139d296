"""The optimisation step: optimizer, schedule, the DeepSpeed engine, and one stepper per backend.

:func:`build_stepper` makes AdamW with transformers' linear warm-up schedule and wraps them in
the run's backend — :class:`PlainStepper` (fp32/bf16), :class:`ScalerStepper` (fp16 with a
GradScaler), either of them under several processes without DeepSpeed wrapped in PyTorch's
``DistributedDataParallel`` (:class:`DDP`), or :class:`DeepSpeedStepper` — behind one interface: ``backward`` of a weighted
loss, ``update`` at the end of the step (which reports a non-finite gradient instead of acting
on it), ``skip``. :func:`train_step` runs one step on accumulated micro-batches and handles every
non-finite value in one place (:func:`on_nonfinite`: stop, or skip the step). ``run`` below is
the training run's state (:class:`launch.train.Run`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import pickle
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import get_linear_schedule_with_warmup

import vlpeft
from launch import distributed
from launch.config import ConfigError, RunError, TrainConfig, read_json

log = logging.getLogger("vlpeft.train")
REPO = Path(__file__).resolve().parent.parent
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
MIN_LOSS_SCALE = 1e-4  # fp16: a loss scale driven below this by overflows means non-finite values


class NonFiniteError(RunError):
    """A non-finite loss or gradient norm stopped the run (``train.on_nonfinite: stop``)."""


# -- optimizer and schedule -----------------------------------------------------------------------
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


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """The config's ``adam_eps`` and ``weight_decay`` on a restored optimizer (a checkpoint's
    param groups carry the values they were saved with; a resume may change them with
    ``--allow-change``). The groups are :func:`param_groups`': decay, then no decay."""
    for index, group in enumerate(optimizer.param_groups):
        group["eps"] = config.train.adam_eps
        group["weight_decay"] = config.train.weight_decay if index == 0 else 0.0


def warmup_steps(steps: int, warmup: float) -> int:
    """The number of warm-up steps: a fraction of ``steps`` when ``warmup`` < 1, else a count."""
    return int(warmup * steps) if warmup < 1 else int(warmup)


def linear_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float):
    """transformers' linear warm-up from 0 then linear decay to 0 (the papers' schedule)."""
    return get_linear_schedule_with_warmup(optimizer, warmup_steps(steps, warmup), steps)


# -- DeepSpeed ------------------------------------------------------------------------------------
def deepspeed_config(config: TrainConfig, world: int, micro: int = 1) -> dict:
    """The ds_config JSON with "auto" filled from our config (one source of truth); a value the
    JSON sets that contradicts our config is an error naming both."""
    path = resolve_ds_path(config.deepspeed.config)
    ds = read_json(path, ConfigError)
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed.config {path}: expected a JSON object")
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
    for name, adapter_set in config.adapter_sets().items():  # each method knows its limits
        problem = adapter_set.method.deepspeed_problem(stage)
        if problem:
            raise ConfigError(
                f"deepspeed.config {path}: ZeRO stage {stage}, adapter set {name!r} "
                f"({adapter_set.method.method}): {problem}"
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


# -- the steppers ---------------------------------------------------------------------------------
@dataclasses.dataclass
class NonFinite:
    """What a step found non-finite: its name, its value, whether the step can still be dropped."""

    what: str
    value: object
    can_skip: bool = True


class PlainStepper:
    """The plain PyTorch step (fp32, bf16 autocast): backward, clip, AdamW, schedule.

    ``forward`` is what the batches go through: the model, DDP's wrapper of it (which averages
    the gradients over the processes in backward) or DeepSpeed's engine."""

    engine = None  # DeepSpeed's engine (DeepSpeedStepper)

    def __init__(self, model, optimizer, scheduler, grad_clip: float | None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self._forward, self._rewrap = model, False
        self.clip = grad_clip if grad_clip is not None else float("inf")
        self.overflows = 0  # fp16 steps the loss scaler skipped (ScalerStepper)

    def wrap_ddp(self, device: torch.device) -> None:
        """Several processes without DeepSpeed: the batches go through
        ``DistributedDataParallel``, whose backward averages the gradients over the processes
        (gloo on the CPU, NCCL on GPUs) — so each rank's step is the one a single process takes
        on the global batch. Every micro-batch synchronises (a skipped one's forward must not
        leave DDP waiting for its backward, see :meth:`discard`); unused parameters are expected:
        a step trains only its task's adapter set."""
        self.device = device
        self._forward = DDP(
            self.model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    @property
    def forward(self):
        """What the batches go through (see the class); a DDP wrapper :meth:`discard` dropped is
        made anew here, once the dropped step's graph (which holds the old one's hooks) is gone."""
        if self._rewrap:
            self._rewrap, self._forward = False, None
            gc.collect()  # the old wrapper's gradient hooks go with it
            self.wrap_ddp(self.device)
        return self._forward

    def discard(self, loss: torch.Tensor | None, world: int) -> None:
        """Ends the backward DDP waits for after a forward whose loss is dropped (non-finite): a
        zero-weighted backward on every rank; the step then drops the gradients (:meth:`skip`).
        Where a rank's forward raised (no loss), no backward can match on every rank: each rank
        wraps the model anew before the next forward instead, which forgets the pending backward
        (the weights are the same on every rank)."""
        if not isinstance(self._forward, DDP):
            return
        if distributed.all_ranks_agree(loss is not None and loss.requires_grad, world):
            (loss * 0.0).backward()
        else:
            self._rewrap = True

    def can_skip(self, index: int) -> bool:
        """Whether a non-finite micro-batch ``index`` of the step can still drop the step."""
        return True

    def backward(self, loss: torch.Tensor, weight: float, count: int) -> None:
        (loss * weight).backward()

    def clip_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.nn.utils.clip_grad_norm_(params, self.clip)

    def update(self) -> NonFinite | None:
        """Applies the step, or returns what is non-finite without applying it."""
        norm = self.clip_norm()
        if not torch.isfinite(norm):
            return NonFinite("the gradient norm", norm.item())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def skip(self) -> None:
        """Drops the step's gradients; the schedule advances (the run still ends at
        train.steps — under DeepSpeed too: the engine holds the same scheduler)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def log_values(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {"overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.overflows = state.get("overflows", 0)


class ScalerStepper(PlainStepper):
    """fp16 in the plain loop: a GradScaler scales the loss; an overflowing step is skipped by the
    scaler, counted, and holds the schedule (as DeepSpeed's fp16 does); a scale driven below
    :data:`MIN_LOSS_SCALE` is divergence, not overflow."""

    def __init__(self, model, optimizer, scheduler, grad_clip, device: torch.device) -> None:
        super().__init__(model, optimizer, scheduler, grad_clip)
        self.scaler = torch.amp.GradScaler(device.type)

    def backward(self, loss: torch.Tensor, weight: float, count: int) -> None:
        self.scaler.scale(loss * weight).backward()

    def update(self) -> NonFinite | None:
        self.scaler.unscale_(self.optimizer)
        norm = self.clip_norm()
        overflow = not torch.isfinite(norm)
        if overflow:
            self.overflows += 1
            scale = self.scaler.get_scale()
            if scale < MIN_LOSS_SCALE:
                return NonFinite(f"the gradient norm at loss scale {scale:g}", norm.item(), False)
        self.scaler.step(self.optimizer)  # skips the update itself on overflow
        self.scaler.update()
        if not overflow:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def log_values(self) -> dict:
        return {
            "train/overflow_skipped": self.overflows,
            "train/loss_scale": self.scaler.get_scale(),
        }

    def state_dict(self) -> dict:
        return {**super().state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class DeepSpeedStepper(PlainStepper):
    """DeepSpeed's engine: it averages gradients over the processes, accumulates, clips and
    steps; fp16 overflows are its loss scaler's to skip."""

    def __init__(self, engine, optimizer, scheduler) -> None:
        super().__init__(engine.module, optimizer, scheduler, None)
        self.engine = self._forward = engine

    def can_skip(self, index: int) -> bool:
        # the engine has taken earlier micro-batches' gradients: a later one cannot be dropped
        return index == 0

    def backward(self, loss: torch.Tensor, weight: float, count: int) -> None:
        self.engine.backward(loss * weight * count)  # it divides by the accumulation steps
        self.engine.step()  # applies the update at the accumulation boundary only

    def update(self) -> NonFinite | None:
        norm = self.engine.get_global_grad_norm()  # fp16: the loss scaler skips overflows itself
        bad = norm is not None and not math.isfinite(float(norm)) and not self.engine.fp16_enabled()
        if bad:  # the engine applied it: nothing to skip
            return NonFinite("the gradient norm (DeepSpeed applied the step)", norm, False)
        return None

    def log_values(self) -> dict:
        if self.engine.fp16_enabled():  # normal: the scaler's overflows
            return {"train/overflow_skipped": self.engine.skipped_steps}
        return {}


def build_stepper(config: TrainConfig, model, world: int, device: torch.device, micro: int):
    """AdamW (no decay on biases and norms) with the linear warm-up schedule, in the backend the
    config asks for; ``micro`` is the largest task batch (DeepSpeed's reporting batch size)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, config.train.weight_decay), lr=config.train.lr,
        eps=config.train.adam_eps,
    )  # fmt: skip
    scheduler = linear_schedule(optimizer, config.train.steps, config.train.warmup)
    if config.deepspeed.enabled:
        import deepspeed  # heavy and optional: only DeepSpeed runs load it

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(config, world, micro),
        )  # fmt: skip
        load_deepspeed_state_safely(engine)
        return DeepSpeedStepper(engine, optimizer, scheduler)
    if config.train.precision == "fp16":
        stepper = ScalerStepper(model, optimizer, scheduler, config.train.grad_clip, device)
    else:
        stepper = PlainStepper(model, optimizer, scheduler, config.train.grad_clip)
    if world > 1:
        stepper.wrap_ddp(device)
    return stepper


# -- one step -------------------------------------------------------------------------------------
def on_nonfinite(run, task: str, found: NonFinite) -> None:
    """Stops the run with a clear error (``on_nonfinite: stop``, or a step that cannot be undone),
    or drops the step and counts it (``skip``)."""
    train = run.config.train
    if train.on_nonfinite == "skip" and found.can_skip:
        run.skipped += 1
        log.warning(
            "step %d (task %s): %s is %s; step skipped", run.step + 1, task, found.what, found.value
        )
        run.stepper.skip()
        run.step += 1
        if run.skipped > train.max_skipped_share * train.steps:  # it can only grow from here
            raise NonFiniteError(
                f"step {run.step} (task {task}): {run.skipped} of the run's {train.steps} steps "
                f"skipped for non-finite values, more than train.max_skipped_share "
                f"({train.max_skipped_share}): the run is not training. A lower train.lr or "
                "train.grad_clip usually cures a diverging run"
            )
        return
    last = "none yet" if run.last_finite_loss is None else f"{run.last_finite_loss:.4g}"
    raise NonFiniteError(
        f"step {run.step + 1} (task {task}): {found.what} is {found.value}; last finite loss "
        f"{last}. The run stopped, its last checkpoint is intact (train.on_nonfinite: skip drops "
        "such steps instead; a lower train.lr or train.grad_clip usually cures a diverging run)"
    )


def skipped_losses(micro_batches) -> tuple[tuple, dict]:
    """What a skipped step logs: a NaN loss (written as null) for it and each of its tasks."""
    nan = torch.full((), float("nan"))
    return (nan, torch.zeros(())), {task: nan for task, _ in micro_batches}


def forward_loss(run, task: str, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(task loss, ReSoRA penalty) of one batch of ``task`` under the run's autocast."""
    run.router.activate(run.model, task)
    dtype = AUTOCAST.get(run.config.train.precision)
    with torch.autocast(run.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = run.stepper.forward(distributed.to_device(batch, run.device)).loss
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


def train_step(run, micro_batches: list[tuple[str, dict]]) -> tuple[tuple, dict]:
    """One optimisation step on ``train.grad_accum`` consecutive sampler batches, their losses
    weighted by :func:`micro_batch_weights`: returns the mean (task loss, ReSoRA penalty) and
    each task's mean loss, detached. A non-finite loss or gradient norm stops the run or skips
    the step (``on_nonfinite``)."""
    stepper, count = run.stepper, len(micro_batches)
    losses: dict[str, list[torch.Tensor]] = {}
    penalties = []
    weights = micro_batch_weights(micro_batches)
    for i, (task, batch) in enumerate(micro_batches):
        total = None
        try:
            loss, penalty = forward_loss(run, task, batch)
            total = loss + penalty
            value = total.item()  # one host sync: the value and its finiteness
            finite = math.isfinite(value)
        except FloatingPointError as err:  # a model that refuses non-finite values (BLIP's ITC)
            finite, value = False, f"non-finite ({err})"
        if not distributed.all_ranks_agree(finite, run.world):
            stepper.discard(total, run.world)  # DDP's pending backward, before skip() drops grads
            on_nonfinite(run, task, NonFinite("the loss", value, stepper.can_skip(i)))
            return skipped_losses(micro_batches)
        stepper.backward(total, weights[i], count)
        losses.setdefault(task, []).append(loss.detach())
        penalties.append(penalty.detach())
        run.last_finite_loss = value
    found = stepper.update()
    if not distributed.all_ranks_agree(found is None, run.world):
        found = found or NonFinite("the gradient norm (on another process)", None, False)
        on_nonfinite(run, task, found)
        return skipped_losses(micro_batches)
    run.step += 1
    every = [value for values in losses.values() for value in values]
    means = (torch.stack(every).mean(), torch.stack(penalties).mean())
    return means, {t: torch.stack(v).mean() for t, v in losses.items()}
