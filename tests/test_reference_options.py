"""The options that reproduce Qu et al.'s reference code (tingyu215/Routing_VLPEFT), each against its
naive definition written out in plain torch on a tiny model, and the defaults unchanged.

Everything runs in float32 on the CPU. Where the library and the naive formula run the same ops
on the same tensors the results are compared exactly (``torch.equal``); where the order of the
ops differs (a hand-written LayerNorm, a separately computed loss) ``assert_close`` with float32's
default tolerances (rtol 1.3e-6, atol 1e-5), a few ulps of values of order one.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_adapters
from torch import nn

import vlpeft
from vlpeft.adapters import AdapterConfig, LoRAConfig
from vlpeft.models import build_model
from vlpeft.models.roberta_vit import RobertaVitConfig

QUESTIONS = ["what color is the circle?", "how many squares?", "is there a star?"]
SCORES = [{"1": 1.0, "2": 0.3}, {"3": 0.6}, {}]


def images(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def vqa_batch(n=3):
    return {"images": images(n), "text": QUESTIONS[:n], "answer_scores": SCORES[:n]}


# -- the bottleneck adapter: residual, init ---------------------------------------------------


def adapted_linear(**options):
    """A Linear(16 → 16) with one adapter after it (bottleneck 4, gelu), perturbed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    config = AdapterConfig(targets=["0"], bottleneck=4, activation="gelu", **options)
    vlpeft.add_adapter(model, config)
    perturb_adapters(model)
    (_, layer), *_ = vlpeft.adapted_layers(model)
    return model, layer.base_layer, layer.adapters["default"]


def test_adapter_without_residual_is_up_act_down_of_the_output():
    model, base, adapter = adapted_linear(residual=False)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    y = base(x)
    naive = F.linear(F.gelu(F.linear(y, adapter.down.weight, adapter.down.bias)), adapter.up.weight)
    naive = naive + adapter.up.bias
    torch.testing.assert_close(model(x), naive)


def test_adapter_default_adds_the_bottleneck_to_the_output():
    model, base, adapter = adapted_linear()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    y = base(x)
    naive = y + adapter.up(F.gelu(adapter.down(y)))
    torch.testing.assert_close(model(x), naive)


def test_adapter_inits():
    """``zero`` (default): up is zero, injection changes no output; ``normal``: both weights
    N(0, 0.02) (transformers' ``_init_weights``, the reference's), biases zero. 256 × 64 draws
    estimate the std to ~1e-4 (0.02 / sqrt(2 · 16384)); the bound 1e-3 is 10 of those."""
    torch.manual_seed(0)
    zero = AdapterConfig(targets=["x"], bottleneck=64).build(nn.Linear(256, 256), "x")
    assert not zero.up.weight.any() and not zero.up.bias.any()
    assert zero.residual and zero.down.weight.std() > 0.03  # PyTorch's default: U(±1/16)
    normal = AdapterConfig(targets=["x"], bottleneck=64, init="normal").build(
        nn.Linear(256, 256), "x"
    )
    for linear in (normal.down, normal.up):
        assert abs(linear.weight.std().item() - 0.02) < 1e-3
        assert abs(linear.weight.mean().item()) < 1e-3
        assert not linear.bias.any()

    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    for options, changes in (({}, False), ({"init": "normal"}, True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16))
        before = model(x)
        vlpeft.add_adapter(model, AdapterConfig(targets=["0"], bottleneck=4, **options))
        assert torch.equal(model(x), before) is not changes


def test_adapter_variants_stay_unmergeable_and_train_only_the_adapter():
    model, base, _ = adapted_linear(residual=False, init="normal")
    with pytest.raises(TypeError, match="not mergeable"):
        vlpeft.merge_adapter(model)
    assert not base.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if ".adapters." in n)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"residual": "no"}, "AdapterConfig.residual must be true or false"),
        ({"init": "random"}, r"AdapterConfig.init must be one of \['zero', 'normal'\]"),
        ({"residual": False, "parallel": True}, "residual=False replaces the target's output"),
    ],
)
def test_adapter_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(targets=["x"], **options)


