"""Operators per adapted layer (issue #18), counted at the ATen dispatcher for one forward +
backward of one adapted nn.Linear (``bench/op_count.py``: views excluded, x with grad, x_R
frozen). Counts, not times: they are the same on every machine, and each is at least one kernel
launch on a GPU. The bounds are the counts reached; a change that adds operators to a method's
layer fails here and says which."""

import pytest
import torch

from bench.op_count import OpCounter, per_layer_counts

# the target: Null-LoRA and routed LoRA within peft LoRA + 2 (see BENCHMARKS.md for where
# a figure is above it and why); every bound below is the count reached (≤, so fewer passes)
STEP_BOUND = {
    "lora": 7,
    "null-lora": 15,
    "flora": 13,
    "adapter": 12,
    "routed-lora": 15,
    "routed-lora-mul": 12,
}
REPEAT_BOUND = {"lora": 7, "null-lora": 15, "routed-lora": 15}


@pytest.fixture(scope="module")
def counts():
    return per_layer_counts(["peft-lora", *STEP_BOUND])


def test_the_counter_sees_each_operator_once_and_no_views():
    x = torch.randn(4, 3, requires_grad=True)
    with OpCounter() as counter:
        y = (x.T @ x).sum()
        y.backward()
    assert counter.kernels().get("mm") == 3  # forward, and one for each operand's gradient
    assert "t" not in counter.kernels() and counter.ops["t"] >= 1


def test_peft_lora_reference_count(counts):
    # peft: A, B, the scaling and the add forward; their gradients and two accumulations backward
    assert counts["peft-lora"]["step"] == 10


@pytest.mark.parametrize("method", list(STEP_BOUND))
def test_operators_per_adapted_layer(counts, method):
    row = counts[method]
    assert row["step"] <= STEP_BOUND[method], row["ops"]
    if method in REPEAT_BOUND:
        assert row["repeat"] <= REPEAT_BOUND[method], row["ops"]


def test_vlpeft_lora_is_below_peft(counts):
    assert counts["lora"]["step"] < counts["peft-lora"]["step"]


def test_null_lora_is_lora_plus_its_factor_build(counts):
    # LoRA's two GEMMs and an add (peft's count) plus the 5 operators that build A_eq, B_eq from
    # the parameters at every forward (never cached: writes through .data would go unseen)
    assert counts["null-lora"]["step"] == counts["null-lora"]["repeat"]
    assert counts["null-lora"]["step"] <= counts["peft-lora"]["step"] + 5


def test_routed_lora_mul_meets_the_target(counts):
    assert counts["routed-lora-mul"]["step"] <= counts["peft-lora"]["step"] + 2
