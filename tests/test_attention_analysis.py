"""Measures of attention maps: head diversity, the class token's map, and the maps shared blocks receive."""

import math

import pytest
import torch
from helpers import randomize_, tiny_config

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.attention_analysis import (
    class_token_attention,
    column_similarity,
    cross_layer_similarity,
    head_similarity,
    incoming_attention_maps,
    similarity_by_layer,
    upsample_to_image,
)


def test_head_similarity_of_hand_made_maps():
    same = torch.rand(1, 5, 5).expand(4, 5, 5)
    assert head_similarity(same).item() == pytest.approx(1.0, abs=1e-6)
    assert head_similarity(same, centered=True).item() == pytest.approx(1.0, abs=1e-6)
    # Three heads that each send every token's attention to a different output token: disjoint columns, cosine 0.
    disjoint = torch.zeros(3, 3, 3)
    for head in range(3):
        disjoint[head, head, :] = 1.0
    assert head_similarity(disjoint).item() == pytest.approx(0.0, abs=1e-7)
    # Columns (1, 0, 0), (0, 1, 0), (0, 0, 1) centred: each pair correlates at -1/2.
    assert head_similarity(disjoint, centered=True).item() == pytest.approx(-0.5, abs=1e-6)
    # One column per map: two heads at 60 degrees (cosine 0.5) plus a copy of the first: 0.5, 1.0, 0.5 → mean 2/3.
    a, b = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.5], [3**0.5 / 2]])
    assert head_similarity(torch.stack([a, b, a])).item() == pytest.approx(2 / 3, abs=1e-6)
    # Heads eye, flipped eye, eye, flipped eye: the flip keeps only the middle column (0.2 per mixed pair, 1 per
    # equal pair): (4 * 0.2 + 2 * 1) / 6.
    eye = torch.eye(5)
    batched = head_similarity(torch.stack([same, torch.stack([eye, eye.flip(0)] * 2)]))
    torch.testing.assert_close(batched, torch.tensor([1.0, 2.8 / 6]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="heads >= 2"):
        head_similarity(torch.rand(2, 1, 3, 3))


def test_head_similarity_is_per_column_as_in_deepvit():
    # Column t of head h (what token t contributes to each output token) against the same column of the other head:
    # columns 0 equal (1), columns 1 (1, 0, 2) and (2, 0, 1) at cosine 4/5, columns 2 orthogonal (0).
    first = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [3.0, 2.0, 0.0]])
    second = torch.tensor([[1.0, 2.0, 0.0], [2.0, 0.0, 0.0], [3.0, 1.0, 4.0]])
    maps = torch.stack([first, second])
    cosines = column_similarity(first, second)
    expected = [1.0, (1 * 2 + 2 * 1) / (5**0.5 * 5**0.5), 0.0]
    torch.testing.assert_close(cosines, torch.tensor(expected), rtol=0, atol=1e-6)
    assert head_similarity(maps).item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    pearson = column_similarity(first, second, centered=True)
    assert pearson[0].item() == pytest.approx(1.0, abs=1e-6) and pearson[1].item() == pytest.approx(0.5, abs=1e-6)
    # The cosine of the whole flattened maps is another number (18 / sqrt(20 * 35)): it pairs all entries at once.
    whole = torch.nn.functional.cosine_similarity(first.flatten(), second.flatten(), dim=0)
    assert whole.item() == pytest.approx(18 / 700**0.5, abs=1e-6) and head_similarity(maps).item() == pytest.approx(0.6)


