"""Measures of attention maps: head diversity, the class token's map, and the maps shared blocks receive."""

import pytest
import torch
from conftest import randomize_, tiny_config

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.attention_analysis import class_token_attention, head_similarity, incoming_attention_maps


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
