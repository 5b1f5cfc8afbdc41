"""Measures of attention maps: head diversity, the class token's map, and the maps shared blocks receive."""

import pytest
import torch
from helpers import randomize_, tiny_config

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.attention_analysis import (
    class_token_attention,
    head_similarity,
    incoming_attention_maps,
    upsample_to_image,
)


def test_head_similarity_of_hand_made_maps():
    same = torch.rand(1, 5, 5).expand(4, 5, 5)
    assert head_similarity(same).item() == pytest.approx(1.0, abs=1e-6)
    orthogonal = torch.zeros(3, 2, 2)
    orthogonal[0, 0, 0] = orthogonal[1, 0, 1] = orthogonal[2, 1, 1] = 1.0
    assert head_similarity(orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    # Two heads at 60 degrees (cosine 0.5) plus a copy of the first: pairs 0.5, 1.0, 0.5 → mean 2/3.
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 3**0.5 / 2]])
    assert head_similarity(torch.stack([a, b, a])).item() == pytest.approx(2 / 3, abs=1e-6)
    batched = head_similarity(torch.stack([same, same]))
    assert batched.shape == (2,)
    with pytest.raises(ValueError, match="heads >= 2"):
        head_similarity(torch.rand(2, 1, 3, 3))


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
