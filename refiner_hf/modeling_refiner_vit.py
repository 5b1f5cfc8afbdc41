"""PyTorch Refiner-ViT model ("Refiner: Refining Self-attention for Vision Transformers", Zhou et al., 2021)."""

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .cli import DataError
from .configuration_refiner_vit import (
    RefinerViTConfig,
    count_parameters,
    estimate_memory,
    format_bytes,
    machine_memory,
    refuse_preset_name,
)
from .fast_inference import (
    FoldedRefinement,
    attention_context_fused,
    attention_probs,
    batch_norm_scale_shift,
    can_fold,
    fold_into_conv,
    refine_folded_fused,
    scaled_layer_norm,
)
from .memory_lean_training import RefinementParameters, refine_train_fused
from .mix_token import MixTokenBox, mix_class_targets, sample_mix_token_box, swap_box_with_reversed_batch
from .triton_attention import attention_probs as triton_attention_probs
from .triton_attention import can_fuse as triton_can_fuse


@dataclass
class RefinerViTImageClassifierOutput(ModelOutput):
    r"""
    Output of [`RefinerViTForImageClassification`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Cross entropy of the class token's logits, plus `config.aux_loss_weight` times the mean cross entropy of
            every patch token's auxiliary logits when the model has the auxiliary head, plus, in training mode,
            `config.attention_similarity_weight` times `attention_similarity` when `config.attention_similarity_pairs`
            is set.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            The prediction: `cls_logits + config.aux_logits_weight * aux_logits.max(dim=1)` with the auxiliary
            head, `cls_logits` without.
        cls_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Logits of the class token's head.
        aux_logits (`torch.FloatTensor` of shape `(batch_size, num_patches, num_labels)`, *optional*):
            Logits of the auxiliary head for every patch token.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The embeddings and the output of each block, each of shape `(batch_size, num_patches + 1, hidden_size)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            For each block, the attention map it multiplied with the values, of shape
            `(batch_size, num_heads, num_patches + 1, num_patches + 1)`: refined maps for refined and shared blocks.
        unrefined_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when
            `output_unrefined_attentions=True`):
            For each block, the attention map before refinement, shaped like `attentions`: what the refinement of a
            refined block starts from (its softmax map plus the scaled incoming map), the incoming map for a shared
            block, and the map used (the same as in `attentions`) for a plain block.
        attention_similarity (`torch.FloatTensor` of shape `()`, *optional*, returned in training mode when
            `config.attention_similarity_pairs > 0`):
            The regulariser's similarity term (see [`attention_similarity`]), before its weight; part of `loss`.
        mix_token_box (`torch.LongTensor` of shape `(4,)`, *optional*, returned when MixToken was applied):
            Rows `[0:1]` and columns `[2:3]` (start, end) of the token-grid box whose tokens came from the reversed
            batch. `aux_logits` are already swapped back, so each lines up with its own image.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cls_logits: torch.FloatTensor | None = None
    aux_logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    unrefined_attentions: tuple[torch.FloatTensor, ...] | None = None
    mix_token_box: torch.LongTensor | None = None
    attention_similarity: torch.FloatTensor | None = None


@dataclass
class RefinerViTModelOutput(BaseModelOutputWithPooling):
    r"""
    Output of [`RefinerViTModel`]: [`~modeling_outputs.BaseModelOutputWithPooling`] (the pooled output is the class
    token after the final LayerNorm) with the attention maps before refinement.

    Args:
        unrefined_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when
            `output_unrefined_attentions=True`):
            For each block, the attention map before refinement, of shape
            `(batch_size, num_heads, num_patches + 1, num_patches + 1)`; see
            [`RefinerViTImageClassifierOutput`].
        attention_similarity (`torch.FloatTensor` of shape `()`, *optional*, returned in training mode when
            `config.attention_similarity_pairs > 0`):
            [`attention_similarity`] of the first `attention_similarity_pairs + 1` maps the blocks pass on.
    """

    unrefined_attentions: tuple[torch.FloatTensor, ...] | None = None
    attention_similarity: torch.FloatTensor | None = None


def attention_similarity(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """
    The similarity of consecutive attention maps that the original training penalises (`cos_reg_component`): for n+1
    maps `(batch, heads, tokens, tokens)`, the mean over the n consecutive pairs of the cosine similarity between the
    heads' vectors of two maps at each position, averaged over the batch and the positions.
    """
    if len(maps) < 2:
        raise ValueError(f"The attention similarity compares consecutive maps: it needs at least two, got {len(maps)}.")
    pairs = [F.cosine_similarity(first, second, dim=1).mean() for first, second in zip(maps, maps[1:])]
    return torch.stack(pairs).mean()


def drop_path(input: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Drops whole samples of a residual branch (stochastic depth), rescaling the kept ones."""
    if drop_prob == 0.0 or not training:
        return input
    keep_prob = 1 - drop_prob
    shape = (input.shape[0],) + (1,) * (input.ndim - 1)
    random_tensor = torch.rand(shape, dtype=input.dtype, device=input.device)
    return input.div(keep_prob) * (random_tensor < keep_prob).to(input.dtype)


