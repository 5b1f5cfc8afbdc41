"""MixToken: the box, the token swap and its undoing, and the class-target weight."""

import math

import pytest
import torch

from refiner_hf.mix_token import MixTokenBox, mix_class_targets, sample_mix_token_box, swap_box_with_reversed_batch


def test_swap_with_the_reversed_batch_on_a_hand_made_example():
    grid = torch.arange(3 * 1 * 3 * 4, dtype=torch.float32).reshape(3, 1, 3, 4)  # B=3, C=1, 3x4 tokens
    box = MixTokenBox(row_start=1, row_end=3, col_start=0, col_end=2, height=3, width=4)
    mixed = swap_box_with_reversed_batch(grid, box)
    for b in range(3):
        for row in range(3):
            for col in range(4):
                inside = 1 <= row < 3 and 0 <= col < 2
                source = 2 - b if inside else b
                assert mixed[b, 0, row, col] == grid[source, 0, row, col]
    assert torch.equal(swap_box_with_reversed_batch(mixed, box), grid)
    # The same swap on (B, h, w, C) outputs, as the auxiliary head produces them, undoes the mixing.
    outputs = mixed.permute(0, 2, 3, 1)
    torch.testing.assert_close(swap_box_with_reversed_batch(outputs, box, channels_last=True), grid.permute(0, 2, 3, 1))


def test_class_target_weight_is_one_minus_the_box_share():
    box = MixTokenBox(0, 2, 1, 4, height=4, width=4)  # 6 of 16 tokens
    assert box.area == 6 and box.kept_fraction == pytest.approx(10 / 16)
    targets = torch.eye(3)
    mixed = mix_class_targets(targets, box)
    torch.testing.assert_close(mixed[0], torch.tensor([10 / 16, 0.0, 6 / 16]))
    torch.testing.assert_close(mixed.sum(-1), torch.ones(3))


def test_sampled_boxes_follow_the_released_rule():
    torch.manual_seed(0)
    for _ in range(200):
        state = torch.get_rng_state()
        box = sample_mix_token_box(14, 14)
        torch.set_rng_state(state)
        lam = torch.distributions.Beta(1.0, 1.0).sample().item()
        center_row, center_col = int(torch.randint(14, ())), int(torch.randint(14, ()))
        cut = int(14 * math.sqrt(1 - lam))
        assert box.row_start == max(center_row - cut // 2, 0) and box.row_end == min(center_row + cut // 2, 14)
        assert box.col_start == max(center_col - cut // 2, 0) and box.col_end == min(center_col + cut // 2, 14)
        assert 0 <= box.area <= 14 * 14


def test_model_mixes_tokens_unmixes_aux_outputs_and_mixes_the_class_target():
    import torch.nn.functional as F
    from helpers import randomize_, tiny_config

    from refiner_hf import RefinerViTForImageClassification

    # Patch stem and plain blocks: no BatchNorm, so training mode computes what evaluation mode does (no dropout),
    # and mixing 8-pixel patches of the images mixes exactly the tokens.
    config = tiny_config(stem_type="patch", block_types=["plain"] * 4, use_mix_token=True)
    model = randomize_(RefinerViTForImageClassification(config))
    pixel_values = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([0, 2, 4])
    torch.manual_seed(3)
    mixed = model.train()(pixel_values, labels=labels)
    row_start, row_end, col_start, col_end = mixed.mix_token_box.tolist()
    box = MixTokenBox(row_start, row_end, col_start, col_end, height=4, width=4)
    assert box.area > 0

    pixel_mask = box.mask().repeat_interleave(8, 0).repeat_interleave(8, 1)
    mixed_images = torch.where(pixel_mask, pixel_values.flip(0), pixel_values)
    with torch.no_grad():
        reference = model.eval()(mixed_images)
    torch.testing.assert_close(mixed.cls_logits, reference.cls_logits)
    unmixed = swap_box_with_reversed_batch(reference.aux_logits.reshape(3, 4, 4, 5), box, channels_last=True)
    torch.testing.assert_close(mixed.aux_logits, unmixed.reshape(3, 16, 5))

    kept = 1 - box.area / 16
    class_targets = kept * F.one_hot(labels, 5).float() + (1 - kept) * F.one_hot(labels.flip(0), 5).float()
    expected = -(class_targets * reference.cls_logits.log_softmax(-1)).sum(-1).mean()
    token_targets = F.one_hot(labels, 5).float()[:, None].expand(3, 16, 5)
    expected = expected - 0.5 * (token_targets * mixed.aux_logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(mixed.loss, expected)

    with torch.no_grad():
        evaluated, plain = model.eval()(pixel_values, mix_token=True), model(pixel_values)
    assert evaluated.mix_token_box is None
    torch.testing.assert_close(evaluated.logits, plain.logits, atol=0, rtol=0)


def test_dense_loss_against_a_hand_computation():
    from helpers import tiny_config

    from refiner_hf import RefinerViTForImageClassification

    model = RefinerViTForImageClassification(tiny_config(num_labels=3, aux_loss_weight=0.5))
    cls_logits = torch.tensor([[2.0, 0.0, -1.0]])
    aux_logits = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([0])
    dense = torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]])
    loss = model.compute_loss(cls_logits, aux_logits, labels, dense_labels=dense)
    cls_part = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    token_1 = -math.log(math.e / (math.e + 2))
    token_2 = -(0.5 * math.log(1 / 3) + 0.5 * math.log(1 / 3))
    assert loss.item() == pytest.approx(cls_part + 0.5 * (token_1 + token_2) / 2, rel=1e-6)
    # (B, C, h, w) dense labels are read in the patch tokens' (row-major) order.
    grid = dense.transpose(1, 2).reshape(1, 3, 1, 2)
    assert model.compute_loss(cls_logits, aux_logits, labels, dense_labels=grid).item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match="must match the auxiliary logits' shape"):
        model.compute_loss(cls_logits, aux_logits, labels, dense_labels=dense[:, :1])


def test_dense_labels_need_the_aux_head_and_class_labels():
    from helpers import tiny_config

    from refiner_hf import RefinerViTForImageClassification

    pixel_values = torch.randn(1, 3, 32, 32)
    no_aux = RefinerViTForImageClassification(tiny_config(use_aux_head=False))
    with pytest.raises(ValueError, match="auxiliary head, but this model has none"):
        no_aux(pixel_values, labels=torch.tensor([1]), dense_labels=torch.rand(1, 16, 5))
    with pytest.raises(ValueError, match="need `labels` too"):
        RefinerViTForImageClassification(tiny_config())(pixel_values, dense_labels=torch.rand(1, 16, 5))
