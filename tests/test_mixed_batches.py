"""Mixed-task batches (peft's ``adapter_names=``) and ``disable_adapters``: each row of a batch
that mixes tasks gets exactly what it gets alone with its task's adapter set (and routing
function) active; inside ``disable_adapters`` the model is its bare base model."""

import pytest
import torch
from conftest import perturb_adapters

import vlpeft
from vlpeft.adapters import LoRAConfig

TASKS = ("vqa", "gqa", "caption")


def tiny_clip_bart():
    return vlpeft.build_model("clip-bart", "tiny", image_size=32).eval()


def adapted(routing: dict | None = None):
    """A tiny CLIP-BART with one perturbed LoRA set per task (``routing``: task → function)."""
    model = tiny_clip_bart()
    for name in TASKS:
        kind = (routing or {}).get(name)
        config = model.adapter_config(LoRAConfig(targets=["x"], r=4, routing=kind))
        vlpeft.add_adapter(model, config, name=name)
    perturb_adapters(model, scale=0.3)
    return model.to("cpu", torch.float32).eval()  # an adapted model moves like any module


def mixed_batch(rows=(0, 1, 2, 0)):
    g = torch.Generator().manual_seed(7)
    texts = ["vqa: what color is the circle?", "gqa: is it left?", "a picture of"]
    targets = ["red", "yes it is", "a red circle and two blue squares"]
    return {
        "images": torch.randn(len(rows), 3, 32, 32, generator=g),
        "text": [texts[r] for r in rows],
        "targets": [targets[r] for r in rows],
        "adapter_names": [TASKS[r] for r in rows],
    }


def row(batch, i):
    return {k: (v[i : i + 1] if k == "images" else [v[i]]) for k, v in batch.items()}


def alone(model, batch, i, routing=None):
    """Row ``i`` on its own, its set active and ``routing`` applied (what a task router does)."""
    single = row(batch, i)
    del single["adapter_names"]
    vlpeft.set_active_adapter(model, batch["adapter_names"][i])
    vlpeft.set_routing(model, routing)
    return single


@pytest.mark.parametrize(
    "routing, routings",
    [
        (None, None),
        # vqa and caption route; the last vqa row runs another function than its set's
        ({"vqa": "mul", "caption": "proj"}, [None, None, None, "relu_add"]),
    ],
    ids=["plain", "routed"],
)
def test_each_row_of_a_mixed_batch_gets_what_it_gets_alone(routing, routings):
    model = adapted(routing)
    batch = mixed_batch()
    if routings:
        batch["routings"] = routings
    per_row = routings or [None] * 4
    with torch.no_grad():
        mixed = model(batch)
        texts = model.generate(batch, max_new_tokens=5)
        beams = model.generate(batch, max_new_tokens=5, num_beams=2)
        losses, others = [], []
        for i in range(4):
            single = alone(model, batch, i, per_row[i])
            out = model(single)
            length = out.logits.shape[1]
            torch.testing.assert_close(
                mixed.logits[i, :length], out.logits[0], atol=1e-5, rtol=1e-5
            )
            losses.append(out.loss)
            assert texts[i] == model.generate(single, max_new_tokens=5)[0]
            assert beams[i] == model.generate(single, max_new_tokens=5, num_beams=2)[0]
            vlpeft.set_active_adapter(
                model, TASKS[(TASKS.index(batch["adapter_names"][i]) + 1) % 3]
            )
            others.append(model(single).logits[0])
        # the loss is the mean of the rows' losses (VL-T5's per-example reduction)
        torch.testing.assert_close(mixed.loss, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)
        # and the sets differ: another task's set gives a row other logits
        for i, other in enumerate(others):
            assert (other - mixed.logits[i, : other.shape[0]]).abs().max() > 1e-3
        if routings:  # the per-row function mattered: the set's own function gives another row 3
            own = model(alone(model, batch, 3)).logits[0]
            assert (own - mixed.logits[3, : own.shape[0]]).abs().max() > 1e-3


def test_mixed_batches_train_each_set_on_its_own_rows():
    """Gradients reach only the sets named by the batch's rows; a set without rows gets none."""
    model = adapted({"vqa": "mul"})
    batch = mixed_batch(rows=(0, 2, 0))
    model.train()
    model(batch).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if ".adapters." in name}
    touched = {task: any(g is not None and g.abs().sum() > 0 for n, g in grads.items()
                         if f".adapters.{task}." in n) for task in TASKS}  # fmt: skip
    assert touched == {"vqa": True, "gqa": False, "caption": True}


