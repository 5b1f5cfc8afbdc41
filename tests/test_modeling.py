"""RefinerViTModel / RefinerViTForImageClassification: outputs, loss, training features, saving and Auto classes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import loss_gradients_and_statistics, randomize_, tiny_config
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    pipeline,
)

from refiner_hf import (
    RefinerViTForImageClassification,
    RefinerViTImageProcessor,
    RefinerViTImageProcessorPil,
    RefinerViTModel,
)
from refiner_hf.modeling_refiner_vit import RefinerViTAttention


@pytest.fixture
def model() -> RefinerViTForImageClassification:
    torch.manual_seed(0)
    return randomize_(RefinerViTForImageClassification(tiny_config())).eval()


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_output_shapes_and_combined_logits(model, pixel_values):
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == out.cls_logits.shape == (2, 5)
    assert out.aux_logits.shape == (2, 16, 5)
    torch.testing.assert_close(out.logits, out.cls_logits + 0.5 * out.aux_logits.max(dim=1).values)
    assert len(out.hidden_states) == 5 and all(h.shape == (2, 17, 24) for h in out.hidden_states)
    assert len(out.attentions) == 4 and all(a.shape == (2, 4, 17, 17) for a in out.attentions)
    base = model.refiner_vit(pixel_values)
    torch.testing.assert_close(base.last_hidden_state, model.refiner_vit.layernorm(out.hidden_states[-1]))
    torch.testing.assert_close(base.pooler_output, base.last_hidden_state[:, 0])
    torch.testing.assert_close(out.cls_logits, model.classifier(base.pooler_output))


def test_attentions_are_the_maps_each_block_used(model, pixel_values):
    """Recomputes every block's map from its input, following the block-type rules."""
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True, output_attentions=True)
        layers = model.refiner_vit.layers
        scale = 6**-0.5
        incoming = None
        for i, layer in enumerate(layers):
            x = layer.layernorm_before(out.hidden_states[i] * 0.5)
            attn = layer.attention
            if layer.block_type == "shared":
                used = attn.adapt_bn(attn.refiner(incoming)) * scale
            else:
                q, k, _ = attn.qkv(x).reshape(2, 17, 3, 4, 6).permute(2, 0, 3, 1, 4)
                softmax = (q @ k.transpose(-2, -1) * scale).softmax(-1)
                used = softmax if incoming is None else softmax + scale * incoming
                if layer.block_type == "refined":
                    used = attn.adapt_bn(attn.refiner(used))
                incoming = used
            torch.testing.assert_close(out.attentions[i], used, atol=1e-5, rtol=1e-4)
    # The first block is refined, so its map is not a softmax any more; the plain block's own part is one.
    assert not torch.allclose(out.attentions[0].sum(-1), torch.ones(2, 4, 17))


def test_return_dict_false_gives_a_tuple(model, pixel_values):
    with torch.no_grad():
        as_tuple = model(pixel_values, return_dict=False)
        as_output = model(pixel_values)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.logits)


def test_loss_with_class_indices_and_soft_targets(model, pixel_values):
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        out = model(pixel_values, labels=labels)
        cls_part = F.cross_entropy(out.cls_logits, labels)
        aux_part = F.cross_entropy(out.aux_logits.reshape(-1, 5), labels.repeat_interleave(16))
        torch.testing.assert_close(out.loss, cls_part + 0.5 * aux_part)
        one_hot = model(pixel_values, labels=F.one_hot(labels, 5).float())
        torch.testing.assert_close(one_hot.loss, out.loss)
        # A mixup target: 0.7 of one class, 0.3 of another.
        soft = torch.tensor([[0.0, 0.7, 0.0, 0.3, 0.0], [0.3, 0.0, 0.0, 0.7, 0.0]])
        mixed = model(pixel_values, labels=soft)
        expected = -(soft * out.cls_logits.log_softmax(-1)).sum(-1).mean()
        expected = expected - 0.5 * (soft[:, None] * out.aux_logits.log_softmax(-1)).sum(-1).mean()
        torch.testing.assert_close(mixed.loss, expected)
    with pytest.raises(ValueError, match=r"Soft `labels` must have shape \(batch_size, num_labels\)"):
        model(pixel_values, labels=torch.rand(2, 4))