def test_centered_similarity_ignores_scale_and_offset():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 4, 17, 17, generator=generator).softmax(-1)
    # What a refinement's BatchNorm does to each head: a positive scale and an offset of its own.
    scale = torch.tensor([0.5, 3.0, 20.0, 1e-3])[None, :, None, None]
    offset = torch.tensor([-2.0, 0.7, 5.0, -0.01])[None, :, None, None]
    shifted = maps * scale + offset
    reference = head_similarity(maps, centered=True)
    assert reference.abs().min() > 0.01  # a value to keep, not a zero that any error would also give
    torch.testing.assert_close(head_similarity(shifted, centered=True), reference, rtol=1e-4, atol=0)
    torch.testing.assert_close(cross_layer_similarity(shifted, maps, centered=True), torch.ones(2), rtol=0, atol=1e-5)
    # The cosine is not: the offsets alone move it by much more than the centred measure moves at all.
    assert (head_similarity(shifted) - head_similarity(maps)).abs().min() > 0.1
    # A per-column offset (any constant added to a column) is also removed.
    per_column = maps + torch.rand(2, 4, 1, 17, generator=generator) * 10
    torch.testing.assert_close(head_similarity(per_column, True), head_similarity(maps, True), rtol=1e-4, atol=1e-6)
    # The sign is kept: an inverted map correlates at -1 with the original.
    torch.testing.assert_close(cross_layer_similarity(-maps, maps, centered=True), -torch.ones(2), rtol=0, atol=1e-5)


def test_cross_layer_similarity_of_hand_made_maps():
    maps = torch.rand(3, 9, 9).softmax(-1)
    assert cross_layer_similarity(maps, maps).item() == pytest.approx(1.0, abs=1e-6)
    assert cross_layer_similarity(maps, 4 * maps).item() == pytest.approx(1.0, abs=1e-6)
    # Each token's attention moved from output token 0 to output token 1: disjoint columns, cosine 0.
    before, after = torch.zeros(2, 3, 3), torch.zeros(2, 3, 3)
    before[:, 0, :], after[:, 1, :] = 1.0, 1.0
    assert cross_layer_similarity(before, after).item() == pytest.approx(0.0, abs=1e-7)
    assert cross_layer_similarity(before, after, centered=True).item() == pytest.approx(-0.5, abs=1e-6)


def test_constant_columns_are_left_out():
    # A uniform head has only constant columns: its centred correlations are undefined and skipped, not counted as 0.
    uniform, peaked = torch.full((4, 4), 0.25), torch.eye(4)
    column_values = column_similarity(uniform, peaked, centered=True)
    assert torch.isnan(column_values).all()
    assert head_similarity(torch.stack([peaked, peaked, uniform]), centered=True).item() == pytest.approx(1.0)
    assert math.isnan(head_similarity(torch.stack([uniform, uniform]), centered=True).item())
    # The plain cosine is defined for them (DeepViT's measure): a uniform column against a one-hot one, 1/2.
    assert column_similarity(uniform, peaked)[0].item() == pytest.approx(0.5, abs=1e-6)


def test_similarity_by_layer_reports_both_measures_before_and_after():
    model = randomize_(RefinerViTForImageClassification(tiny_config())).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 32, 32), output_attentions=True, output_unrefined_attentions=True)
    used, unrefined = outputs.attentions, outputs.unrefined_attentions
    rows = similarity_by_layer(used, unrefined, model.config.block_types)
    assert [(row.layer, row.block_type) for row in rows] == [(0, "refined"), (1, "shared"), (2, "plain"), (3, "shared")]
    for row, after, before in zip(rows, used, unrefined):
        assert row.head_cosine_after == pytest.approx(head_similarity(after).mean().item(), abs=1e-6)
        assert row.head_pearson_before == pytest.approx(head_similarity(before, True).mean().item(), abs=1e-6)
    assert math.isnan(rows[0].cross_layer_cosine_before) and math.isnan(rows[0].cross_layer_pearson_after)
    # A shared block refines the map the block before used: before refinement the two layers agree exactly.
    assert rows[1].cross_layer_cosine_before == pytest.approx(1.0, abs=1e-6)
    assert rows[1].cross_layer_pearson_before == pytest.approx(1.0, abs=1e-6)
    assert rows[1].cross_layer_pearson_after == pytest.approx(
        cross_layer_similarity(used[1], used[0], centered=True).mean().item(), abs=1e-6
    )
    # A plain block uses the map it computed: before and after are the same map.
    assert rows[2].head_cosine_before == rows[2].head_cosine_after
    assert rows[2].head_pearson_before == rows[2].head_pearson_after
    with pytest.raises(ValueError, match="for 3 blocks"):
        similarity_by_layer(used, unrefined, ["plain"] * 3)


