"""Refiner-ViT model configuration."""

import copy
import math
import os
from collections import Counter
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .cli import UsageError


BLOCK_TYPES = ("plain", "refined", "shared")
STEM_TYPES = ("conv", "patch")

# The released architectures (Zhou et al., 2021). Every one alternates a plain block (its own softmax attention) with a
# shared block (which refines the previous plain block's map instead of computing one), has the convolutional stem
# and the dense auxiliary head, and classifies ImageNet-1k.
_RELEASED_FIELDS = {
    "patch_size": 16,
    "mlp_ratio": 3.0,
    "qkv_bias": True,
    "layer_norm_eps": 1e-6,
    "stem_type": "conv",
    "use_aux_head": True,
    "num_labels": 1000,
}
ARCHITECTURES: dict[str, dict] = {
    "refiner-vit-s": {**_RELEASED_FIELDS, "hidden_size": 384, "num_attention_heads": 12, "num_hidden_layers": 16},
    "refiner-vit-m": {**_RELEASED_FIELDS, "hidden_size": 420, "num_attention_heads": 12, "num_hidden_layers": 32},
    "refiner-vit-l": {**_RELEASED_FIELDS, "hidden_size": 512, "num_attention_heads": 16, "num_hidden_layers": 32},
}


@dataclass(frozen=True)
class Preset:
    """
    A released Refiner-ViT: its architecture (a key of `ARCHITECTURES`) at a resolution, the evaluation crop ratio of
    the released code (timm's `crop_pct`) and the paper's ImageNet-1k top-1 (%).
    """

    architecture: str
    image_size: int
    crop_pct: float
    top1: float

    @property
    def name(self) -> str:
        """`refiner-vit-s`, with the resolution appended when it is not 224: `refiner-vit-l-448`."""
        return self.architecture if self.image_size == 224 else f"{self.architecture}-{self.image_size}"

    def config_fields(self) -> dict:
        """The `RefinerViTConfig` fields of this preset."""
        return {**copy.deepcopy(ARCHITECTURES[self.architecture]), "image_size": self.image_size}


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("refiner-vit-s", 224, crop_pct=0.9, top1=83.6),
        Preset("refiner-vit-s", 384, crop_pct=0.9, top1=84.6),
        Preset("refiner-vit-m", 224, crop_pct=1.0, top1=84.6),
        Preset("refiner-vit-m", 384, crop_pct=1.0, top1=85.6),
        Preset("refiner-vit-l", 224, crop_pct=1.13, top1=84.9),
        Preset("refiner-vit-l", 384, crop_pct=1.13, top1=85.8),
        Preset("refiner-vit-l", 448, crop_pct=1.13, top1=86.0),
    )
}


class PresetNameError(UsageError, OSError):
    """A preset name given to `from_pretrained`, which loads a model directory or a Hub repository, not a preset."""