def test_loss_without_aux_head(pixel_values):
    model = randomize_(RefinerViTForImageClassification(tiny_config(use_aux_head=False))).eval()
    labels = torch.tensor([0, 4])
    with torch.no_grad():
        out = model(pixel_values, labels=labels)
    assert out.aux_logits is None
    torch.testing.assert_close(out.logits, out.cls_logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.cls_logits, labels))


def test_gradient_checkpointing_gives_the_same_loss_gradients_and_statistics(pixel_values):
    config = tiny_config(drop_path_rate=0.3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    reference = randomize_(RefinerViTForImageClassification(config)).train()
    checkpointed = copy.deepcopy(reference)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.refiner_vit.gradient_checkpointing
    labels = torch.tensor([2, 0])
    loss_a, grads_a, buffers_a = loss_gradients_and_statistics(reference, pixel_values, labels)
    loss_b, grads_b, buffers_b = loss_gradients_and_statistics(checkpointed, pixel_values, labels)
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)
    # BatchNorm statistics are updated once per forward, not again when a block is recomputed.
    for name in buffers_a:
        torch.testing.assert_close(buffers_a[name], buffers_b[name], atol=0, rtol=0, msg=name)
    assert buffers_b["refiner_vit.layers.0.attention.adapt_bn.num_batches_tracked"].item() == 1


def test_drop_path_rates_rise_linearly_and_act_only_in_training(pixel_values):
    model = randomize_(RefinerViTForImageClassification(tiny_config(drop_path_rate=0.3)))
    rates = [layer.drop_path.drop_prob for layer in model.refiner_vit.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    model.eval()
    with torch.no_grad():
        first, second = model(pixel_values).logits, model(pixel_values).logits
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        trained = [model(pixel_values).logits for _ in range(3)]
    assert not all(torch.equal(trained[0], t) for t in trained[1:])


def test_initialisation_follows_the_released_code():
    torch.manual_seed(0)
    model = RefinerViTForImageClassification(tiny_config(hidden_size=96, mlp_ratio=3.0))
    fc1 = model.refiner_vit.layers[0].mlp.fc1
    # timm's trunc_normal_(std=0.02) truncates at +-2 (absolute), so in effect it is a plain normal of std 0.02.
    assert 0.019 < fc1.weight.std() < 0.021 and fc1.weight.abs().max() > 0.06
    assert torch.all(fc1.bias == 0)
    assert torch.all(model.refiner_vit.layers[1].mlp.layer_scale == 1e-5)
    assert torch.all(model.refiner_vit.layers[0].layernorm_before.weight == 1)
    embeddings = model.refiner_vit.embeddings
    assert 0.01 < embeddings.position_embeddings.std() < 0.03 and embeddings.cls_token.abs().max() < 0.1
    bn = model.refiner_vit.layers[0].attention.adapt_bn
    assert torch.all(bn.running_var == 1) and torch.all(bn.running_mean == 0) and torch.all(bn.weight == 1)
    conv = model.refiner_vit.embeddings.patch_embeddings.conv1
    bound = 1 / (3 * 7 * 7) ** 0.5  # PyTorch's default (kaiming uniform, a=sqrt(5)) bound
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound


def test_interpolate_pos_encoding(model, pixel_values):
    with torch.no_grad():
        same = model(pixel_values, interpolate_pos_encoding=True)
        plain = model(pixel_values)
        torch.testing.assert_close(same.logits, plain.logits, atol=0, rtol=0)
        larger = model(torch.randn(1, 3, 48, 64), interpolate_pos_encoding=True, output_attentions=True)
    assert larger.aux_logits.shape == (1, 6 * 8, 5)
    assert larger.attentions[0].shape == (1, 4, 49, 49)
    # The class token's entry is kept and the patch grid is resized bicubically.
    embeddings = model.refiner_vit.embeddings
    resized = embeddings.interpolate_pos_encoding(6, 8)
    torch.testing.assert_close(resized[:, 0], embeddings.position_embeddings[:, 0])
    grid = embeddings.position_embeddings[:, 1:].reshape(1, 4, 4, 24).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(resized[:, 1:], expected)


def test_wrong_image_size_or_channels_is_a_clear_error(model):
    with pytest.raises(
        ValueError, match=r"Input image size \(48\*48\) doesn't match the model \(32\*32\).*interpolate_pos_encoding"
    ):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="has 1 channels but the model expects 3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"must have shape \(batch_size, num_channels, height, width\)"):
        model(torch.randn(3, 32, 32))


def test_shared_block_needs_an_incoming_map():
    attention = RefinerViTAttention(tiny_config(), "shared")
    with pytest.raises(ValueError, match="needs the attention map of a previous block"):
        attention(torch.randn(1, 17, 24), None)


def test_save_and_load_round_trip_with_auto_classes(model, pixel_values, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    for auto in (AutoModelForImageClassification, RefinerViTForImageClassification):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, RefinerViTForImageClassification)
        with torch.no_grad():
            torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, atol=0, rtol=0)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, RefinerViTModel)
    with torch.no_grad():
        torch.testing.assert_close(
            base(pixel_values).last_hidden_state, model.refiner_vit(pixel_values).last_hidden_state, atol=0, rtol=0
        )
    assert AutoConfig.from_pretrained(tmp_path).block_types == model.config.block_types


