"""DeepSpeed engine step against the plain PyTorch loop, same model, one process.

``python -m bench.deepspeed_step [--stage 2]``: BART-base size with vlpeft LoRA (r=8, q/v), one
training step = forward, backward, gradient clipping, AdamW step — through ``deepspeed.initialize``
with the launcher's ``launch/ds_zero<stage>.json`` (its "auto" values filled the launcher's way)
and through the plain loop of ``launch.train``. Writes ``bench/results/deepspeed_step.json`` and
``.md``. Target: engine / plain ≤ 1.05.
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.adapters import Step, bart_base, inputs, with_method
from bench.common import machine, paired, report, write
from launch.config import load_config
from launch.distributed import distributed_env
from launch.engine import deepspeed_config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=2, choices=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    import deepspeed  # heavy and optional

    distributed_env()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    device = "cpu"
    base = with_method(bart_base(), "bart-base", "lora").train()
    batch = inputs("bart-base", args.batch, device, 0)

    plain = Step("bart-base", copy.deepcopy(base), batch, "fp32")
    clip = [p for p in plain.model.parameters() if p.requires_grad]

    def plain_step() -> None:
        loss = plain.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
        plain.optimizer.step()
        plain.optimizer.zero_grad(set_to_none=True)

    model = copy.deepcopy(base)
    config = load_config(
        None,
        data={"model": {"family": "clip-bart"}, "data": {"file": "-", "tasks": {"t": {}}},
              "deepspeed": {"enabled": True, "config": f"launch/ds_zero{args.stage}.json"}},
    )  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(config, 1, args.batch)
    )

    def engine_step() -> None:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()

    ratio, engine_s, plain_s = paired(engine_step, plain_step, device, args.repeats, 2)
    result = {"machine": machine(device), "stage": args.stage, "batch": args.batch,
              "plain_s": plain_s, "engine_s": engine_s, "ratio": ratio}  # fmt: skip
    m = result["machine"]
    markdown = report(
        f"DeepSpeed engine step vs plain loop ({m['cores']}-core CPU, one process, gloo)",
        f"BART-base size, vlpeft LoRA r=8 on q/v, batch {args.batch}; ZeRO-{args.stage} "
        f"(`launch/ds_zero{args.stage}.json`); median ratio of {args.repeats} alternating pairs "
        "after warm-up.",
        [("engine step / plain loop", "≤ 1.05",
          f"{ratio:.3f} ({engine_s:.3f} s / {plain_s:.3f} s)", ratio, 1.05)],
    )  # fmt: skip
    write(f"deepspeed_step_zero{args.stage}", result, markdown)
    return result


if __name__ == "__main__":
    main()
