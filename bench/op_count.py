"""Operators per adapted layer: one forward + backward, counted at the ATen dispatcher.

``python -m bench.op_count`` writes ``bench/results/op_count.json`` and ``.md``: for each method, the
operators one adapted ``nn.Linear`` adds to one forward + backward of the bare layer, against peft's
LoRA on the same layer at the same rank. On a GPU each counted operator is (at least) one kernel
launch, which is what bounds a small adapter's step time there; the count itself is the same on
every device, so it is measured on the CPU.

What is counted: every ATen operator the eager forward and backward dispatch (a
``TorchDispatchMode`` sees each one once), except the view and metadata operators that launch no
kernel (``FREE``). The input x requires grad (an inner layer: its gradient is accumulated from the
base layer and the adapter); x_R of routed methods is a frozen feature (no gradient); parameter
gradients start as None (``zero_grad(set_to_none=True)``). Two figures per method:

- ``step``: the first forward + backward after the parameters changed (what a training step pays);
- ``repeat``: a further forward + backward with the same parameters (a second call of the layer in
  the same step, gradient accumulation, and — forward only — evaluation), which can reuse factors
  cached from frozen and unchanged tensors.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import vlpeft
from bench.common import machine, write
from vlpeft.adapters import AdapterConfig, FLoRAConfig, LoRAConfig, NullLoRAConfig

# operators that only make a view or read metadata: no kernel
FREE = frozenset(
    "view _unsafe_view t transpose expand as_strided detach alias unsqueeze squeeze permute "
    "slice select split split_with_sizes _reshape_alias reshape unbind lift_fresh narrow "
    "diagonal view_as unsqueeze_ squeeze_ t_ transpose_ ones_like".split()
)  # ones_like: the seed gradient of the counted backward itself


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the ``with`` block by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.ops.items()) if k not in FREE}

    @property
    def total(self) -> int:
        return sum(self.kernels().values())


D, TOKENS, RANK = 64, 10, 8


def base_linear() -> nn.Sequential:
    torch.manual_seed(0)
    lin = nn.Linear(D, D)
    with torch.no_grad():  # a rank deficiency of RANK // 2: Null-LoRA gets rank RANK exactly
        u, s, vh = torch.linalg.svd(lin.weight)
        s[-RANK // 2 :] = 0
        lin.weight.copy_(u @ torch.diag(s) @ vh)
    return nn.Sequential(lin)


def method_configs() -> dict[str, Callable[[], object]]:
    """Name → config factory of each counted method (peft's LoRA is built separately)."""
    return {
        "lora": lambda: LoRAConfig(targets=["0"], r=RANK),
        "null-lora": lambda: NullLoRAConfig(targets=["0"]),
        "flora": lambda: FLoRAConfig(targets=["0"], r=RANK),
        "adapter": lambda: AdapterConfig(targets=["0"], bottleneck=RANK),
        "routed-lora": lambda: LoRAConfig(targets=["0"], r=RANK, routing="proj"),
        "routed-lora-mul": lambda: LoRAConfig(targets=["0"], r=RANK, routing="mul"),
    }


def adapted(method: str | None) -> nn.Module:
    """The counted module: the bare layer (None), peft's LoRA or a vlpeft method on it, with a
    non-zero update (B = 0 would let no kernel be skipped, but the counts must not depend on it)."""
    net = base_linear()
    if method is None:
        return net.requires_grad_(False)
    if method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"]))
    else:
        vlpeft.add_adapter(net, method_configs()[method]())
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return net


def _one(net: nn.Module, x: torch.Tensor, x_r: torch.Tensor) -> OpCounter:
    for p in net.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    with OpCounter() as counter:
        with vlpeft.routing_inputs(net, x_r):
            y = net(x)
        y.backward(torch.ones_like(y))
    return counter


def count_layer(method: str | None) -> dict[str, object]:
    """Operators of one forward + backward of the adapted layer (``step`` and ``repeat``)."""
    net = adapted(method)
    g = torch.Generator().manual_seed(1)
    x, x_r = torch.randn(2, TOKENS, D, generator=g), torch.randn(2, D, generator=g)
    step = _one(net, x, x_r)
    repeat = _one(net, x, x_r)
    with torch.no_grad():  # an optimizer step: every trainable tensor changes in place
        for p in net.parameters():
            if p.requires_grad:
                p.mul_(1.01)
    after = _one(net, x, x_r)
    assert after.total == step.total, (method, after.kernels(), step.kernels())
    return {"step": step.total, "repeat": repeat.total, "ops": step.kernels()}


def per_layer_counts(methods: list[str] | None = None) -> dict[str, dict]:
    """Method → {step, repeat, ops}: what the adapter adds to the bare layer's forward + backward."""
    base = count_layer(None)
    methods = methods or ["peft-lora", *method_configs()]
    out = {}
    for method in methods:
        row = count_layer(method)
        row["step"] -= base["step"]
        row["repeat"] -= base["repeat"]
        out[method] = row
    return out


def markdown(result: dict) -> str:
    counts = result["counts"]
    peft = counts["peft-lora"]["step"]
    lines = [
        "# Operators per adapted layer, one forward + backward (ATen dispatcher, eager)",
        "",
        f"nn.Linear({D}, {D}), input (2, {TOKENS}, {D}) with grad, rank {RANK}; x_R frozen; "
        "views excluded. `step`: the first forward + backward after the parameters changed; "
        "`repeat`: another with the same parameters. Target (issue #18): Null-LoRA and routed "
        f"LoRA ≤ peft LoRA + 2 = {peft + 2}.",
        "",
        "| method | step | repeat | step − peft | target | operators (step) |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in counts.items():
        target = (
            f"≤ {peft + 2}" if method in ("null-lora", "routed-lora", "routed-lora-mul") else ""
        )
        verdict = ("met" if row["step"] <= peft + 2 else "MISSED") if target else ""
        ops = ", ".join(f"{k} {v}" for k, v in row["ops"].items())
        lines.append(
            f"| {method} | {row['step']} | {row['repeat']} | {row['step'] - peft:+d} | "
            f"{target} {verdict} | {ops} |"
        )
    lines.append("")
    lines.append("`operators` lists the whole counted forward + backward, the bare layer's two "
                 "(its addmm and its input-gradient mm) included.")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    result = {"machine": machine("cpu"), "dim": D, "tokens": TOKENS, "rank": RANK}
    result["counts"] = per_layer_counts()
    write("op_count", result, markdown(result))
    return result


if __name__ == "__main__":
    main()
