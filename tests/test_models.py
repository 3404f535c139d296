"""The model factory: every family × every method on the tiny presets; base parameter counts."""

import re

import pytest
import torch

import vlpeft
from tests.conftest import perturb_adapters
from vlpeft.adapters import (
    AdapterConfig,
    DoRAConfig,
    FLoRAConfig,
    LayerwiseConfig,
    LoRAConfig,
    NullLoRAConfig,
)
from vlpeft.models import build_model, list_families
from vlpeft.models.base import count

DESIGN_FAMILIES = ["clip-bart", "blip", "roberta-vit", "gpt2-vit"]  # the four of DESIGN.md
FAMILIES = list_families()  # the family tests run over the registry
METHODS = {  # every registered method (test_every_registered_method_has_a_family_row), routed too
    "lora": LoRAConfig(r=4, targets=["x"]),
    "adapter": AdapterConfig(bottleneck=8, targets=["x"]),
    "routed-lora": LoRAConfig(r=4, routing="proj", targets=["x"]),
    "routed-adapter": AdapterConfig(bottleneck=8, routing="relu_mul", targets=["x"]),
    "null-lora": NullLoRAConfig(min_rank=2, max_rank=4, targets=["x"]),
    "flora": FLoRAConfig(r=4, targets=["x"]),
    "routed-null-lora": NullLoRAConfig(min_rank=2, max_rank=4, routing="add", targets=["x"]),
    "routed-flora": FLoRAConfig(r=4, routing="mul", targets=["x"]),
    "dora": DoRAConfig(r=4, targets=["x"]),
    "layerwise": LayerwiseConfig(base={"method": "lora", "r": 4}, targets=["x"]),
}
TEXT = {  # components routed adapters may use (x_R comes from the vision encoder)
    "clip-bart": ["encoder", "decoder"],
    "blip": ["text_encoder", "text_decoder"],
    "roberta-vit": ["text"],
    "gpt2-vit": ["decoder"],
}


def images(family, n=2, seed=0, pairs=False):
    size = 64 if family == "clip-bart" else 32
    shape = (n, 2, 3, size, size) if pairs else (n, 3, size, size)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


QUESTIONS = ["what color is the circle?", "how many squares?", "is there a star?"]
CAPTIONS = ["a red circle on the left", "two blue squares", "a star"]
ANSWERS = ["red", "2", "yes"]


def clip_bart_batches(n):
    im, pair = images("clip-bart", n), images("clip-bart", n, pairs=True)
    return [
        {"images": im, "text": [f"vqa: {t}" for t in QUESTIONS[:n]], "targets": ANSWERS[:n]},
        {"images": pair, "text": ["nlvr: two circles"] * n, "targets": ["true", "false"][:n]},
    ]


def blip_batches(n):
    im = images("blip", n)
    return [
        {"kind": "vqa", "images": im, "text": QUESTIONS[:n], "targets": ANSWERS[:n]},
        {"kind": "caption", "images": im, "text": ["a picture of"] * n, "targets": CAPTIONS[:n]},
        {"kind": "retrieval", "images": im, "text": CAPTIONS[:n], "image_ids": list(range(n))},
    ]


def roberta_vit_batches(n):
    scores = [{"1": 1.0, "2": 0.3}, {"3": 0.6}, {}][:n]
    return [{"images": images("roberta-vit", n), "text": QUESTIONS[:n], "answer_scores": scores}]


def gpt2_vit_batches(n):
    return [{"images": images("gpt2-vit", n), "text": [""] * n, "targets": CAPTIONS[:n]}]


BATCHES = {  # the training batches each family serves (one per task kind)
    "clip-bart": clip_bart_batches,
    "blip": blip_batches,
    "roberta-vit": roberta_vit_batches,
    "gpt2-vit": gpt2_vit_batches,
}
VISUAL = {  # what each family hands its language model for an image
    "clip-bart": lambda model, im: model.visual_tokens({"images": im}),
    "blip": lambda model, im: model.encode_images(im)[0],  # the ITC embedding (from [CLS])
    "roberta-vit": lambda model, im: model.visual(model.vit, im),
    "gpt2-vit": lambda model, im: model.visual(model.vit, im),
}
FAMILY_TABLES = {"TEXT": TEXT, "BATCHES": BATCHES, "VISUAL": VISUAL}