def test_auto_image_processor_and_pipeline(model, tmp_path):
    id2label = {i: name for i, name in enumerate(["tabby", "tiger", "lynx", "otter", "heron"])}
    model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
    model.save_pretrained(tmp_path)
    processor = RefinerViTImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, crop_pct=0.9
    )
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, RefinerViTImageProcessor)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path, backend="pil"), RefinerViTImageProcessorPil)

    from refiner_hf.assets import sample_image_path

    image = Image.open(sample_image_path())
    with torch.no_grad():
        probabilities = model(**loaded(image, return_tensors="pt")).logits.softmax(-1)[0]
    top = probabilities.topk(3)
    classifier = pipeline("image-classification", model=str(tmp_path))
    predictions = classifier(image, top_k=3)
    assert [p["label"] for p in predictions] == [id2label[i] for i in top.indices.tolist()]
    assert [p["score"] for p in predictions] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_performance_switches_chain_and_return_the_model(model, pixel_values):
    assert model.eval().set_fast_inference() is model
    assert all(layer.fast_inference for layer in model.refiner_vit.layers)
    assert model.set_fast_inference(False).set_memory_lean_training() is model
    assert all(layer.attention.memory_lean_training for layer in model.refiner_vit.layers)
    assert not any(layer.fast_inference for layer in model.refiner_vit.layers)


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2", "flex_attention"])
def test_fused_attention_implementations_are_refused_with_the_reason(model, tmp_path, implementation):
    message = (
        rf"cannot use attn_implementation='{implementation}'.*convolves it.*Use \"fused\" \(the default.*\"eager\""
    )
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        RefinerViTForImageClassification.from_pretrained(tmp_path, attn_implementation=implementation)
    with pytest.raises(ValueError, match=message):
        model.set_attn_implementation(implementation)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path, attn_implementation="eager")
    assert loaded.config._attn_implementation == "eager"