# -- RoBERTa + ViT: head, answer_loss, text_embedding ------------------------------------------


def roberta(**options):
    torch.manual_seed(0)
    return build_model("roberta-vit", "tiny", **options).eval()


def captured_roberta_call(model, batch):
    """(the logits, RoBERTa's input embeddings, its last hidden state) of one call."""
    seen = {}

    def pre(_, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    def post(_, args, kwargs, out):
        seen["hidden"] = out.last_hidden_state

    hooks = [
        model.roberta.register_forward_pre_hook(pre, with_kwargs=True),
        model.roberta.register_forward_hook(post, with_kwargs=True),
    ]
    with torch.no_grad():
        logits = model.logits(batch)
    for hook in hooks:
        hook.remove()
    return logits, seen["embeds"], seen["hidden"]


def layer_norm(x, ln):
    """LayerNorm written out: (x - mean) / sqrt(var + eps) · weight + bias."""
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def test_reference_head_is_the_pooler_of_the_visual_token_then_linear_ln_gelu_linear():
    model = roberta(head="reference")
    logits, _, hidden = captured_roberta_call(model, vqa_batch())
    pooler, (lin1, ln, _, lin2) = model.roberta.pooler.dense, model.classifier
    pooled = torch.tanh(hidden[:, 0] @ pooler.weight.T + pooler.bias)
    naive = F.gelu(layer_norm(pooled @ lin1.weight.T + lin1.bias, ln)) @ lin2.weight.T + lin2.bias
    torch.testing.assert_close(logits, naive)


def test_default_head_is_the_s_state_then_linear_gelu_ln_linear():
    model = roberta()
    logits, _, hidden = captured_roberta_call(model, vqa_batch())
    lin1, _, ln, lin2 = model.classifier
    naive = layer_norm(F.gelu(hidden[:, 1] @ lin1.weight.T + lin1.bias), ln) @ lin2.weight.T
    torch.testing.assert_close(logits, naive + lin2.bias)
    assert [type(m) for m in model.classifier] == [nn.Linear, nn.GELU, nn.LayerNorm, nn.Linear]


def test_reference_head_init_and_a_pooler_that_does_not_depend_on_the_seed():
    """The pooler is frozen, so no checkpoint holds it: it is drawn from a fixed seed. The
    classifier's Linears are N(0, 0.02) (the reference's ``_init_weights``), biases zero."""
    a = roberta(head="reference")  # seed 0
    torch.manual_seed(123)
    b = build_model("roberta-vit", "tiny", head="reference")
    assert torch.equal(a.roberta.pooler.dense.weight, b.roberta.pooler.dense.weight)
    assert not a.roberta.pooler.dense.bias.any()
    for linear in (a.classifier[0], a.classifier[3]):
        assert not linear.bias.any() and 0.015 < linear.weight.std().item() < 0.025


def test_reference_head_trains_the_classifier_only_and_round_trips(tmp_path):
    """The frozen pooler is not saved; a fresh model (another seed, the same backbone weights:
    as pretrained ones would be) loads the adapter and gives the same logits."""
    model = roberta(head="reference")
    vlpeft.add_adapter(model, model.adapter_config(LoRAConfig(r=2, routing="mul", targets=["x"])))
    perturb_adapters(model)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier", "roberta"}  # roberta: the LoRA tensors
    assert not any(p.requires_grad for p in model.roberta.pooler.parameters())
    with torch.no_grad():
        model.classifier[0].weight.add_(0.1)  # as training would
    vlpeft.save_adapter(model, tmp_path)
    torch.manual_seed(7)
    fresh = build_model("roberta-vit", "tiny", head="reference").eval()
    backbone = {
        k: v
        for k, v in model.state_dict().items()
        if ".adapters." not in k and not k.startswith(("classifier.", "roberta.pooler."))
    }
    fresh.load_state_dict(backbone, strict=False)
    vlpeft.load_adapter(fresh, tmp_path)
    batch = vqa_batch()
    with torch.no_grad():
        assert torch.equal(fresh.logits(batch), model.logits(batch))


@pytest.mark.parametrize("answer_loss", ["mean", "sum"])
def test_answer_loss_against_bce_with_logits(answer_loss):
    model = roberta(answer_loss=answer_loss)
    batch = vqa_batch()
    with torch.no_grad():
        out = model(batch)
    target = model.targets(batch["answer_scores"])
    mean = nn.BCEWithLogitsLoss()(out.logits, target)  # the reference's train_vit_roberta.py
    expected = mean if answer_loss == "mean" else mean * target.shape[1]
    torch.testing.assert_close(out.loss, expected)


def test_text_embedded_twice_is_roberta_embeddings_of_the_ids_before_the_concatenation():
    """The reference (``RobertaVQAVLRoutingVisPre.forward``) embeds the ids — word + position
    (from the ids: padding_idx + 1 onwards, padding at padding_idx) + token type, LayerNorm,
    dropout — and hands that, after the visual token, to RoBERTa as ``inputs_embeds``."""
    batch = vqa_batch()
    once, twice = roberta(), roberta(text_embedding="twice")
    _, plain, _ = captured_roberta_call(once, batch)
    _, embeds, _ = captured_roberta_call(twice, batch)
    text = twice.tokenize(batch["text"])
    ids, emb = text["input_ids"], twice.roberta.embeddings
    assert torch.equal(plain[:, 1:], once.roberta.embeddings.word_embeddings(ids))
    pad = twice.roberta.config.pad_token_id
    real = (ids != pad).long()
    positions = torch.cumsum(real, 1) * real + pad
    naive = emb.word_embeddings.weight[ids] + emb.position_embeddings.weight[positions]
    naive = layer_norm(naive + emb.token_type_embeddings.weight[0], emb.LayerNorm)
    torch.testing.assert_close(embeds[:, 1:], naive)
    torch.testing.assert_close(embeds[:, 0], plain[:, 0], rtol=0, atol=0)  # the visual token


def test_roberta_defaults_are_unchanged():
    config = RobertaVitConfig()
    assert (config.head, config.answer_loss, config.text_embedding) == ("cls_mlp", "sum", "once")
    adapter = AdapterConfig(targets=["x"])
    assert (adapter.residual, adapter.init) == (True, "zero")


@pytest.mark.parametrize("field", ["head", "answer_loss", "text_embedding"])
def test_roberta_options_are_validated(field):
    with pytest.raises(ValueError, match=rf"RobertaVitConfig\.{field} must be one of"):
        RobertaVitConfig(**{field: "nope"})


# -- GPT-2 + ViT: the reference's caption layout ------------------------------------------------

CAPTIONS = ["a red circle on the left", "two [PAD] squares", "a star"]  # id 0: [PAD] (tiny)


def gpt2(**options):
    torch.manual_seed(0)
    return build_model("gpt2-vit", "tiny", max_text_length=12, **options).eval()


def captured_gpt2_call(model, batch):
    """(the model's output, GPT-2's input embeddings and attention mask) of one forward."""
    seen = {}

    def pre(_, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], mask=kwargs["attention_mask"])

    hook = model.gpt2.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        out = model(batch)
    hook.remove()
    return out, seen["embeds"], seen["mask"]