def test_base_rows_and_errors():
    model = adapted()
    bare = tiny_clip_bart()
    batch = mixed_batch()
    batch["adapter_names"] = ["vqa", "__base__", "caption", "__base__"]
    with torch.no_grad():
        mixed = model(batch).logits
        reference = bare({k: v for k, v in batch.items() if k != "adapter_names"}).logits
    torch.testing.assert_close(mixed[1], reference[1], atol=1e-5, rtol=1e-5)
    assert (mixed[0] - reference[0]).abs().max() > 1e-3
    with pytest.raises(KeyError, match="no adapter named 'nlvr2'"):
        model({**batch, "adapter_names": ["vqa", "nlvr2", "vqa", "vqa"]})
    with pytest.raises(ValueError, match="adapter_names has 2 entries for a batch of 4 rows"):
        model({**batch, "adapter_names": ["vqa", "gqa"]})
    with pytest.raises(ValueError, match="unknown routing function 'sum'"):
        model({**batch, "routings": ["sum", None, None, None]})
    vlpeft.set_active_adapter(model, "vqa")
    vlpeft.merge_adapter(model)
    with pytest.raises(RuntimeError, match="merged into the base weights: a mixed-task batch"):
        model(batch)


def test_gpt2_vit_rows_through_sliced_sets():
    """GPT-2's fused c_attn with q/v slices, one routed set: each row as alone (loss and logits)."""
    model = vlpeft.build_model("gpt2-vit", "tiny")
    for name, kind in (("a", None), ("b", "proj")):
        config = model.adapter_config(LoRAConfig(targets=["x"], r=4, routing=kind))
        vlpeft.add_adapter(model, config, name=name)
    perturb_adapters(model, scale=0.3)
    model.eval()
    g = torch.Generator().manual_seed(2)
    batch = {"images": torch.randn(3, 3, 32, 32, generator=g), "text": ["", "", ""],
             "targets": ["a red circle", "two squares", "a blue"], "adapter_names": ["b", "a", "b"]}  # fmt: skip
    with torch.no_grad():
        mixed = model(batch).logits
        texts = model.generate(batch, max_new_tokens=4, num_beams=2)
        for i in range(3):
            single = alone(model, batch, i)
            out = model(single).logits[0]
            torch.testing.assert_close(mixed[i, : out.shape[0]], out, atol=1e-5, rtol=1e-5)
            assert texts[i] == model.generate(single, max_new_tokens=4, num_beams=2)[0]


# -- disable_adapters -------------------------------------------------------------------------------
def test_disable_adapters_gives_the_bare_model_and_restores_on_exit():
    model = adapted({"vqa": "mul"})
    bare = tiny_clip_bart()
    batch = {k: v for k, v in mixed_batch().items() if k != "adapter_names"}
    vlpeft.set_active_adapter(model, "vqa")
    with torch.no_grad():
        expected, base = model(batch).logits, bare(batch).logits
        assert (expected - base).abs().max() > 1e-3
        with vlpeft.disable_adapters(model):
            torch.testing.assert_close(model(batch).logits, base, atol=1e-5, rtol=1e-5)
            assert model.generate(batch, max_new_tokens=4) == bare.generate(batch, max_new_tokens=4)
        torch.testing.assert_close(model(batch).logits, expected)
        with pytest.raises(KeyError, match="images"), vlpeft.disable_adapters(model):
            model({"text": batch["text"], "targets": batch["targets"]})  # fails inside the block
        torch.testing.assert_close(model(batch).logits, expected)


def test_disable_adapters_unmerges_merged_ones_and_merges_them_again():
    model = adapted()
    bare = tiny_clip_bart()
    batch = {k: v for k, v in mixed_batch().items() if k != "adapter_names"}
    vlpeft.set_active_adapter(model, "gqa")
    with torch.no_grad():
        expected, base = model(batch).logits, bare(batch).logits
        vlpeft.merge_adapter(model)
        with vlpeft.disable_adapters(model):
            torch.testing.assert_close(model(batch).logits, base, atol=1e-5, rtol=1e-5)
            assert all(not layer.merged for _, layer in vlpeft.adapted_layers(model))
        assert all(layer.merged == ("gqa",) for _, layer in vlpeft.adapted_layers(model))
        torch.testing.assert_close(model(batch).logits, expected, atol=1e-5, rtol=1e-5)
