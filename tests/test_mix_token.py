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