@pytest.mark.parametrize("prefix, prompt", [(True, ""), (False, "<s>")])
def test_reference_layout_against_train_vit_gpt(prefix, prompt):
    """``data/coco_dataset.py``: encode(prompt + caption, max_length=L, truncation) padded with
    eos to L, mask on the text; ``train_vit_gpt.py``: cross_entropy(logits[:, p:-1], tokens[:, 1:],
    ignore_index=0) with p = 1 after the visual prefix, 0 without."""
    options = {} if prefix else {"visual_prefix": False, "routing_feature": "tokens"}
    model = gpt2(text_layout="reference", **options)
    batch = {"images": images(3), "text": [prompt] * 3, "targets": CAPTIONS}
    out, embeds, mask = captured_gpt2_call(model, batch)
    tok, width = model.tokenizer, 12
    rows = [tok(prompt + c, add_special_tokens=False)["input_ids"][:width] for c in CAPTIONS]
    tokens = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in rows])
    text_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    p = int(prefix)
    assert torch.equal(embeds[:, p:], model.gpt2.transformer.wte(tokens))
    assert torch.equal(mask[:, p:], text_mask) and (mask[:, :p] == 1).all()
    assert (tokens == 0).any() and (tokens == tok.eos_token_id).sum() > 3  # both cases met
    logits = out.logits[:, p:-1]
    naive = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].flatten(), ignore_index=0
    )
    # lm_loss averages each row's tokens, then the rows; the reference the batch's tokens: equal
    # when every row has as many targets (the eos padding sees to it), here the [PAD] row has one
    # fewer, so ours is the rows' mean and the reference's their mean weighted by the counts
    per_row = torch.stack(
        [F.cross_entropy(logits[i], tokens[i, 1:], ignore_index=0) for i in range(len(CAPTIONS))]
    )
    counts = (tokens[:, 1:] != 0).sum(1).float()
    assert counts.tolist() == [width - 1, width - 2, width - 1]
    torch.testing.assert_close(out.loss, per_row.mean())
    torch.testing.assert_close(naive, (per_row * counts).sum() / counts.sum())