def test_the_fused_computation_is_the_default_and_eager_the_reference(model, pixel_values, tmp_path):
    """
    Built, loaded and in a pipeline, a model runs the fast path in evaluation mode and memory-lean refinement in
    training (`attn_implementation="fused"`); `"eager"` (at loading or later) switches both to the reference
    computation, and back. The maps before and after refinement are returned either way, equal to float rounding.
    """

    def switches(m):
        attention = [layer.attention for layer in m.refiner_vit.layers]
        return {(layer.fast_inference, a.fast_inference, a.memory_lean_training)
                for layer, a in zip(m.refiner_vit.layers, attention)}  # fmt: skip

    assert model.config._attn_implementation == "fused" and switches(model) == {(True, True, True)}
    model.save_pretrained(tmp_path)
    processor = RefinerViTImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    assert "attn_implementation" not in (tmp_path / "config.json").read_text()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.config._attn_implementation == "fused" and switches(loaded) == {(True, True, True)}
    classifier = pipeline("image-classification", model=str(tmp_path))
    assert switches(classifier.model) == {(True, True, True)} and not classifier.model.training
    eager_model = AutoModelForImageClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert switches(eager_model) == {(False, False, False)}

    requested = {"output_attentions": True, "output_unrefined_attentions": True, "output_hidden_states": True}
    with torch.no_grad():
        fused, reference = loaded(pixel_values, **requested), eager_model(pixel_values, **requested)
    for name in ("logits", "attentions", "unrefined_attentions", "hidden_states"):
        expected, actual = getattr(reference, name), getattr(fused, name)
        expected, actual = (expected, actual) if name == "logits" else (torch.stack(expected), torch.stack(actual))
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), rtol=0)
    eager_model.set_attn_implementation("fused")
    assert switches(eager_model) == {(True, True, True)}
    loaded.set_attn_implementation("eager")
    assert loaded.config._attn_implementation == "eager" and switches(loaded) == {(False, False, False)}


def passed_on_maps(model, pixel_values) -> list[torch.Tensor]:
    """The maps each block hands to the next, rebuilt from the maps the blocks used: a shared block passes on the map
    it received, every other block the map it used."""
    used = model(pixel_values, output_attentions=True).attentions
    passed = []
    for block_type, attention in zip(model.config.block_types, used):
        passed.append(passed[-1] if block_type == "shared" else attention)
    return passed


@pytest.mark.parametrize("pairs", [1, 2, 3])
def test_attention_similarity_regulariser_value_and_gradient(pixel_values, pairs):
    config = tiny_config(attention_similarity_pairs=pairs, block_types=["refined", "shared", "plain", "refined"])
    model = randomize_(RefinerViTForImageClassification(config)).train()
    labels = torch.tensor([1, 3])
    torch.manual_seed(0)
    outputs = model(pixel_values, labels=labels)
    grads = torch.autograd.grad(outputs.loss, list(model.parameters()), allow_unused=True)

    # The original code's formula, written out: 0.1 / n * sum_i mean(CosineSimilarity(dim=1)(A_i, A_{i+1})).
    torch.manual_seed(0)
    maps = passed_on_maps(model, pixel_values)[: pairs + 1]
    similarity = sum(torch.nn.CosineSimilarity(dim=1)(maps[i], maps[i + 1]).mean() for i in range(pairs)) / pairs
    plain = model(pixel_values, labels=labels)  # the regulariser is computed again inside: subtract it
    expected_loss = plain.loss - 0.1 * plain.attention_similarity + 0.1 * similarity
    torch.testing.assert_close(outputs.attention_similarity, similarity.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outputs.loss, expected_loss.detach(), atol=1e-6, rtol=1e-6)
    expected_grads = torch.autograd.grad(expected_loss, list(model.parameters()), allow_unused=True)
    for (name, _), got, expected in zip(model.named_parameters(), grads, expected_grads):
        if expected is None:
            assert got is None or torch.all(got == 0), name
        else:
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=name)


def test_attention_similarity_is_off_by_default_and_outside_training(pixel_values):
    model = randomize_(RefinerViTForImageClassification(tiny_config(attention_similarity_pairs=2)))
    assert model.eval()(pixel_values, labels=torch.tensor([0, 1])).attention_similarity is None
    assert (
        randomize_(RefinerViTForImageClassification(tiny_config())).train()(pixel_values).attention_similarity is None
    )
    with pytest.raises(
        ValueError, match=r"`attention_similarity_pairs` must be in \[0, num_hidden_layers\) = \[0, 4\)"
    ):
        tiny_config(attention_similarity_pairs=4)
