"""CLIP-BART's ``visual_embedding: vl_t5``: VL-T5's visual embedding (VL-Adapter's CLIP-BART)
against its definition written out, and the default unchanged."""

import torch

import vlpeft


def encoder_input(model, batch) -> torch.Tensor:
    """What the first encoder layer receives (after the embeddings' LayerNorm, dropout off)."""
    seen = {}
    layer = model.bart.model.encoder.layers[0]

    def keep(module, args) -> None:
        seen["x"] = args[0]

    handle = layer.register_forward_pre_hook(keep)
    try:
        model.encode(batch)
    finally:
        handle.remove()
    return seen["x"]


def batch_of(model, images: int = 1) -> dict:
    torch.manual_seed(0)
    shape = (2, images, 3, 32, 32) if images > 1 else (2, 3, 32, 32)
    return {"images": torch.randn(shape), "text": ["vqa: what is it?", "vqa: a b c d e"]}


def test_vl_t5_visual_tokens_skip_the_embeddings_layer_norm_and_add_box_and_order():
    model = vlpeft.build_model("clip-bart", "tiny", image_size=32, visual_embedding="vl_t5").eval()
    with torch.no_grad():  # non-trivial box embedding and layer norms
        for p in [*model.box_embedding.parameters(), *model.visual_proj.parameters()]:
            p.add_(torch.randn_like(p) * 0.1)
    for images in (1, 2):
        batch = batch_of(model, images)
        got = encoder_input(model, batch)
        features = model.visual_features(batch["images"])
        features = features.unsqueeze(1) if features.dim() == 3 else features
        proj = model.visual_proj(features)  # (B, n_images, N, d)
        box = model.box_embedding(torch.zeros(5))
        order = model.image_order.weight[: proj.shape[1]][None, :, None]
        objects = model.object_order[: proj.shape[2]]
        visual = (proj + order + box + objects).flatten(1, 2)
        n = visual.shape[1]
        torch.testing.assert_close(got[:, -n:], visual)  # no layernorm_embedding on them
        text = model.tokenize(batch["text"])["input_ids"]
        encoder = model.bart.model.encoder
        embeds = encoder.embed_tokens(text) + encoder.embed_positions(text)
        torch.testing.assert_close(got[:, :-n], encoder.layernorm_embedding(embeds))
    # frozen, and the same draw in every build; the box embedding trains
    again = vlpeft.build_model("clip-bart", "tiny", image_size=32, visual_embedding="vl_t5")
    assert torch.equal(again.object_order, model.object_order)
    assert "object_order" not in dict(model.named_parameters())
    assert abs(model.object_order.std().item() - model.bart.config.init_std) < 0.01
    vlpeft.add_adapter(again, again.adapter_config(vlpeft.LoRAConfig(targets=["q_proj"], r=2)))
    trained = {n for n, p in again.named_parameters() if p.requires_grad}
    assert {"box_embedding.0.weight", "box_embedding.0.bias", "box_embedding.1.weight"} <= trained


def test_the_default_puts_the_visual_tokens_through_the_embeddings_layer_norm():
    model = vlpeft.build_model("clip-bart", "tiny", image_size=32).eval()
    batch = batch_of(model)
    got = encoder_input(model, batch)
    visual = model.visual_tokens(batch)
    n = visual.shape[1]
    torch.testing.assert_close(got[:, -n:], model.bart.model.encoder.layernorm_embedding(visual))
    assert not hasattr(model, "box_embedding")


def test_an_unknown_visual_embedding_is_refused():
    import pytest

    with pytest.raises(ValueError, match=r"visual_embedding must be one of \['vlpeft', 'vl_t5'\]"):
        vlpeft.build_model("clip-bart", "tiny", visual_embedding="vlt5")