def test_reference_layout_generates_from_the_prefix_alone():
    model = gpt2(text_layout="reference")
    seen = {}

    def pre(_, args, kwargs):
        if "embeds" not in seen:  # the first step; later ones feed the new ids
            seen["embeds"] = kwargs["inputs_embeds"]

    hook = model.gpt2.register_forward_pre_hook(pre, with_kwargs=True)
    batch = {"images": images(2)}
    with torch.no_grad():
        model.generate(batch, max_new_tokens=2)
        prefix = model.visual_input(batch)
    hook.remove()
    assert seen["embeds"].shape[1] == 1
    torch.testing.assert_close(seen["embeds"][:, 0], prefix)
    no_prefix = gpt2(text_layout="reference", visual_prefix=False, routing_feature="tokens")
    with pytest.raises(ValueError, match="give the task a prompt"):
        no_prefix.generate({"images": images(2)}, max_new_tokens=2)


def test_gpt2_default_layout_is_unchanged():
    """bos + caption + eos, the loss on the caption and one eos (each row's mean, then the rows)."""
    model = gpt2()
    assert model.config.text_layout == "vlpeft"
    batch = {"images": images(3), "text": [""] * 3, "targets": CAPTIONS}
    out, embeds, _ = captured_gpt2_call(model, batch)
    tok = model.tokenizer
    losses = []
    for i, caption in enumerate(CAPTIONS):
        target = tok(caption, add_special_tokens=False)["input_ids"][:12] + [tok.eos_token_id]
        assert torch.equal(
            embeds[i, 1 : 2 + len(target)],
            model.gpt2.transformer.wte(torch.tensor([tok.bos_token_id, *target])),
        )
        # logits at bos .. last caption token predict the caption and eos
        losses.append(F.cross_entropy(out.logits[i, 1 : 1 + len(target)], torch.tensor(target)))
    torch.testing.assert_close(out.loss, torch.stack(losses).mean())


def test_gelu_new_is_gpt2s_activation():
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-6, 6, 1001)
    act = AdapterConfig(targets=["x"], bottleneck=2, activation="gelu_new").build(
        nn.Linear(4, 4), "x"
    )
    torch.testing.assert_close(act.act(x), NewGELUActivation()(x))


def test_gpt2_text_layout_is_validated():
    with pytest.raises(ValueError, match=r"Gpt2VitConfig\.text_layout must be one of"):
        build_model("gpt2-vit", "tiny", text_layout="nope")