def refuse_preset_name(name_or_path: object) -> None:
    """
    Raises [`PresetNameError`] at once, without asking the Hub (which has no repository of that name and answers
    only after transformers' retries), when `from_pretrained` is given a preset name such as `"refiner-vit-l"` and no
    file or directory of that name is here (the converter writes one: `./refiner-vit-l-448`, which then loads).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        return
    name = os.fspath(name_or_path)
    if name in PRESETS and not os.path.exists(name):
        raise PresetNameError(
            f"{name!r} is a Refiner-ViT preset name, not a model directory or a Hub repository: "
            f"`RefinerViTForImageClassification(RefinerViTConfig.from_preset({name!r}))` builds an untrained model "
            f"of that shape, and `refiner-vit-convert --checkpoint CHECKPOINT.pth` converts the released weights of "
            f"that preset into ./{name}, which `from_pretrained({name!r})` then loads."
        )


@strict
class RefinerViTConfig(PreTrainedConfig):
    r"""
    Configuration of a Refiner-ViT model ([`RefinerViTModel`], [`RefinerViTForImageClassification`]).

    The defaults give Refiner-ViT-S at 224 px. The released presets are available by name through
    [`RefinerViTConfig.from_preset`] (`"refiner-vit-s"`, `"refiner-vit-m"`, `"refiner-vit-l"`, and resolution
    variants such as `"refiner-vit-l-448"`).

    Args:
        image_size (`int`, *optional*, defaults to 224):
            Side of the (square) training images; sets the size of the position embedding.
        patch_size (`int`, *optional*, defaults to 16):
            Side of the patch each token stands for. The convolutional stem reaches it with a stride-2 convolution and
            a `patch_size // 2` projection, so it must be even there.
        num_channels (`int`, *optional*, defaults to 3):
            Number of input channels.
        hidden_size (`int`, *optional*, defaults to 384):
            Dimension of the tokens.
        num_hidden_layers (`int`, *optional*, defaults to 16):
            Number of transformer blocks.
        num_attention_heads (`int`, *optional*, defaults to 12):
            Number of attention heads; also the number of channels of the attention maps the refinement convolves.
        mlp_ratio (`float`, *optional*, defaults to 3.0):
            Ratio of the MLP's hidden size to `hidden_size`.
        intermediate_size (`int`, *optional*):
            The MLP's hidden size; `int(hidden_size * mlp_ratio)` when not given.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLP (exact GELU in the released models).
        qkv_bias (`bool`, *optional*, defaults to `True`):
            Whether the query/key/value projection has a bias.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the LayerNorms.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout after the embeddings, the attention projection and inside the MLP.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0):
            Dropout on the attention maps of plain and refined blocks.
        drop_path_rate (`float`, *optional*, defaults to 0.0):
            Stochastic depth; the rate rises linearly from 0 at the first block to this value at the last.
        layer_scale_init_value (`float`, *optional*, defaults to 1e-5):
            Initial value of the per-channel scale applied to the MLP output.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated normal initialiser of linear layers and embeddings.
        stem_type (`str`, *optional*, defaults to `"conv"`):
            `"conv"`: the three-convolution stem of the released models; `"patch"`: a single strided convolution.
        stem_hidden_sizes (`list[int]`, *optional*, defaults to `[32, 64, 128]`):
            Channels of the three convolutions of the convolutional stem.
        block_types (`list[str]`, *optional*):
            One entry per block: `"plain"` (softmax attention, plus the previous block's map scaled by the attention
            scale when there is one), `"refined"` (a plain block whose map is then refined by convolutions) or
            `"shared"` (no query/key: refines the incoming map). Defaults to `["plain", "shared"]` repeated, the
            released pattern.
        refine_expansion (`int`, *optional*, defaults to 3):
            Head expansion of the refinement in `"refined"` blocks.
        shared_expansion (`int`, *optional*, defaults to 3):
            Head expansion of the refinement in `"shared"` blocks.
        refine_kernel_size (`int`, *optional*, defaults to 3):
            Kernel size of the depthwise convolution of the refinement.
        use_aux_head (`bool`, *optional*, defaults to `True`):
            Whether the model has the dense auxiliary head that classifies every patch token.
        aux_logits_weight (`float`, *optional*, defaults to 0.5):
            At inference the prediction is `cls_logits + aux_logits_weight * max over tokens of aux_logits`.
        aux_loss_weight (`float`, *optional*, defaults to 0.5):
            Weight of the dense (per-token) loss of the auxiliary head in the training loss.
        use_mix_token (`bool`, *optional*, defaults to `False`):
            Apply MixToken in training mode (token labeling); a `mix_token` argument of the forward overrides it.
        mix_token_beta (`float`, *optional*, defaults to 1.0):
            MixToken's λ ~ Beta(beta, beta).
        attention_similarity_pairs (`int`, *optional*, defaults to 0):
            Training regulariser of the original code (`cos_reg_component`): n > 0 adds to the training loss
            `attention_similarity_weight / n * sum over i < n of mean(cosine_similarity(A_i, A_{i+1}, dim=heads))`,
            where A_0, A_1, ... are the attention maps the blocks pass on to the next block. 0 turns it off (it has no
            effect on the weights' shapes or on inference).
        attention_similarity_weight (`float`, *optional*, defaults to 0.1):
            Weight of that regulariser (0.1 in the original code).
        residual_scale (`float`, *optional*, defaults to 0.5):
            The blocks' "adjust ratio" r: inputs of the norms are multiplied by r and the branch outputs divided by r.

    Example:

    ```python
    >>> from refiner_hf import RefinerViTConfig, RefinerViTForImageClassification

    >>> config = RefinerViTConfig.from_preset("refiner-vit-s")
    >>> model = RefinerViTForImageClassification(config)
    ```
    """

    model_type = "refiner-vit"
    # `save_pretrained` writes this module next to `config.json` and names it in `auto_map`, so that a saved directory
    # loads with `trust_remote_code=True` where the package is not installed (the models and processors do the same).
    _auto_class = "AutoConfig"

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 384
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    mlp_ratio: float | int = 3.0
    intermediate_size: int | None = None
    hidden_act: str = "gelu"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    layer_scale_init_value: float = 1e-5
    initializer_range: float = 0.02
    stem_type: str = "conv"
    stem_hidden_sizes: list[int] | tuple[int, ...] = (32, 64, 128)
    block_types: list[str] | tuple[str, ...] | None = None
    refine_expansion: int = 3
    shared_expansion: int = 3
    refine_kernel_size: int = 3
    use_aux_head: bool = True
    aux_logits_weight: float | int = 0.5
    aux_loss_weight: float | int = 0.5
    use_mix_token: bool = False
    mix_token_beta: float | int = 1.0
    attention_similarity_pairs: int = 0
    attention_similarity_weight: float | int = 0.1
    residual_scale: float | int = 0.5

    def __post_init__(self, **kwargs):
        if self.block_types is None:
            self.block_types = [("plain", "shared")[i % 2] for i in range(self.num_hidden_layers)]
        self.block_types = list(self.block_types)
        self.stem_hidden_sizes = list(self.stem_hidden_sizes)
        if self.intermediate_size is None:
            self.intermediate_size = int(self.hidden_size * self.mlp_ratio)
        super().__post_init__(**kwargs)
        self.check_architecture()

    def check_architecture(self) -> None:
        """Raises a `ValueError` naming the first inconsistent field. Also run when a model is built."""
        positive = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers")
        for name in positive + ("num_attention_heads", "intermediate_size", "refine_kernel_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if len(self.block_types) != self.num_hidden_layers:
            raise ValueError(
                f"`block_types` has {len(self.block_types)} entries but `num_hidden_layers` is "
                f"{self.num_hidden_layers}; give one block type per layer."
            )
        unknown = sorted({t for t in self.block_types if t not in BLOCK_TYPES})
        if unknown:
            raise ValueError(f"Unknown block type(s) {unknown} in `block_types`; expected one of {list(BLOCK_TYPES)}.")
        if self.block_types and self.block_types[0] == "shared":
            raise ValueError(
                "The first block cannot be `shared`: a shared block refines the attention map of the block before it."
            )
        for name in ("refine_expansion", "shared_expansion"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.stem_type not in STEM_TYPES:
            raise ValueError(f"`stem_type` must be one of {list(STEM_TYPES)}, got {self.stem_type!r}.")
        if self.stem_type == "conv":
            if self.patch_size % 2 != 0:
                raise ValueError(
                    f"The convolutional stem needs an even `patch_size` (stride 2, then a patch_size // 2 "
                    f"projection), got {self.patch_size}."
                )
            if len(self.stem_hidden_sizes) != 3 or min(self.stem_hidden_sizes) <= 0:
                raise ValueError(
                    f"`stem_hidden_sizes` must list three positive channel counts, got {self.stem_hidden_sizes}."
                )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"`image_size` ({self.image_size}) must be a multiple of `patch_size` ({self.patch_size})."
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)}.")
        if not 0 <= self.attention_similarity_pairs < self.num_hidden_layers:
            raise ValueError(
                f"`attention_similarity_pairs` must be in [0, num_hidden_layers) = [0, {self.num_hidden_layers}): it "
                f"compares the maps of consecutive blocks, got {self.attention_similarity_pairs}."
            )
        # Loaded from a file these can hold anything JSON does; NaN passes every comparison, so ask for finite values.
        for name, low, allow_low in (
            ("residual_scale", 0.0, False),
            ("layer_norm_eps", 0.0, False),
            ("mlp_ratio", 0.0, False),
            ("mix_token_beta", 0.0, False),
            ("aux_loss_weight", 0.0, True),
            ("attention_similarity_weight", 0.0, True),
            ("initializer_range", 0.0, True),
            ("aux_logits_weight", -math.inf, True),
            ("layer_scale_init_value", -math.inf, True),
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and (value >= low if allow_low else value > low)):
                bound = "finite" if low == -math.inf else ("finite and >= 0" if allow_low else "finite and positive")
                raise ValueError(f"`{name}` must be {bound}, got {value}.")

    def validate_architecture(self) -> None:
        """Part of the `@strict` validation run at construction and before saving."""
        super().validate_architecture()
        self.check_architecture()

    @property
    def num_patches(self) -> int:
        """Number of patch tokens at `image_size`."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "RefinerViTConfig":
        """
        Builds the configuration of a released model by name.

        Args:
            name (`str`):
                One of `RefinerViTConfig.preset_names()`, e.g. `"refiner-vit-s"` or `"refiner-vit-l-448"`.
            kwargs:
                Fields to override, e.g. `num_labels=10`, `id2label={0: "cat", 1: "dog"}` (which sizes the head) or
                `drop_path_rate=0.2`.
        """
        if name not in PRESETS:
            raise ValueError(f"Unknown Refiner-ViT preset {name!r}; available: {', '.join(PRESETS)}.")
        preset = PRESETS[name].config_fields()
        if "id2label" in kwargs:
            del preset["num_labels"]  # the head is sized from the labels given, not the preset's ImageNet classes
        return cls(**{**preset, **kwargs})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "RefinerViTConfig":
        """`PreTrainedConfig.from_pretrained`, answering a preset name at once ([`refuse_preset_name`])."""
        refuse_preset_name(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def matching_architecture(self) -> str | None:
        """
        The released architecture this configuration has (`"refiner-vit-s"`, `-m` or `-l`, keys of `ARCHITECTURES`),
        whatever its resolution and its head's number of labels; `None` for other architectures.
        """
        fields = (
            "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "qkv_bias", "layer_norm_eps", "stem_type", "stem_hidden_sizes",
            "block_types", "refine_expansion", "shared_expansion", "refine_kernel_size", "use_aux_head",
            "aux_logits_weight", "residual_scale",
        )  # fmt: skip
        for name, released in ARCHITECTURES.items():
            reference = RefinerViTConfig(**released)
            if all(getattr(self, field) == getattr(reference, field) for field in fields):
                return name
        return None

    def matching_preset(self) -> str | None:
        """
        The name of the released architecture this configuration has, with the resolution appended when it is not 224
        (`"refiner-vit-l-448"`), whatever its head's number of labels; `None` for other architectures. A resolution
        the paper did not publish gives a name that is not a key of `PRESETS` (`"refiner-vit-s-448"`).
        """
        architecture = self.matching_architecture()
        if architecture is None:
            return None
        return architecture if self.image_size == 224 else f"{architecture}-{self.image_size}"

    @staticmethod
    def preset_names() -> list[str]:
        """The names accepted by [`RefinerViTConfig.from_preset`]."""
        return list(PRESETS)


def count_parameters(config: RefinerViTConfig, heads: bool = True) -> int:
    """
    The number of parameters of [`RefinerViTForImageClassification`] (of [`RefinerViTModel`] without `heads`) built
    from `config`, counted from the configuration alone, before anything is allocated.
    """
    hidden, heads_count, labels = config.hidden_size, config.num_attention_heads, config.num_labels
    total = hidden + (config.num_patches + 1) * hidden  # class token, position embedding
    if config.stem_type == "conv":
        c1, c2, c3 = config.stem_hidden_sizes
        total += config.num_channels * c1 * 49 + c1 * c2 * 9 + c2 * c3 * 9 + 2 * (c1 + c2 + c3)
        total += c3 * hidden * (config.patch_size // 2) ** 2 + hidden
    else:
        total += config.num_channels * hidden * config.patch_size**2 + hidden
    linear = hidden * hidden + (hidden if config.qkv_bias else 0)  # one of q, k, v
    mlp = 2 * hidden * config.intermediate_size + config.intermediate_size + 2 * hidden  # fc1, fc2, layer scale
    for block_type, count in Counter(config.block_types).items():  # per kind of block: fast for any depth
        block = 4 * hidden + (linear if block_type == "shared" else 3 * linear) + hidden * hidden + hidden + mlp
        if block_type != "plain":
            expansion = config.shared_expansion if block_type == "shared" else config.refine_expansion
            expanded = heads_count * expansion
            if expansion != 1:
                block += heads_count * expanded + 2 * expanded  # expand conv and its BatchNorm
            block += expanded * config.refine_kernel_size**2 + 2 * expanded  # depthwise conv and its BatchNorm
            block += expanded * heads_count + 4 * heads_count  # project conv, its BatchNorm, adapt_bn
        total += count * block
    total += 2 * hidden  # final LayerNorm
    if heads and labels > 0:
        total += (hidden * labels + labels) * (2 if config.use_aux_head else 1)
    return total


# Values per parameter held through every forward of training with AdamW, beside the activations: the weight and the
# optimizer's two moments (the gradients appear as the backward pass frees the activations, so they are not added).
TRAINING_COPIES_PER_PARAMETER = 3
_FLOAT_BYTES = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """
    A lower bound of the memory a model needs, from its configuration alone: what it must hold, not what an allocator
    adds on top.

    Args:
        parameters (`int`): the number of parameters ([`count_parameters`]).
        parameter_bytes (`int`): the weights in float32, and while training AdamW's two moments.
        activation_bytes (`int`): the activations of one image at `config.image_size`: at inference the largest
            block's, while training every block's (kept for the backward pass).
        training (`bool`): which of the two it is.
    """

    parameters: int
    parameter_bytes: int
    activation_bytes: int
    training: bool

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.activation_bytes

    def describe(self) -> str:
        """'at least 12.3 GiB (9.8 GiB of weights and optimizer state for N parameters, 2.5 GiB of activations ...)'."""
        weights = "weights and optimizer state" if self.training else "weights"
        return (
            f"at least {format_bytes(self.total_bytes)} ({format_bytes(self.parameter_bytes)} of {weights} for "
            f"{self.parameters:,} parameters, {format_bytes(self.activation_bytes)} of activations for one image)"
        )


def format_bytes(count: int) -> str:
    """'1.5 GiB', '12.0 MiB', '3.2 KiB' or '512 bytes'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count} bytes"


def _block_activations(config: RefinerViTConfig, block_type: str, training: bool) -> int:
    """Values one block holds for one image: while training those kept for the backward pass, else its peak."""
    tokens, hidden = config.num_patches + 1, config.hidden_size
    maps = config.num_attention_heads * tokens * tokens  # one attention map of every head
    expansion = config.shared_expansion if block_type == "shared" else config.refine_expansion
    if training:
        # LayerNorm inputs, query/key/value (value only in shared blocks), the attention output and the MLP's input,
        # its hidden layer before and after the activation; the softmax map, and the refinement's maps around each
        # convolution and BatchNorm.
        vectors = tokens * (hidden * (4 if block_type == "shared" else 6) + 2 * config.intermediate_size)
        return vectors + maps * (1 if block_type == "plain" else 2 + 4 * expansion)
    # The widest moment: the scores and the softmax, or a refinement convolution's input and expanded output.
    vectors = tokens * (3 * hidden + config.intermediate_size)
    return vectors + maps * (2 if block_type == "plain" else 1 + expansion)


def estimate_memory(config: RefinerViTConfig, training: bool = False) -> MemoryEstimate:
    """
    A lower bound of the memory (in float32) a [`RefinerViTForImageClassification`] of `config` needs to run one image
    of `config.image_size` (or, with `training`, to train on it with AdamW), computed from the numbers alone.
    """
    parameters = count_parameters(config)
    side = config.image_size
    stem = config.num_channels * side * side  # the image
    if config.stem_type == "conv":
        half = ((side - 1) // 2 + 1) ** 2
        stem += (2 * sum(config.stem_hidden_sizes) if training else 2 * max(config.stem_hidden_sizes)) * half
    counts = Counter(config.block_types)
    per_block = {kind: _block_activations(config, kind, training) for kind in counts}
    if training:
        activations = stem + sum(per_block[kind] * count for kind, count in counts.items())
    else:
        activations = stem + max(per_block.values(), default=0)
    copies = TRAINING_COPIES_PER_PARAMETER if training else 1
    return MemoryEstimate(parameters, copies * _FLOAT_BYTES * parameters, _FLOAT_BYTES * activations, training)


def machine_memory() -> int | None:
    """
    The bytes of memory this process can have: the machine's physical memory (psutil when installed, else the
    operating system's page count), or the container's limit when that is lower; `None` when it cannot be told.
    """
    total = None
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except Exception:  # not installed, or no answer on this platform
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):
            total = None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or int(text) < total):
            total = int(text)
        break
    return total


__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "MemoryEstimate",
    "Preset",
    "PresetNameError",
    "RefinerViTConfig",
    "count_parameters",
    "estimate_memory",
    "format_bytes",
    "machine_memory",
    "refuse_preset_name",
]