def batches(family, n=2):
    """The training batches each family serves (one per task kind)."""
    return BATCHES[family](n)


def adapted(family, method, seed=0):
    torch.manual_seed(seed)
    model = build_model(family, "tiny").eval()
    components = TEXT[family] if method.startswith("routed") else None
    vlpeft.add_adapter(model, model.adapter_config(METHODS[method], components=components))
    return model


def test_registry_lists_the_four_families():
    assert list_families() == sorted(DESIGN_FAMILIES)


@pytest.mark.parametrize("family", list_families())
def test_every_registered_family_has_test_entries(family):
    """A family registered without entries in the family tables is not tested: this names it."""
    missing = [name for name, table in FAMILY_TABLES.items() if family not in table]
    assert not missing, f"family {family!r} is registered but has no entry in {missing}"


@pytest.mark.parametrize("method", vlpeft.list_methods())
def test_every_registered_method_has_a_family_row(method):
    """Every registered method runs on every family: a method with no METHODS row names itself."""
    rows = [key for key, config in METHODS.items() if config.method == method]
    assert rows, f"method {method!r} is registered but has no row in test_models.METHODS"


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_trains_only_adapters_and_declared(family, method):
    model = adapted(family, method)
    perturb_adapters(model)
    model.train()
    declared = model.trainable_patterns
    for batch in batches(family):
        if method.startswith("routed") and batch.get("kind") == "retrieval":
            with pytest.raises(ValueError, match="ITC text features see no image"):
                model.loss(batch)
            continue
        model.zero_grad(set_to_none=True)
        loss = model.loss(batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad, "nothing received a gradient"
        for name in with_grad:
            assert ".adapters." in name or any(re.search(p, name) for p in declared), name
        assert any(
            ".adapters." in n and model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad
        )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapters." in n or any(re.search(p, n) for p in declared) for n in trainable)


@pytest.mark.parametrize("family", ["clip-bart", "blip", "gpt2-vit"])
def test_routed_beam_search_is_per_example(family):
    """x_R follows each example through beam expansion: batched beams == one example at a time."""
    model = adapted(family, "routed-lora")
    perturb_adapters(model, scale=0.5)
    batch = next(b for b in batches(family, n=3) if b.get("kind", "vqa") != "retrieval")
    together = model.generate(batch, max_new_tokens=5, num_beams=3)
    alone = [
        model.generate({k: (v[i : i + 1] if k != "kind" else v) for k, v in batch.items()}, 5, 3)[0]
        for i in range(3)
    ]
    assert together == alone
    routed = [layer for _, layer in vlpeft.adapted_layers(model) if layer.routing_input is not None]
    assert routed and all(layer.routing_input.abs().sum() > 0 for layer in routed)  # x_R was real


def test_routing_changes_the_decoder_with_x_r_alone():
    """The same encoder output, two x_R: the routed decoder's logits differ (a bug that zeroed or
    ignored x_R would pass a comparison of encoder outputs)."""
    from vlpeft.models.clip_bart import encoder_output

    model = adapted("clip-bart", "routed-lora")
    perturb_adapters(model, scale=1.0)
    batch = batches("clip-bart")[0]
    with torch.no_grad():
        hidden, mask = model.encode(batch)
        starts = torch.full((hidden.shape[0], 3), model.bart.config.decoder_start_token_id)

        def logits(x_r):
            vlpeft.set_routing_inputs(model.bart.model.decoder, x_r)
            out = model.bart(encoder_outputs=encoder_output(hidden), attention_mask=mask,
                             decoder_input_ids=starts)  # fmt: skip
            return out.logits

        own = logits(hidden.mean(1))
        assert not torch.allclose(own, logits(torch.zeros_like(hidden[:, 0])))
        assert not torch.allclose(own, logits(hidden.mean(1).flip(0)))


def test_nlvr_two_images_carry_their_order():
    model = build_model("clip-bart", "tiny").eval()
    batch = batches("clip-bart")[1]
    n = model.config.visual_grid**2
    tokens = model.visual_tokens(batch)
    assert tokens.shape == (2, 2 * n, model.bart.config.d_model)
    swapped = model.visual_tokens({**batch, "images": batch["images"].flip(1)})
    order = model.image_order.weight
    # the left image's tokens are the same features with order 0 instead of 1, and vice versa
    assert torch.allclose(swapped[:, :n] - order[0], tokens[:, n:] - order[1], atol=1e-5)
    assert torch.allclose(swapped[:, n:] - order[1], tokens[:, :n] - order[0], atol=1e-5)
    hidden, mask = model.encode(batch)
    assert (
        hidden.shape[1]
        == mask.shape[1]
        == model.tokenize(batch["text"])["input_ids"].shape[1] + 2 * n
    )
    assert model.score_choices(batch, ["true", "false"]).shape == (2, 2)


def test_score_choices_reads_the_answer_step_the_loss_trains():
    """The choice logits are the logits the LM loss trains for a one-word target."""
    model = build_model("clip-bart", "tiny").eval()
    batch = batches("clip-bart")[1]
    hidden, mask = model.encode(batch)
    labels = model.tokenize(["true", "true"])["input_ids"]  # [bos] true [eos]
    logits = model.bart(encoder_outputs=(hidden,), attention_mask=mask, labels=labels).logits
    true_id, false_id = model.choice_ids(["true", "false"])
    assert labels[0, 1] == true_id
    scores = model.score_choices(batch, ["true", "false"])
    assert torch.allclose(scores, logits[:, 1, [true_id, false_id]], atol=1e-5)


def test_cached_features_equal_the_pixel_path():
    model = adapted("clip-bart", "routed-lora")
    perturb_adapters(model)
    for batch in batches("clip-bart"):
        cached = {**batch, "features": model.visual_features(batch["images"])}
        del cached["images"]
        assert torch.equal(model.loss(batch), model.loss(cached))
    batch = batches("clip-bart")[0]
    cached = {"features": model.visual_features(batch["images"]), "text": batch["text"]}
    assert model.generate(batch, 4, 2) == model.generate(cached, 4, 2)


def test_blip_retrieval_scores():
    model = build_model("blip", "tiny").eval()
    im = images("blip", 3)
    image_feat, states = model.encode_images(im)
    text_feat = model.encode_texts(["a", "b c", "d"])
    assert image_feat.shape == text_feat.shape == (3, 16)
    assert torch.allclose(image_feat.norm(dim=-1), torch.ones(3))
    itm = model.match(states, ["a", "b c", "d"])
    assert itm.shape == (3, 2)
    single = model.match(states[1:2], ["b c"])
    assert torch.allclose(itm[1:2], single, atol=1e-5)


def test_blip_caption_prompt_is_not_trained_on():
    model = build_model("blip", "tiny").eval()
    batch = batches("blip")[1]
    inputs, labels = model._decoder_inputs(batch)
    n_prompt = len(model.tokenizer("a picture of", add_special_tokens=False)["input_ids"])
    assert (labels[:, : 1 + n_prompt] == -100).all()
    assert (labels[:, 1 + n_prompt] != -100).all()
    assert (inputs["input_ids"][:, 0] == model.text_config.bos_token_id).all()


def test_gpt2_vit_loss_ignores_padding():
    """Padding (a longer caption in the batch) does not change an example's loss, and a batch's
    loss is the mean of its examples' token means (so data-parallel halves average exactly)."""
    model = build_model("gpt2-vit", "tiny").eval()
    im = images("gpt2-vit", 2)
    a = {"images": im[:1], "text": [""], "targets": ["a red circle"]}
    b = {"images": im[1:], "text": [""], "targets": ["two blue squares on the left of a star"]}
    both = {"images": im, "text": ["", ""], "targets": a["targets"] + b["targets"]}
    expected = (model.loss(a) + model.loss(b)) / 2
    assert torch.allclose(model.loss(both), expected, atol=1e-5)
    ids, mask, labels = model._sequences({"targets": ["a", "a red circle on the left"]})
    assert (labels[0][mask[0] == 0] == -100).all()
    assert labels[0].ne(-100).sum() == 2  # "a" + eos


def test_roberta_vit_targets_and_prediction_names():
    model = build_model("roberta-vit", "tiny", answers=["red", "blue", "2"]).eval()
    target = model.targets([{"blue": 0.9, "green": 1.0}])
    assert torch.equal(target, torch.tensor([[0.0, 0.9, 0.0]]))
    out = model.generate({"images": images("roberta-vit", 1), "text": ["what color?"]})
    assert out[0] in {"red", "blue", "2"}


def test_adapter_config_errors():
    model = build_model("clip-bart", "tiny")
    with pytest.raises(ValueError, match="decoder"):
        model.adapter_targets(components=["decodr"])
    with pytest.raises(ValueError, match="x_R"):
        model.adapter_config(LoRAConfig(routing="mul", targets=["x"]), components=["vision"])
    with pytest.raises(ValueError, match="visual_grid"):
        build_model("clip-bart", "tiny", visual_gird=3)
    with pytest.raises(ValueError, match="shipped"):
        build_model("clip-bart", "huge")


def test_missing_weights_say_where_and_how(tmp_path):
    missing = str(tmp_path / "no-such-gpt2")
    with pytest.raises(FileNotFoundError, match="pretrained=False") as err:
        build_model("gpt2-vit", "tiny", pretrained=True, weights={"text": missing})
    assert missing in str(err.value) and "GPT-2" in str(err.value)
    assert f"`hf download {missing}`" in str(err.value)  # the CLI that exists (not huggingface-cli)


def test_missing_open_clip_weights_name_their_hub_id(monkeypatch):
    """open_clip's RN101/openai lives on the hub as timm/resnet101_clip.openai: the error names
    that id, not the tag (offline, open_clip's download fails at once)."""
    import open_clip

    def offline(*args, **kwargs):
        raise RuntimeError("offline")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(FileNotFoundError, match=r"`hf download timm/resnet101_clip\.openai`"):
        build_model("clip-bart", "tiny", pretrained=True, weights={"vision": "openai"},
                    vision={"model": "RN101"})  # fmt: skip


# -- base presets: the papers' sizes, counted on the meta device (no memory, no download) ------
def meta_build(family, **kw):
    with torch.device("meta"):
        return build_model(family, "base", pretrained=False, **kw)


def test_blip_base_retrieval_matches_transformers():
    from transformers import BlipConfig, BlipForImageTextRetrieval

    ours = meta_build("blip", heads=["retrieval"])
    with torch.device("meta"):
        theirs = BlipForImageTextRetrieval(BlipConfig())
    assert count(ours) == count(theirs)
    assert round(count(ours) / 1e6, 1) == 223.7


def test_blip_base_vqa_and_caption_match_transformers():
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering

    with torch.device("meta"):
        vqa, cap = (
            BlipForQuestionAnswering(BlipConfig()),
            BlipForConditionalGeneration(BlipConfig()),
        )
    assert count(meta_build("blip", heads=["vqa"])) == count(vqa)
    assert count(meta_build("blip", heads=["caption"])) == count(cap)


def test_clip_bart_base_parts_match_the_libraries():
    import open_clip

    ours = meta_build("clip-bart")
    with torch.device("meta"):
        rn101 = open_clip.create_model("RN101", device="meta").visual
    assert count(ours.visual) == count(rn101)
    assert count(ours.bart.model) == 139_420_416  # facebook/bart-base
    assert ours.feature_dim == 2048


def test_vit_pairs_base_parts_match_the_published_sizes():
    from transformers import GPT2Config, GPT2Model, ViTConfig, ViTModel

    roberta, gpt2 = meta_build("roberta-vit"), meta_build("gpt2-vit")
    with torch.device("meta"):
        vit, gpt2_ref = ViTModel(ViTConfig()), GPT2Model(GPT2Config())
    assert count(roberta.vit) == count(gpt2.vit) == count(vit) == 86_389_248
    assert count(roberta.roberta) == 124_645_632  # FacebookAI/roberta-base
    assert count(gpt2.gpt2) == count(gpt2_ref) == 124_439_808
    assert roberta.classifier[-1].out_features == 3129


def original_blip_names(hf_key):
    """The salesforce/BLIP (timm ViT) name of a transformers vision key, written out by hand."""
    table = {
        "vision_model.embeddings.patch_embedding.": "visual_encoder.patch_embed.proj.",
        "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
        "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
        "vision_model.post_layernorm.": "visual_encoder.norm.",
    }
    for new, old in table.items():
        if hf_key.startswith(new):
            return hf_key.replace(new, old)
    key = hf_key.replace("vision_model.encoder.layers.", "visual_encoder.blocks.")
    key = key.replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv")
    return key.replace("layer_norm1", "norm1").replace("layer_norm2", "norm2")


def test_convert_original_blip_checkpoint(tmp_path):
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from launch.convert_blip import main

    text = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "encoder_hidden_size": 32,
        "vocab_size": 100,
    }
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
    }
    reference = BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision))
    original = {original_blip_names(k): v for k, v in reference.state_dict().items()}
    original["visual_encoder_m.blocks.0.attn.qkv.weight"] = torch.zeros(3)  # momentum encoder
    original["image_queue"] = torch.zeros(2)
    torch.save({"model": original}, tmp_path / "model_base_retrieval.pth")
    import launch.convert_blip as convert_blip

    convert_blip.convert(
        tmp_path / "model_base_retrieval.pth", tmp_path / "hf", "retrieval", text, vision
    )
    loaded = BlipForImageTextRetrieval.from_pretrained(tmp_path / "hf")
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(SystemExit, match="no such checkpoint"):
        main([str(tmp_path / "missing.pth"), str(tmp_path / "x"), "--head", "vqa"])