def test_class_token_attention_reads_the_first_row_as_a_grid():
    attention = torch.zeros(2, 5, 5)
    attention[1, 0, 1 + 3] = 1.0  # the class token attends to patch 3 = row 1, column 1 of a 2x2 grid
    grid = class_token_attention(attention)
    assert grid.shape == (2, 2, 2) and grid[1, 1, 1] == 1.0 and grid.sum() == 1.0


def test_incoming_maps_follow_what_each_block_passes_on():
    model = randomize_(RefinerViTForImageClassification(tiny_config())).eval()
    with torch.no_grad():
        attentions = model(torch.randn(1, 3, 32, 32), output_attentions=True).attentions
    incoming = incoming_attention_maps(attentions, model.config.block_types)
    # refined, shared, plain, shared: block 1 refines block 0's (refined) map, block 3 refines block 2's map.
    assert incoming[0] is None
    assert incoming[1] is attentions[0] and incoming[2] is attentions[0] and incoming[3] is attentions[2]
    layer = model.refiner_vit.layers[1].attention
    with torch.no_grad():
        expected = layer.adapt_bn(layer.refiner(incoming[1])) * layer.scaling
    torch.testing.assert_close(attentions[1], expected)


def test_unrefined_maps_are_what_each_block_refines():
    model = randomize_(RefinerViTForImageClassification(tiny_config())).eval()
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 32, 32), output_attentions=True, output_unrefined_attentions=True)
        used, unrefined = outputs.attentions, outputs.unrefined_attentions
        assert len(unrefined) == 4 and all(u.shape == a.shape for u, a in zip(unrefined, used))
        attention_modules = [layer.attention for layer in model.refiner_vit.layers]
        # refined (0): the used map is the refinement of the unrefined one; shared (1, 3): the unrefined map is the
        # incoming one and the used map its refinement, scaled; plain (2): nothing to refine.
        refined = attention_modules[0]
        torch.testing.assert_close(used[0], refined.adapt_bn(refined.refiner(unrefined[0])), rtol=0, atol=1e-6)
        assert torch.equal(unrefined[1], used[0]) and torch.equal(unrefined[3], used[2])
        for index in (1, 3):
            shared = attention_modules[index]
            expected = shared.adapt_bn(shared.refiner(unrefined[index])) * shared.scaling
            torch.testing.assert_close(used[index], expected, rtol=0, atol=1e-6)
        assert torch.equal(unrefined[2], used[2])
        # The softmax rows of the refined block's input sum to one (no incoming map in the first block).
        torch.testing.assert_close(unrefined[0].sum(-1), torch.ones(2, 4, 17))
        # Not asked for: not returned, and the other outputs are unchanged.
        plain_call = model(torch.randn(2, 3, 32, 32), output_attentions=True)
        assert plain_call.unrefined_attentions is None


def test_unrefined_maps_of_the_fast_path_match_the_reference():
    model = randomize_(RefinerViTForImageClassification(tiny_config())).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(pixel_values, output_unrefined_attentions=True).unrefined_attentions
        model.set_fast_inference()
        fast = model(pixel_values, output_unrefined_attentions=True).unrefined_attentions
    for expected, actual in zip(reference, fast):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_upsampled_map_peaks_in_its_patch_and_spans_zero_to_one():
    grid = torch.zeros(4, 4)
    grid[1, 2] = 3.0
    image_map = upsample_to_image(grid, (64, 64))
    assert image_map.shape == (64, 64) and image_map.min() == 0.0 and image_map.max() == 1.0
    row, column = divmod(int(image_map.argmax()), 64)
    assert 16 <= row < 32 and 32 <= column < 48
    assert torch.equal(upsample_to_image(torch.ones(3, 3), (9, 9)), torch.zeros(9, 9))
    # On a given scale: the same map over a range twice as wide peaks at the middle, values below it clip to 0.
    shared = upsample_to_image(grid, (64, 64), value_range=(-3.0, 3.0))
    assert shared.min().item() == pytest.approx(0.5) and 0.9 < shared.max().item() < 1.0
    torch.testing.assert_close((shared - 0.5) / (shared.max() - 0.5), image_map)
    assert upsample_to_image(grid - 1, (64, 64), value_range=(0.0, 2.0)).min() == 0.0
    with pytest.raises(ValueError, match="low < high"):
        upsample_to_image(grid, (8, 8), value_range=(1.0, 1.0))