class RefinerViTDropPath(nn.Module):
    """Stochastic depth per sample on the residual branch."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return drop_path(hidden_states, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class RefinerViTConvStem(nn.Module):
    """
    The released models' stem: three convolutions (the first with stride 2) with BatchNorm and ReLU, then a
    `patch_size // 2` strided projection, so that each token covers `patch_size` pixels.
    """

    # Evaluation mode runs `forward_folded` when set (`RefinerViTPreTrainedModel.set_fast_inference`).
    fast_inference: bool = False

    def __init__(self, config: RefinerViTConfig) -> None:
        super().__init__()
        c1, c2, c3 = config.stem_hidden_sizes
        self.conv1 = nn.Conv2d(config.num_channels, c1, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        half_patch = config.patch_size // 2
        self.projection = nn.Conv2d(c3, config.hidden_size, kernel_size=half_patch, stride=half_patch)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid of an image of `height` x `width` pixels (stride-2 convolution, then the projection)."""
        stride = self.projection.stride[0]
        return ((height - 1) // 2 + 1) // stride, ((width - 1) // 2 + 1) // stride

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.fast_inference and not self.training and can_fold(self.bn1, self.bn2, self.bn3):
            return self.forward_folded(pixel_values)
        hidden_states = F.relu(self.bn1(self.conv1(pixel_values)))
        hidden_states = F.relu(self.bn2(self.conv2(hidden_states)))
        hidden_states = F.relu(self.bn3(self.conv3(hidden_states)))
        return self.projection(hidden_states)

    def forward_folded(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """
        The forward in evaluation mode with each BatchNorm folded into the convolution before it, the convolutions in
        `channels_last` and the ReLUs in place; returns a `channels_last` (batch, hidden, h, w) tensor.
        """
        hidden = pixel_values.contiguous(memory_format=torch.channels_last)
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            weight, bias = fold_into_conv(conv, bn)
            hidden = F.relu(F.conv2d(hidden, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups),
                            inplace=True)  # fmt: skip
        return self.projection(hidden)


class RefinerViTPatchStem(nn.Module):
    """A single `patch_size` strided convolution, as in ViT."""

    def __init__(self, config: RefinerViTConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The token grid of an image of `height` x `width` pixels."""
        stride = self.projection.stride[0]
        return height // stride, width // stride

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values)


class RefinerViTEmbeddings(nn.Module):
    """The stem's tokens with the class token prepended and the position embedding added."""

    def __init__(self, config: RefinerViTConfig) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.patch_embeddings = (
            RefinerViTConvStem(config) if config.stem_type == "conv" else RefinerViTPatchStem(config)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.image_size = config.image_size
        self.num_channels = config.num_channels

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """
        The position embedding for a `grid_height` x `grid_width` token grid: the trained one when the grid is the
        training grid, else the patch part resized bicubically (as in ViT), the class token's entry unchanged.
        """
        num_positions = self.position_embeddings.shape[1] - 1
        side = math.isqrt(num_positions)
        if not torch.jit.is_tracing() and grid_height == grid_width == side:
            return self.position_embeddings
        class_pos_embed = self.position_embeddings[:, :1]
        patch_pos_embed = self.position_embeddings[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos_embed = F.interpolate(
            patch_pos_embed, size=(grid_height, grid_width), mode="bicubic", align_corners=False
        )
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, -1)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        mix_token_box: MixTokenBox | None = None,
    ) -> torch.Tensor:
        if pixel_values.ndim != 4:
            raise ValueError(
                "`pixel_values` must have shape (batch_size, num_channels, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        batch_size, num_channels, height, width = pixel_values.shape
        if num_channels != self.num_channels:
            raise ValueError(f"`pixel_values` has {num_channels} channels but the model expects {self.num_channels}.")
        if not interpolate_pos_encoding and (height != self.image_size or width != self.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match the model ({self.image_size}*{self.image_size}). "
                "Resize the images (the image processor does) or pass `interpolate_pos_encoding=True`."
            )
        patch_grid = self.patch_embeddings(pixel_values)
        if mix_token_box is not None:  # MixToken: the box's tokens come from the reversed batch
            patch_grid = swap_box_with_reversed_batch(patch_grid, mix_token_box)
        grid_height, grid_width = patch_grid.shape[-2:]
        embeddings = patch_grid.flatten(2).transpose(1, 2)
        cls_tokens = self.cls_token.expand(batch_size, -1, -1)
        embeddings = torch.cat((cls_tokens, embeddings), dim=1)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(grid_height, grid_width)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings)


class RefinerViTRefiner(nn.Module):
    """
    Refinement of attention maps ("distributed local attention"): the heads are treated as the channels of an image
    of size (tokens x tokens), expanded by a 1x1 convolution, convolved locally by a depthwise convolution, projected
    back to the heads and added to the input. The attention follows it with its `adapt_bn` (and, in shared blocks, a
    scale): `forward_adapted` is that reference computation, `forward_folded` its evaluation fast path and
    `forward_memory_lean` its training path that keeps only the input map for the backward pass.
    """

    def __init__(self, num_heads: int, expansion: int, kernel_size: int) -> None:
        super().__init__()
        hidden = num_heads * expansion
        self.expand_conv = nn.Conv2d(num_heads, hidden, kernel_size=1, bias=False) if expansion != 1 else None
        self.expand_bn = nn.BatchNorm2d(hidden) if expansion != 1 else None
        # "same" padding; for even kernels the extra row/column goes after, as TensorFlow does.
        self.padding = ((kernel_size - 1) // 2, kernel_size - 1 - (kernel_size - 1) // 2)
        symmetric = self.padding[0] == self.padding[1]
        self.depthwise_conv = nn.Conv2d(
            hidden, hidden, kernel_size, padding=self.padding[0] if symmetric else 0, groups=hidden, bias=False
        )
        self.pad_input = not symmetric
        self.depthwise_bn = nn.BatchNorm2d(hidden)
        self.project_conv = nn.Conv2d(hidden, num_heads, kernel_size=1, bias=False)
        self.project_bn = nn.BatchNorm2d(num_heads)

    def _pad(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pads uneven "same" padding (even kernels), which the depthwise convolution's own padding cannot express."""
        if not self.pad_input:
            return hidden
        before, after = self.padding
        return F.pad(hidden, (before, after, before, after))

    def forward(self, attention_map: torch.Tensor) -> torch.Tensor:
        hidden = attention_map
        if self.expand_conv is not None:
            hidden = F.relu6(self.expand_bn(self.expand_conv(hidden)))
        hidden = F.relu6(self.depthwise_bn(self.depthwise_conv(self._pad(hidden))))
        hidden = self.project_bn(self.project_conv(hidden))
        return hidden + attention_map

    def forward_adapted(
        self, attention_map: torch.Tensor, adapt_bn: nn.BatchNorm2d, scale: float = 1.0
    ) -> torch.Tensor:
        """`adapt_bn(self(attention_map)) * scale`, operation by operation (no multiplication for a scale of 1, as in
        the original code's refined blocks)."""
        refined = adapt_bn(self(attention_map))
        return refined if scale == 1.0 else refined * scale

    # Evaluation fast path.

    def can_fold(self, adapt_bn: nn.BatchNorm2d) -> bool:
        """Whether `forward_folded` can run: every BatchNorm normalises with its running statistics."""
        return can_fold(self.expand_bn, self.depthwise_bn, self.project_bn, adapt_bn)

    def fold(self, adapt_bn: nn.BatchNorm2d, scale: float = 1.0) -> FoldedRefinement:
        """
        `adapt_bn(self(x)) * scale` in evaluation mode as three convolutions with every BatchNorm and the scale folded
        in. Computed from the parameters on every call (a few thousand multiply-adds), so it never goes stale and
        stays differentiable.
        """
        w_expand = b_expand = None
        if self.expand_conv is not None:
            w_expand, b_expand = fold_into_conv(self.expand_conv, self.expand_bn)
            w_expand = w_expand.flatten(1)
        w_depthwise, b_depthwise = fold_into_conv(self.depthwise_conv, self.depthwise_bn)
        a3, c3 = batch_norm_scale_shift(self.project_bn)
        a_adapt, c_adapt = batch_norm_scale_shift(adapt_bn)
        # scale * adapt_bn(bn3(W_p t2) + x) = (scale a_adapt a3) W_p t2 + scale (a_adapt c3 + c_adapt) + scale a_adapt x
        residual_scale = a_adapt * scale
        w_project = self.project_conv.weight.flatten(1) * (residual_scale * a3)[:, None]
        b_project = (a_adapt * c3 + c_adapt) * scale
        return FoldedRefinement(
            w_expand, b_expand, w_depthwise.flatten(0, 1), b_depthwise, w_project, b_project, residual_scale,
            tuple(self.padding),
        )  # fmt: skip

    def forward_folded(self, attention_map: torch.Tensor, adapt_bn: nn.BatchNorm2d, scale: float = 1.0) -> torch.Tensor:
        """
        `forward_adapted` in evaluation mode, folded (`fold`): one fused kernel where one takes the maps, else three
        `channels_last` convolutions with in-place activations. Returns a contiguous tensor.
        """
        folded = self.fold(adapt_bn, scale)
        fused = refine_folded_fused(attention_map, folded)
        if fused is not None:
            return fused
        # channels_last makes the depthwise convolution about twice as fast and the 1x1 ones plain matrix products.
        x = attention_map.contiguous(memory_format=torch.channels_last)
        dtype = x.dtype
        hidden = x
        if folded.w_expand is not None:
            hidden = F.conv2d(x, folded.w_expand[:, :, None, None].to(dtype), folded.b_expand.to(dtype))
            hidden = F.hardtanh(hidden, 0.0, 6.0, inplace=True)
        conv = self.depthwise_conv
        hidden = F.conv2d(self._pad(hidden), folded.w_depthwise[:, None].to(dtype), folded.b_depthwise.to(dtype),
                          padding=conv.padding, groups=conv.groups)  # fmt: skip
        hidden = F.hardtanh(hidden, 0.0, 6.0, inplace=True)
        out = F.conv2d(hidden, folded.w_project[:, :, None, None].to(dtype), folded.b_project.to(dtype))
        out = torch.addcmul(out, x, folded.residual_scale.to(dtype)[:, None, None])
        return out.contiguous()

    # Memory-lean training.

    def forward_memory_lean(
        self, attention_map: torch.Tensor, adapt_bn: nn.BatchNorm2d, scale: float = 1.0
    ) -> torch.Tensor:
        """
        `forward_adapted` in training mode (batch statistics, running statistics updated once) keeping only
        `attention_map` for the backward pass: a fused training kernel where one takes the maps, else this module's
        own computation checkpointed (recomputed in the backward pass with the running statistics restored). The
        gradients are the reference's up to float rounding.
        """
        norms = [self.expand_bn, self.depthwise_bn, self.project_bn, adapt_bn]
        if any(isinstance(bn, nn.SyncBatchNorm) for bn in norms):
            # Its statistics span processes, and only its own forward and backward compute them: no recomputation.
            return self.forward_adapted(attention_map, adapt_bn, scale)
        if all(bn is None or bn.training for bn in norms):  # the kernels normalise with batch statistics
            fused = refine_train_fused(attention_map, self._parameters_for_kernels(adapt_bn), norms, scale,
                                       self.padding[0])  # fmt: skip
            if fused is not None:
                return fused
        return checkpoint(
            self.forward_adapted,
            attention_map,
            adapt_bn,
            scale,
            use_reentrant=False,
            preserve_rng_state=False,  # nothing random in it
            context_fn=lambda: (contextlib.nullcontext(), _batch_norm_statistics_restored(self, adapt_bn)),
        )

    def _parameters_for_kernels(self, adapt_bn: nn.BatchNorm2d) -> RefinementParameters:
        expand = self.expand_conv is not None
        return RefinementParameters(
            self.expand_conv.weight.flatten(1) if expand else None,
            self.expand_bn.weight if expand else None,
            self.expand_bn.bias if expand else None,
            self.depthwise_conv.weight.flatten(0, 1),
            self.depthwise_bn.weight,
            self.depthwise_bn.bias,
            self.project_conv.weight.flatten(1),
            self.project_bn.weight,
            self.project_bn.bias,
            adapt_bn.weight,
            adapt_bn.bias,
        )


class RefinerViTUnrefinedMap(nn.Identity):
    """
    Marks the attention map a block starts its refinement from, so that `output_unrefined_attentions=True` can record
    it (the identity otherwise).
    """


class RefinerViTAttention(nn.Module):
    """
    Self-attention of one block. Depending on the block type:

    - `"plain"`: P = softmax(q k^T) with q and k each scaled by sqrt(d^-0.5), plus d^-0.5 times the incoming map when
      there is one; P is used and passed on.
    - `"refined"`: as plain, then P = adapt_bn(refiner(P)); the refined P is used and passed on.
    - `"shared"`: no queries or keys; P = adapt_bn(refiner(A)) * d^-0.5 from the incoming map A is used, and A itself
      is passed on unchanged.
    """

    # When set (by the `set_*` methods of `RefinerViTPreTrainedModel`, both on with the default
    # `attn_implementation="fused"`), evaluation mode folds constants into the weights and runs fused kernels
    # (`fast_inference`), and training refines keeping only the input map (`RefinerViTRefiner.forward_memory_lean`)
    # and, on CUDA, computes the maps with `triton_attention`.
    fast_inference: bool = False
    memory_lean_training: bool = False

    def __init__(self, config: RefinerViTConfig, block_type: str) -> None:
        super().__init__()
        self.block_type = block_type
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        hidden_size = config.hidden_size
        if block_type == "shared":
            self.v_proj = nn.Linear(hidden_size, hidden_size, bias=config.qkv_bias)
        else:
            self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=config.qkv_bias)
        if block_type != "plain":
            expansion = config.shared_expansion if block_type == "shared" else config.refine_expansion
            self.refiner = RefinerViTRefiner(self.num_heads, expansion, config.refine_kernel_size)
            self.adapt_bn = nn.BatchNorm2d(self.num_heads)
        self.unrefined_map = RefinerViTUnrefinedMap()
        self.attention_dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, previous_attention: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the block's attention output, the map it used and the map it passes to the next block."""
        if self.block_type == "shared" and previous_attention is None:
            raise ValueError("A shared block needs the attention map of a previous block.")
        fast = (
            self.fast_inference
            and not self.training
            and (self.block_type == "plain" or self.refiner.can_fold(self.adapt_bn))
        )
        if self.block_type == "shared":
            values, value_offset = self.v_proj(hidden_states), 0
            previous_attention = self.unrefined_map(previous_attention)
            attention = self._refine(previous_attention, self.scaling, fast)
            next_attention = previous_attention
        else:
            values, value_offset = self.qkv(hidden_states), 2 * hidden_states.shape[-1]
            attention = self._attention_probs(values, previous_attention, fast)
            attention = self.unrefined_map(self.attention_dropout(attention))
            if self.block_type == "refined":
                attention = self._refine(attention, 1.0, fast)
            next_attention = attention
        context = self._context(attention, values, value_offset, fast)
        return self.output_dropout(self.o_proj(context)), attention, next_attention

    def _attention_probs(self, qkv: torch.Tensor, previous_attention: torch.Tensor | None, fast: bool) -> torch.Tensor:
        """softmax(s q k^T) plus s times the incoming map, from the packed (batch, tokens, 3 * hidden) projection."""
        if fast:
            return attention_probs(qkv, previous_attention, self.num_heads, self.scaling)
        if self.memory_lean_training and self.training and triton_can_fuse(qkv, previous_attention,
                                                                                     self.num_heads):  # fmt: skip
            # One kernel, keeping no softmax output for the backward pass.
            return triton_attention_probs(qkv, previous_attention, self.num_heads, self.scaling)
        batch_size, seq_len, _ = qkv.shape
        query, key, _ = qkv.reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # The released code scales q and k separately rather than their product; kept for exact outputs.
        root_scaling = math.sqrt(self.scaling)
        attention = ((root_scaling * query) @ (root_scaling * key).transpose(-2, -1)).softmax(dim=-1)
        if previous_attention is not None:
            attention = attention + previous_attention * self.scaling
        return attention

    def _refine(self, attention_map: torch.Tensor, scale: float, fast: bool) -> torch.Tensor:
        """`adapt_bn(refiner(attention_map)) * scale`, by the computation the switches choose."""
        if fast:
            return self.refiner.forward_folded(attention_map, self.adapt_bn, scale)
        if self.memory_lean_training and self.training:
            return self.refiner.forward_memory_lean(attention_map, self.adapt_bn, scale)
        return self.refiner.forward_adapted(attention_map, self.adapt_bn, scale)

    def _context(self, attention_map: torch.Tensor, values: torch.Tensor, offset: int, fast: bool) -> torch.Tensor:
        """The attention map times the values (columns `offset:` of `values`), in token layout (batch, tokens,
        hidden)."""
        if fast:
            fused = attention_context_fused(attention_map, values, offset)
            if fused is not None:
                return fused
        batch_size, seq_len, width = values.shape
        value = values[..., offset:].view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        return (attention_map @ value).transpose(1, 2).reshape(batch_size, seq_len, width - offset)


class RefinerViTMLP(nn.Module):
    """Two linear layers with the activation between, then a learned per-channel scale (layer scale)."""

    def __init__(self, config: RefinerViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer_scale = nn.Parameter(torch.full((config.hidden_size,), config.layer_scale_init_value))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.activation_fn(self.fc1(hidden_states)))
        return self.dropout(self.layer_scale * self.fc2(hidden_states))

    def forward_folded(self, hidden_states: torch.Tensor, residual: torch.Tensor, divisor: float) -> torch.Tensor:
        """`residual + self(hidden_states) / divisor` in evaluation mode, the layer scale and the division applied by
        one `addcmul`."""
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        return torch.addcmul(residual, self.fc2(hidden_states), self.layer_scale / divisor)


class RefinerViTLayer(nn.Module):
    """
    One transformer block. With r = `config.residual_scale` (0.5):

        x = x + drop_path(attention(norm1(x * r)) / r)
        x = x + drop_path(mlp(norm2(x * r))) / r

    Multiplying by r before the LayerNorm is not a no-op because of its epsilon.
    """

    # Evaluation mode runs `forward_folded` when set (`RefinerViTPreTrainedModel.set_fast_inference`).
    fast_inference: bool = False

    def __init__(self, config: RefinerViTConfig, block_type: str, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.block_type = block_type
        self.residual_scale = config.residual_scale
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = RefinerViTAttention(config, block_type)
        self.drop_path = RefinerViTDropPath(drop_path_rate)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = RefinerViTMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, previous_attention: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block's output and the attention map passed to the next block."""
        if self.fast_inference and not self.training:
            return self.forward_folded(hidden_states, previous_attention)
        r = self.residual_scale
        attention_output, _, next_attention = self.attention(
            self.layernorm_before(hidden_states * r), previous_attention
        )
        hidden_states = hidden_states + self.drop_path(attention_output / r)
        hidden_states = hidden_states + self.drop_path(self.mlp(self.layernorm_after(hidden_states * r))) / r
        return hidden_states, next_attention

    def forward_folded(
        self, hidden_states: torch.Tensor, previous_attention: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The forward in evaluation mode (drop path and dropout are the identity) with the residual scale folded: into
        the LayerNorms' epsilon (`scaled_layer_norm`) and into the residual additions (`add` with alpha, `addcmul`).
        """
        r = self.residual_scale
        attention_output, _, next_attention = self.attention(
            scaled_layer_norm(self.layernorm_before, hidden_states, r), previous_attention
        )
        hidden_states = torch.add(hidden_states, attention_output, alpha=1.0 / r)
        hidden_states = self.mlp.forward_folded(
            scaled_layer_norm(self.layernorm_after, hidden_states, r), hidden_states, r
        )
        return hidden_states, next_attention


@contextlib.contextmanager
def _batch_norm_statistics_restored(*modules: nn.Module):
    """Undoes, on exit, whatever the BatchNorms of `modules` did to their running statistics inside the block."""
    buffers = [
        buffer
        for module in modules
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


class RefinerViTPreTrainedModel(PreTrainedModel):
    """Handles weight initialisation and loading of Refiner-ViT models."""

    config: RefinerViTConfig
    config_class = RefinerViTConfig
    base_model_prefix = "refiner_vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    # Models of more parameters are refused before anything is allocated (a typo such as `num_hidden_layers: 100000`
    # would otherwise be built until the process is killed), as are deeper ones and ones needing more memory than the
    # machine has (`check_model_size`); None lifts every one of these bounds.
    max_parameters: int | None = 2_000_000_000
    _no_split_modules = ["RefinerViTEmbeddings", "RefinerViTLayer"]
    _can_record_outputs = {
        "hidden_states": RefinerViTLayer,
        "attentions": RefinerViTAttention,
        "unrefined_attentions": RefinerViTUnrefinedMap,
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, answering a preset name at once ([`refuse_preset_name`])."""
        refuse_preset_name(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """
        Refiner-ViT's two computations, chosen as transformers models choose their attention: `"fused"` (the default)
        runs the fast inference path in evaluation mode and memory-lean refinement in training
        ([`set_fast_inference`], [`set_memory_lean_training`]); `"eager"` runs the reference computation, operation
        by operation as in the original code. Both give the same outputs and gradients up to float rounding (within
        1e-4 of the logits' scale). Other requests get an error saying why.
        """
        if requested_attention is None:
            return "fused"
        if requested_attention not in ("fused", "eager"):
            raise ValueError(
                f"Refiner-ViT cannot use attn_implementation={requested_attention!r}: its blocks need every attention "
                "map as a tensor (the refinement convolves it and shared blocks reuse it), which fused attention "
                'kernels such as SDPA, flash or flex attention never form. Use "fused" (the default: fused '
                'Refiner-ViT kernels, with the attention maps formed) or "eager" (the reference computation).'
            )
        return requested_attention

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # So that `set_attn_implementation` asks `get_correct_attn_implementation` too (and says why it refuses)
        # instead of warning that the request is ignored.
        return True

    def post_init(self) -> None:
        super().post_init()
        self._apply_attn_implementation()

    def set_attn_implementation(self, attn_implementation: str | dict, *args, **kwargs) -> None:
        """[`~PreTrainedModel.set_attn_implementation`]: `"fused"` or `"eager"`, switched in place (see
        [`get_correct_attn_implementation`])."""
        super().set_attn_implementation(attn_implementation, *args, **kwargs)
        self._apply_attn_implementation()

    def _apply_attn_implementation(self) -> None:
        fused = self.config._attn_implementation != "eager"
        self.set_fast_inference(fused)
        self.set_memory_lean_training(fused)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """
        [`~PreTrainedModel.save_pretrained`], always writing a self-contained directory: the configuration and modeling
        files (and what they import) beside the weights, named in `config.json`'s `auto_map` for the configuration
        and both model classes. The directory then loads with `trust_remote_code=True` where the package is not
        installed, whether the model was built here, converted, or itself loaded from remote code; `push_to_hub`
        uploads the same files.
        """
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **model_auto_map()}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def set_fast_inference(self, enabled: bool = True) -> "RefinerViTPreTrainedModel":
        """
        Chooses the evaluation-mode computation. With `enabled` (the default of `attn_implementation="fused"`),
        BatchNorms and constant scales are folded into the adjacent layers, and the attention and the attention-map
        refinement run as fused kernels (C++ on CPU, built on first use; Triton on CUDA; PyTorch fallbacks elsewhere):
        the modules' `forward_folded` methods, with the helpers of `fast_inference`. Folding is redone from the
        parameters on every forward, so saved weights, `from_pretrained` and training mode are unaffected. With
        `enabled=False` (the default of `attn_implementation="eager"`) the reference computation runs, operation by
        operation as in the original code. Both agree to float rounding (within 1e-4 of the logits' scale). Returns
        the model, so that it chains like `.eval()`: `model.eval().set_fast_inference()`.
        """
        for module in self.modules():
            if isinstance(module, (RefinerViTConvStem, RefinerViTAttention, RefinerViTLayer)):
                module.fast_inference = enabled
        return self

    def set_memory_lean_training(self, enabled: bool = True) -> "RefinerViTPreTrainedModel":
        """
        Has training-mode refinements keep only their input map for the backward pass and recompute the rest
        (`RefinerViTRefiner.forward_memory_lean`): the activation memory per image drops by more than half, with the
        same gradients and BatchNorm statistics up to float rounding, and on CPU a faster step (fused kernels). On by
        default (`attn_implementation="fused"`), off with `attn_implementation="eager"` or `enabled=False`; combines
        with activation checkpointing (`activation_checkpointing_enable`). Returns the model.
        """
        for module in self.modules():
            if isinstance(module, RefinerViTAttention):
                module.memory_lean_training = enabled
        return self

    def resize_position_embeddings(self, image_size: int) -> None:
        """
        Adapts the model to another training/inference resolution (e.g. fine-tuning at 384 or 448): the position
        embedding is resized bicubically to the new patch grid (the class token's entry kept) and becomes a parameter
        of the new size, and `config.image_size` is updated so that `save_pretrained` records it.
        """
        base = getattr(self, self.base_model_prefix, self)
        embeddings = base.embeddings
        if image_size % self.config.patch_size != 0:
            raise ValueError(
                f"`image_size` ({image_size}) must be a multiple of `patch_size` ({self.config.patch_size})."
            )
        grid = image_size // self.config.patch_size
        with torch.no_grad():
            resized = embeddings.interpolate_pos_encoding(grid, grid).clone()
        embeddings.position_embeddings = nn.Parameter(
            resized, requires_grad=embeddings.position_embeddings.requires_grad
        )
        embeddings.image_size = image_size
        self.config.image_size = image_size

    def _init_weights(self, module: nn.Module) -> None:
        """Initialises as the released code does: truncated normal linear layers, PyTorch defaults elsewhere."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # PyTorch's default initialisation of convolutions.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight[0, 0].numel()
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, RefinerViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
        elif isinstance(module, RefinerViTMLP):
            init.constant_(module.layer_scale, self.config.layer_scale_init_value)


# Deeper models are refused like larger ones (see `RefinerViTPreTrainedModel.max_parameters`, whose `None` lifts this
# bound too): the released models have 16 or 32 blocks, and a typo such as 100,000 blocks at a small width stays under
# the parameter bound (and may fit in memory) but takes minutes to build.
MAX_HIDDEN_LAYERS = 1000


class ModelTooLargeError(DataError, ValueError):
    """
    A configuration whose model is larger than is built without being asked: more parameters than
    `RefinerViTPreTrainedModel.max_parameters`, more blocks than [`MAX_HIDDEN_LAYERS`], or more memory than the
    machine has ([`~configuration_refiner_vit.estimate_memory`]).
    """

    def __init__(self, count: int, limit: int | None, how_to_allow: str, reason: str | None = None) -> None:
        self.count, self.limit, self.reason = count, limit, reason
        if reason is None:
            reason = (
                f"This configuration describes a model of {count:,} parameters ({count * 4 / 2**30:,.1f} GiB in "
                f"float32), more than the {limit:,} built without being asked (the largest Refiner-ViT has 81 million)"
            )
        super().__init__(
            f"{reason}: check `num_hidden_layers`, `hidden_size`, `intermediate_size` and `image_size`. To build it "
            f"anyway, {how_to_allow}."
        )


def _available_memory(training: bool) -> int | None:
    """What the model may use: the machine's memory, or while training the larger of it and the first GPU's."""
    available = machine_memory()
    if training and torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0).total_memory
        available = gpu if available is None else max(available, gpu)
    return available


def check_model_size(
    config: RefinerViTConfig,
    how_to_allow: str = "set `RefinerViTPreTrainedModel.max_parameters` to a larger number (or None) first",
    training: bool = False,
) -> None:
    """
    Refuses, from the configuration's numbers alone (in well under a second), a model of more than
    `RefinerViTPreTrainedModel.max_parameters` parameters, of more than [`MAX_HIDDEN_LAYERS`] blocks, or needing more
    memory than the machine has to run one image (with `training`: to train on one image with AdamW). A
    `max_parameters` of `None` lifts all three.

    Raises:
        `ModelTooLargeError`: with the count or the estimate, and `how_to_allow` (how the caller's user builds it
        anyway).
    """
    limit = RefinerViTPreTrainedModel.max_parameters
    if limit is None:
        return
    count = count_parameters(config)
    if count > limit:
        raise ModelTooLargeError(count, limit, how_to_allow)
    if config.num_hidden_layers > MAX_HIDDEN_LAYERS:
        raise ModelTooLargeError(
            count,
            limit,
            how_to_allow,
            f"This configuration has {config.num_hidden_layers:,} blocks (`num_hidden_layers`), more than the "
            f"{MAX_HIDDEN_LAYERS:,} built without being asked (the released Refiner-ViTs have 16 or 32)",
        )
    estimate = estimate_memory(config, training=training)
    available = _available_memory(training)
    if available is not None and estimate.total_bytes > available:
        raise ModelTooLargeError(
            count,
            limit,
            how_to_allow,
            f"This configuration describes a model that needs {estimate.describe()} to "
            f"{'train on' if training else 'run'} one {config.image_size}-px image, more than the "
            f"{format_bytes(available)} of memory this machine has",
        )


class RefinerViTModel(RefinerViTPreTrainedModel):
    """
    The Refiner-ViT encoder: stem, class token and position embedding, the blocks, and the final LayerNorm. Returns
    the normalised tokens (`last_hidden_state`) and the class token among them (`pooler_output`).
    """

    _auto_class = "AutoModel"  # `save_pretrained` writes this class's code and names it in `auto_map`

    def __init__(self, config: RefinerViTConfig) -> None:
        config.check_architecture()
        check_model_size(config)
        super().__init__(config)
        self.embeddings = RefinerViTEmbeddings(config)
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(
            [RefinerViTLayer(config, block_type, rate) for block_type, rate in zip(config.block_types, rates)]
        )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def _run_layer(
        self, layer: RefinerViTLayer, hidden_states: torch.Tensor, attention: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return layer(hidden_states, attention)
        # Recomputing a block in the backward pass must not update its BatchNorms' running statistics a second time.
        return checkpoint(
            layer,
            hidden_states,
            attention,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _batch_norm_statistics_restored(layer)),
        )

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        mix_token_box: MixTokenBox | None = None,
        **kwargs,
    ) -> RefinerViTModelOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images as prepared by [`RefinerViTImageProcessor`].
            interpolate_pos_encoding (`bool`, *optional*):
                Resize the position embedding to the input's token grid, for images of another size than
                `config.image_size`.
            mix_token_box (`MixTokenBox`, *optional*):
                MixToken: replace the tokens inside this box of the token grid by those of the reversed batch.
            output_hidden_states (`bool`, *optional*):
                Return the embeddings and every block's output.
            output_attentions (`bool`, *optional*):
                Return the attention map every block multiplied with its values (refined ones included).
            output_unrefined_attentions (`bool`, *optional*):
                Return every block's attention map before refinement (see [`RefinerViTModelOutput`]).
        """
        if pixel_values is None:
            raise ValueError("You have to specify `pixel_values`.")
        expected_dtype = self.embeddings.cls_token.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        hidden_states = self.embeddings(
            pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding), mix_token_box=mix_token_box
        )
        attention, passed_on = None, []
        regularised = self.config.attention_similarity_pairs + 1 if self.training else 0
        for layer in self.layers:
            hidden_states, attention = self._run_layer(layer, hidden_states, attention)
            if len(passed_on) < regularised:
                passed_on.append(attention)
        sequence_output = self.layernorm(hidden_states)
        return RefinerViTModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=sequence_output[:, 0],
            attention_similarity=attention_similarity(passed_on) if regularised > 1 else None,
        )


class RefinerViTForImageClassification(RefinerViTPreTrainedModel):
    """
    Refiner-ViT with a linear classifier on the class token and, when `config.use_aux_head`, a second linear
    classifier applied to every patch token (the dense head of token labeling). The prediction combines both:
    `logits = cls_logits + config.aux_logits_weight * aux_logits.max(dim=1)`.
    """

    _auto_class = "AutoModelForImageClassification"  # see `RefinerViTModel._auto_class`

    def __init__(self, config: RefinerViTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.refiner_vit = RefinerViTModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.aux_classifier = None
        if config.use_aux_head:
            self.aux_classifier = (
                nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
            )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        dense_labels: torch.Tensor | None = None,
        mix_token: bool | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> RefinerViTImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images as prepared by [`RefinerViTImageProcessor`].
            labels (`torch.LongTensor` of shape `(batch_size,)` or `torch.FloatTensor` of shape
                `(batch_size, num_labels)`, *optional*):
                Class indices, or soft targets (rows of class probabilities, e.g. from mixup or label smoothing).
                With the auxiliary head and no `dense_labels`, every patch token is trained towards its image's
                target.
            dense_labels (`torch.FloatTensor` of shape `(batch_size, num_patches, num_labels)` or
                `(batch_size, num_labels, grid_height, grid_width)`, *optional*):
                Token labeling: a soft target for every patch token (e.g. from a teacher's relabel maps), for the
                auxiliary head's dense loss. Needs `labels` for the class token.
            mix_token (`bool`, *optional*, defaults to `config.use_mix_token`):
                In training mode with the auxiliary head, apply MixToken: tokens inside a random box of the token grid
                come from the reversed batch, the auxiliary outputs are swapped back, and the class target is mixed
                with the share of tokens left in place. Off in evaluation mode whatever its value.
            interpolate_pos_encoding (`bool`, *optional*):
                Resize the position embedding for images of another size than `config.image_size`.

        Example:

        ```python
        >>> import torch
        >>> from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification

        >>> config = RefinerViTConfig(
        ...     hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=64, num_labels=10
        ... )
        >>> model = RefinerViTForImageClassification(config).eval()
        >>> model(torch.randn(1, 3, 64, 64)).logits.shape
        torch.Size([1, 10])
        ```
        """
        if dense_labels is not None and self.aux_classifier is None:
            raise ValueError("`dense_labels` train the auxiliary head, but this model has none (`use_aux_head`).")
        if dense_labels is not None and labels is None:
            raise ValueError("`dense_labels` need `labels` too (the class token's target).")
        use_mix_token = self.config.use_mix_token if mix_token is None else mix_token
        box = None
        if use_mix_token and self.training and self.aux_classifier is not None:
            grid = self.refiner_vit.embeddings.patch_embeddings.grid_size(*pixel_values.shape[-2:])
            box = sample_mix_token_box(*grid, beta=self.config.mix_token_beta)
        outputs: RefinerViTModelOutput = self.refiner_vit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, mix_token_box=box, **kwargs
        )
        sequence_output = outputs.last_hidden_state
        cls_logits = self.classifier(sequence_output[:, 0])
        aux_logits = None
        logits = cls_logits
        if self.aux_classifier is not None:
            aux_logits = self.aux_classifier(sequence_output[:, 1:])
            if box is not None:  # swap the box back: every token's output lines up with its own image again
                grid_outputs = aux_logits.reshape(aux_logits.shape[0], box.height, box.width, -1)
                aux_logits = swap_box_with_reversed_batch(grid_outputs, box, channels_last=True).flatten(1, 2)
            logits = cls_logits + self.config.aux_logits_weight * aux_logits.max(dim=1).values

        loss = None
        if labels is not None:
            loss = self.compute_loss(cls_logits, aux_logits, labels, dense_labels=dense_labels, mix_token_box=box)
            if outputs.attention_similarity is not None:
                loss = loss + self.config.attention_similarity_weight * outputs.attention_similarity

        return RefinerViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            cls_logits=cls_logits,
            aux_logits=aux_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            unrefined_attentions=outputs.unrefined_attentions,
            mix_token_box=None if box is None else box.as_tensor(),
            attention_similarity=outputs.attention_similarity,
        )

    def compute_loss(
        self,
        cls_logits: torch.Tensor,
        aux_logits: torch.Tensor | None,
        labels: torch.Tensor,
        dense_labels: torch.Tensor | None = None,
        mix_token_box: MixTokenBox | None = None,
    ) -> torch.Tensor:
        """
        Cross entropy of the class logits against `labels` (indices or soft targets; mixed with the reversed batch's
        by the share of the MixToken box when there is one), plus `config.aux_loss_weight` times the mean cross
        entropy of every token's auxiliary logits against its dense label (its image's target without
        `dense_labels`).
        """
        num_labels = cls_logits.shape[-1]
        if labels.dtype.is_floating_point:
            if labels.shape != cls_logits.shape:
                raise ValueError(
                    f"Soft `labels` must have shape (batch_size, num_labels) = {tuple(cls_logits.shape)}, "
                    f"got {tuple(labels.shape)}."
                )
            targets = labels.to(cls_logits.dtype)
        else:
            if labels.shape != cls_logits.shape[:1]:
                raise ValueError(
                    f"Class-index `labels` must have shape (batch_size,) = {tuple(cls_logits.shape[:1])}, "
                    f"got {tuple(labels.shape)}."
                )
            targets = labels
        class_targets = targets
        if mix_token_box is not None:
            if not targets.dtype.is_floating_point:
                targets = F.one_hot(targets, num_labels).to(cls_logits.dtype)
            class_targets = mix_class_targets(targets, mix_token_box)
        loss = F.cross_entropy(cls_logits, class_targets)
        if aux_logits is None:
            return loss
        num_tokens = aux_logits.shape[1]
        if dense_labels is None:
            token_targets = targets.repeat_interleave(num_tokens, dim=0)
        else:
            if dense_labels.ndim == 4:  # (B, C, h, w) → (B, h*w, C), the patch tokens' order
                dense_labels = dense_labels.flatten(2).transpose(1, 2)
            if dense_labels.shape != aux_logits.shape:
                raise ValueError(
                    f"`dense_labels` must match the auxiliary logits' shape {tuple(aux_logits.shape)} "
                    f"(batch, tokens, classes), got {tuple(dense_labels.shape)}."
                )
            token_targets = dense_labels.reshape(-1, num_labels).to(aux_logits.dtype)
        dense_loss = F.cross_entropy(aux_logits.reshape(-1, num_labels), token_targets)
        return loss + self.config.aux_loss_weight * dense_loss


def _code_reference(cls: type) -> str:
    """How `auto_map` names a class: its module's file name (without `.py`) and the class name."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def model_auto_map() -> dict[str, str]:
    """The `auto_map` of `config.json`: the configuration and both model classes, in the files saved beside it."""
    return {
        "AutoConfig": _code_reference(RefinerViTConfig),
        "AutoModel": _code_reference(RefinerViTModel),
        "AutoModelForImageClassification": _code_reference(RefinerViTForImageClassification),
    }


__all__ = [
    "RefinerViTForImageClassification",
    "RefinerViTImageClassifierOutput",
    "RefinerViTModel",
    "RefinerViTModelOutput",
    "RefinerViTPreTrainedModel",
]