def test_random_weights_are_a_function_of_the_seed():
    state = torch.get_rng_state()
    a, b = build_model("gpt2-vit", "tiny"), build_model("gpt2-vit", "tiny")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = build_model("gpt2-vit", "tiny", seed=1)
    assert not torch.equal(a.gpt2.transformer.wte.weight, c.gpt2.transformer.wte.weight)


def visual_features(model, family, im):
    """What each family hands its language model for an image."""
    return VISUAL[family](model, im)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_tiny_models_see_the_image(family):
    """Random weights still tell images apart. (transformers' BLIP vision init has std 1e-10 and
    open_clip's ResNet init shrinks layer4 to ~1e-4: every image gave the same features.)"""
    model = build_model(family, "tiny").eval()
    with torch.no_grad():
        a, b = (visual_features(model, family, images(family, 1, seed=s)) for s in (1, 2))
    assert (a - b).norm() > 0.05 * a.norm(), family


def test_blip_vqa_answer_does_not_depend_on_the_other_questions_padding():
    """transformers' BLIP cross-attention drops its encoder mask (the decoder attended to padded
    question positions); with the fix an example's logits are the same alone and in a batch."""
    model = build_model("blip", "tiny").eval()
    batch = {"kind": "vqa", "images": images("blip", 2),
             "text": ["what color is the big circle on the left?", "how many?"],
             "targets": ["red", "two"]}  # fmt: skip
    with torch.no_grad():
        together = model(batch).logits
        alone = model({k: (v[1:] if k != "kind" else v) for k, v in batch.items()}).logits
    torch.testing.assert_close(together[1, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_clip_bart_routes_the_decoder_by_default():
    """Qu et al. Sec. 5.1: adapters in encoder and decoder, routing in the decoder only — one set."""
    model = build_model("clip-bart", "tiny")
    vlpeft.add_adapter(model, model.adapter_config(LoRAConfig(r=4, routing="proj", targets=["x"])))
    routed = {n.split(".")[2] for n in vlpeft.adapters.routing.routed_layers(model)}
    plain = {n.split(".")[2] for n, layer in vlpeft.adapted_layers(model)
             if layer.adapters["default"].routing is None}  # fmt: skip
    assert routed == {"decoder"} and plain == {"encoder"}
    both = build_model("clip-bart", "tiny")
    config = both.adapter_config(
        LoRAConfig(r=4, routing="proj", targets=["x"]), routed_components=["encoder", "decoder"]
    )
    vlpeft.add_adapter(both, config)
    assert {n.split(".")[2] for n in vlpeft.adapters.routing.routed_layers(both)} == {
        "encoder",
        "decoder",
    }


def test_gpt2_default_lora_leaves_the_key_projection_untouched():
    """LoRA on q and v (Qu et al. Sec. 2.1): the k third of the fused c_attn keeps W0."""
    model = build_model("gpt2-vit", "tiny").eval()
    vlpeft.add_adapter(model, model.adapter_config(LoRAConfig(r=4, targets=["x"])))
    perturb_adapters(model)
    layer = model.gpt2.transformer.h[0].attn.c_attn
    delta = layer.delta_weight()  # Conv1D: (in, out) with out = q | k | v
    width = delta.shape[1] // 3
    assert delta[:, width : 2 * width].abs().max() == 0
    assert delta[:, :width].abs().max() > 0 and delta[:, 2 * width :].abs().max() > 0
    adapter = layer.adapters["default"]
    assert adapter.scaling == 1.0  # α = r by default


def test_gpt2_vit_methods_without_slices_take_the_whole_c_attn():
    model = build_model("gpt2-vit", "tiny")
    config = model.adapter_config(NullLoRAConfig(min_rank=2, max_rank=4, targets=["x"]))
    assert config.targets.endswith(r"(?:attn\.c_attn)")
    with pytest.raises(ValueError, match="only LoRA can"):
        model.adapter_config(NullLoRAConfig(targets=["x"]), kinds=["q", "v"])


@pytest.mark.parametrize("family", ["roberta-vit", "gpt2-vit"])
def test_vit_pair_trains_only_the_adapters_and_the_classifier(family):
    """Qu et al. Sec. 4.1: the ViT [CLS] feature is prepended as it is (equal widths, no mapping):
    nothing but the PEFT modules (and the VQA classifier) trains; a mapping is an explicit option,
    required when the widths differ."""
    model = build_model(family, "tiny")
    vlpeft.add_adapter(model, model.adapter_config(LoRAConfig(r=2, routing="mul", targets=["x"])))
    trainable = {
        n.split(".")[0]
        for n, p in model.named_parameters()
        if p.requires_grad and ".adapters." not in n
    }
    assert trainable == ({"classifier"} if family == "roberta-vit" else set())
    x = images(family, 2)
    with torch.no_grad():
        cls = model.vit(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(model.visual(model.vit, x), cls)
    mapped = build_model(family, "tiny", visual_mapping=True)
    vlpeft.add_adapter(mapped, mapped.adapter_config(LoRAConfig(r=2, targets=["x"])))
    assert any(
        n.startswith("visual.proj") and p.requires_grad for n, p in mapped.named_parameters()
    )
    with pytest.raises(ValueError, match="visual_mapping: true"):
        build_model(family, "tiny", vision={"hidden_size": 48, "num_attention_heads": 2})


def test_blip_records_which_checkpoint_each_part_came_from(tmp_path):
    """One head loads its checkpoint whole; several heads say which part came from where."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering

    tiny = build_model("blip", "tiny", heads=["vqa"]).config.blip
    config = BlipConfig(**{k: v for k, v in tiny.items()})
    BlipForQuestionAnswering(config).save_pretrained(tmp_path / "vqa")
    BlipForConditionalGeneration(config).save_pretrained(tmp_path / "cap")
    weights = {"vqa": str(tmp_path / "vqa"), "caption": str(tmp_path / "cap")}
    one = build_model("blip", "tiny", heads=["caption"], pretrained=True, weights=weights)
    assert set(one.weight_sources.values()) == {
        f"{tmp_path / 'cap'} (BlipForConditionalGeneration)"
    }
    both = build_model("blip", "tiny", heads=["vqa", "caption"], pretrained=True, weights=weights)
    # the captioning head runs with the VQA checkpoint's decoder: said, not hidden
    assert both.weight_sources["text_decoder"].startswith(str(tmp_path / "vqa"))
    assert set(both.weight_sources) == {"vision_model", "text_encoder", "text_decoder"}
