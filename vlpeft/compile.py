"""``torch.compile`` for adapted models: the whole model, or each adapted layer's adapter branch.

:func:`compile_model` compiles in place (``nn.Module.compile``), so parameter names, state dicts,
``save_adapter`` / ``load_adapter``, checkpoints and DeepSpeed see the same module as in eager
mode. Two modes:

- ``"model"``: the model's own ``forward`` is compiled — one graph per model (graph breaks where a
  backbone's Python control flow asks for them), the base layers fused with the adapters.
- ``"adapters"``: each adapter module of each adapted layer is compiled on its own — small graphs
  (one per distinct layer shape and method, shared by the layers of one shape), the backbone stays
  eager. It fuses what an adapter's branch launches (Null-LoRA's factor products, the routing
  functions' elementwise operators) and is quick to compile.

Which wins depends on the model and the device (``bench/adapters.py`` measures both on a GPU).
Compiled forwards give the same outputs and gradients as eager ones to floating-point reordering
(``tests/test_compile.py``, every method, ``backend="aot_eager"``).

Where the backend cannot run here — an unknown name, inductor without a C++ compiler on the CPU or
without triton on a GPU — the model is returned unchanged (eager) with a logged warning saying
why; ``strict=True`` raises instead. With ``probe=True`` (default) a one-line function is compiled
and run first, so a broken tool chain is found at this call, not at the first training step.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable

import torch
from torch import nn

from .adapters.base import adapted_layers

log = logging.getLogger(__name__)

MODES = ("model", "adapters")

__all__ = ["MODES", "CompileUnavailable", "backend_problem", "compile_model"]


class CompileUnavailable(RuntimeError):
    """The requested backend cannot compile on this machine (raised with ``strict=True``)."""


def backend_problem(backend: str | Callable, device: torch.device | str = "cpu") -> str | None:
    """Why ``backend`` cannot compile for ``device`` here, or None when nothing is known against it
    (a cheap check: the backend is registered and inductor's tool chain is present)."""
    device = torch.device(device)
    if callable(backend):  # a backend function (torch.compile's own form): nothing to look up
        return None
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        return f"unknown torch.compile backend {backend!r} (available: {', '.join(known)})"
    if backend != "inductor":
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor on CUDA needs triton, which is not installed"
    if device.type == "cpu":
        try:
            from torch._inductor import cpp_builder

            compiler = cpp_builder.get_cpp_compiler()
        except Exception as error:  # noqa: BLE001 - any failure means: no usable compiler
            return f"inductor on the CPU needs a C++ compiler: {error}"
        if shutil.which(compiler) is None and not os.path.isfile(compiler):
            return f"inductor on the CPU needs a C++ compiler; {compiler!r} is not on PATH"
    return None


def _probe(backend: str | Callable, device: torch.device, options: dict | None) -> str | None:
    """Compiles and runs a one-line function with ``backend``: the error it raises, or None."""

    def tiny(x: torch.Tensor) -> torch.Tensor:  # a GEMM, a pointwise chain, an activation
        return torch.relu(torch.sin(x) @ x.T) * 2 + 1

    try:
        compiled = torch.compile(tiny, backend=backend, options=options, dynamic=False)
        x = torch.linspace(-1, 1, 16, device=device).view(4, 4)
        if not torch.allclose(compiled(x), tiny(x)):
            return f"backend {backend!r} computed a wrong result in the probe"
    except Exception as error:  # noqa: BLE001 - the probe exists to turn any failure into a message
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
        return (
            f"backend {name!r} failed to compile a probe function: {type(error).__name__}: {first}"
        )
    # (no torch._dynamo.reset(): it would drop every graph compiled in this process, other
    # models' too; the probe's one small graph stays in dynamo's cache)
    return None


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def compile_model(
    model: nn.Module,
    mode: str = "model",
    backend: str | Callable = "inductor",
    *,
    fullgraph: bool = False,
    dynamic: bool | None = None,
    options: dict | None = None,
    probe: bool = True,
    strict: bool = False,
) -> nn.Module:
    """Compiles ``model`` in place with ``torch.compile`` and returns it.

    Args:
        model: an adapted model (any ``nn.Module``; ``mode="adapters"`` needs adapters in it).
        mode: ``"model"`` (the model's forward) or ``"adapters"`` (each adapter module's forward).
        backend: a ``torch.compile`` backend: ``"inductor"`` (fused kernels), ``"aot_eager"``
            (AOT autograd without code generation: what the CPU tests use), ``"cudagraphs"``,
            ..., or a backend function.
        fullgraph: refuse graph breaks (an error at the first call instead of a split graph).
        dynamic: ``torch.compile``'s ``dynamic`` (None: dynamic shapes after the first recompile,
            e.g. when the sequence length changes).
        options: inductor options (``{"triton.cudagraphs": True}``, ...).
        probe: compile and run a one-line function first, so a missing tool chain shows here.
        strict: raise :class:`CompileUnavailable` instead of warning and staying eager.

    Returns:
        ``model`` itself: compiled, or unchanged (eager) when the backend cannot run here.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = vlpeft.add_adapter(net, vlpeft.LoRAConfig(targets=["0"], r=2))
        >>> compile_model(net, mode="adapters", backend="aot_eager") is net
        True
    """
    if mode not in MODES:
        raise ValueError(f"compile_model: mode must be one of {list(MODES)}, got {mode!r}")
    adapters = [a for _, layer in adapted_layers(model) for a in layer.adapters.values()]
    if mode == "adapters" and not adapters:
        raise ValueError("compile_model(mode='adapters'): the model has no adapters to compile")
    device = _device_of(model)
    problem = backend_problem(backend, device)
    if problem is None and probe:
        problem = _probe(backend, device, options)
    if problem is not None:
        if strict:
            raise CompileUnavailable(problem)
        log.warning("compile_model: %s; the model runs eager (not compiled)", problem)
        return model
    kwargs = {"backend": backend, "fullgraph": fullgraph, "dynamic": dynamic, "options": options}
    targets = [model] if mode == "model" else adapters
    for module in targets:
        module.compile(**kwargs)
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
    log.info("compile_model: %s compiled with %s (%d module(s))", mode, name, len(targets))
    return model
