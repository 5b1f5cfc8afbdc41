#!/usr/bin/env python
"""
Draw what Refiner-ViT's attention refinement does to one image.

For each chosen layer and head, the picture shows the class token's attention over the patch grid, overlaid on the
image the model saw (after the processor's resize and crop): for refined and shared blocks the map before refinement
and the refined map side by side, for plain blocks the map they used. One row per layer, with one colour scale for the
whole row (every head, before and after), shown by the colour bar at its end: colours compare within a row, not across
rows. A map that spans less than a quarter of its row's range (e.g. a positive softmax map next to refined maps ten
times wider) would look flat, as if it attended nowhere: it is drawn on its own scale instead, framed and marked with
its range ("own scale 0.006 to 0.07"). Above them: the image, the top-5 prediction (with the true label and whether
the top-1 is right, when the label is known: the embedded image's, or `--label`), and how alike the heads are per
layer, before and after
refinement (`refiner_hf.attention_analysis`: DeepViT's cosine similarity of the heads' attention columns, and its
centred form, the Pearson correlation, which a refinement's BatchNorm scale and offset do not move; 1 means identical
heads). It prints both per layer, with the same two measures between each layer's maps and the maps the layer before
used (DeepViT's cross-layer similarity). Everything comes from the maps the model returns (`output_attentions=True`,
`output_unrefined_attentions=True`).

With no arguments it uses the model the trainer's default run writes (outputs/refiner-vit-fashion-mnist/model) if it
exists, otherwise the tiny original checkpoint bundled with the tests, converted on the fly (random weights: the
picture shows the path, not a trained model). Without --image, a model trained on the embedded Fashion-MNIST data
(whose classes are Fashion-MNIST's) is shown the first image of that data's validation split, an ankle boot; any
other model the bundled cat photo:

    python examples/visualize_attention.py
    python examples/visualize_attention.py --model path/to/converted-dir --image photo.jpg --layers 0 4 8 --heads 0 1
    python examples/visualize_attention.py --model outputs/refiner-vit-s/model --image https://example.com/cat.jpg \
        --label "tabby cat"

The figure has `2 * len(heads)` columns (and a narrow one for the colour bars) and `len(layers) + 1` rows of about
`--panel-size`-inch panels plus a half-panel title band, so the PNG is `2 * heads * panel * dpi` by
`(layers + 1.5) * panel * dpi` pixels.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib


matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoImageProcessor, AutoModelForImageClassification  # noqa: E402
from transformers.image_utils import load_image  # noqa: E402
from transformers.utils import logging  # noqa: E402

from refiner_hf import RefinerViTForImageClassification, convert_original_checkpoint  # noqa: E402
from refiner_hf.assets import sample_image_path  # noqa: E402
from refiner_hf.attention_analysis import (  # noqa: E402
    LayerSimilarity,
    class_token_attention,
    similarity_by_layer,
    upsample_to_image,
)
from refiner_hf.image_processing_refiner_vit import image_processor_for_config  # noqa: E402
from refiner_hf.loading import NO_IMAGE_PROCESSOR, load_image_processor_checked, load_model_checked  # noqa: E402
from refiner_hf.training import embedded_data  # noqa: E402
from refiner_hf.training.errors import (  # noqa: E402
    ArgumentParser,
    UsageError,
    did_you_mean,
    run_command,
)


TRAINED_DEFAULT = Path("outputs/refiner-vit-fashion-mnist/model")
BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "released_tiny.pth"
DEFAULT_MAX_LAYERS = 4
DEFAULT_MAX_HEADS = 4
# The embedded validation image shown to a model trained on the embedded data: the first, an ankle boot.
EMBEDDED_IMAGE_INDEX = 0


@dataclass
class AttentionViews:
    """What the picture is drawn from, for one image."""

    image: np.ndarray  # (height, width, 3) in [0, 1]: the processed image, un-normalised
    block_types: list[str]
    used: list[torch.Tensor]  # per layer, (heads, tokens, tokens): the map the block multiplied with its values
    unrefined: list[torch.Tensor]  # per layer, the map before refinement (the used one for plain blocks)
    top5: list[tuple[str, float]]
    truth: TrueLabel | None = None  # when the image's class is known


@dataclass(frozen=True)
class TrueLabel:
    """The image's class, and where the model ranks it."""

    name: str
    rank: int  # 1 when the top-1 prediction is right
    probability: float

    def verdict(self, top1: str) -> str:
        """E.g. "True label: Ankle boot; the top-1, Sneaker, is wrong (Ankle boot is 2nd, 14%)"."""
        if self.rank == 1:
            return f"True label: {self.name}; the top-1 is right"
        return (
            f"True label: {self.name}; the top-1, {top1}, is wrong ({self.name} is {ordinal(self.rank)}, "
            f"{self.probability:.0%})"
        )


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="A model directory or Hub id (default: see above).")
    parser.add_argument(
        "--image",
        help="Image file or URL (default: a Fashion-MNIST model's own validation image, else a cat photo; see above).",
    )
    parser.add_argument(
        "--label",
        metavar="NAME_OR_INDEX",
        help="The image's true class, a class name of the model or its index: the title then says whether the top-1 "
        "prediction is right (the embedded Fashion-MNIST image's own label is known without it).",
    )
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        help=f"Layer indices (default: up to {DEFAULT_MAX_LAYERS} refined/shared layers, evenly spread).",
    )
    parser.add_argument("--heads", type=int, nargs="+", help=f"Head indices (default: the first {DEFAULT_MAX_HEADS}).")
    parser.add_argument("--out", type=Path, default=Path("attention.png"), help="Where to write the PNG.")
    parser.add_argument("--panel-size", type=float, default=1.6, help="Size of one panel, in inches.")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.6, help="Opacity of the attention colours over the image.")
    return parser.parse_args(argv)


def load_model(model: str | None) -> tuple[RefinerViTForImageClassification, object, str]:
    """The model and image processor to draw, and a line saying which they are."""
    if model is None and TRAINED_DEFAULT.is_dir():
        model = str(TRAINED_DEFAULT)
    if model is not None:
        # Every tensor checked (missing, unexpected, non-finite: one-line errors), and the model's own processor;
        # only one that is not there falls back to the evaluation processor for its configuration.
        loaded = load_model_checked(model, "--model").model
        processor, note = load_image_processor_checked(model, loaded.config, "--model")
        described = f"model {model}" + (f" ({note})" if note.startswith(NO_IMAGE_PROCESSOR) else "")
        return loaded.eval(), processor, described
    converted = convert_original_checkpoint(BUNDLED_CHECKPOINT)
    with tempfile.TemporaryDirectory() as tmp:  # a round trip, as a converted model would be used
        converted.save_pretrained(tmp)
        image_processor_for_config(converted.config).save_pretrained(tmp)
        loaded = AutoModelForImageClassification.from_pretrained(tmp)
        processor = AutoImageProcessor.from_pretrained(tmp)
    return loaded.eval(), processor, f"the bundled tiny checkpoint {BUNDLED_CHECKPOINT.name} (random weights)"


def trained_on_embedded_data(model: RefinerViTForImageClassification) -> bool:
    """Whether the model classifies the embedded Fashion-MNIST classes (the trainer's default run, for instance)."""
    config = model.config
    return [config.id2label[i] for i in range(config.num_labels)] == embedded_data.class_names()


def default_image(model: RefinerViTForImageClassification) -> tuple[Image.Image, str, int | None]:
    """
    The image to draw without --image, its description and its class index when known: a model trained on the
    embedded data gets one of its validation images (the cat photo would only show what a clothing classifier makes
    of a cat), any other the photo.
    """
    if trained_on_embedded_data(model):
        array, label = embedded_data.image("validation", EMBEDDED_IMAGE_INDEX)
        name = embedded_data.class_names()[label]
        description = f"embedded Fashion-MNIST validation image {EMBEDDED_IMAGE_INDEX} ({name})"
        return Image.fromarray(array).convert("RGB"), description, int(label)
    return load_image(str(sample_image_path())), str(sample_image_path()), None


def label_index(value: str, id2label: dict[int, str]) -> int:
    """
    The class index `--label` names: an index of the model's classes, or one of their names in any case (for the
    ImageNet names, which list synonyms, also one synonym: "tabby cat" for "tabby, tabby cat", when only one has it).
    """
    count = len(id2label)
    if value.strip().lstrip("-").isdigit():
        index = int(value)
        if not 0 <= index < count:
            raise UsageError(f"--label {value}: out of range; the model has {count} classes (0 to {count - 1}).")
        return index
    wanted = value.strip().lower()
    exact = [i for i, name in id2label.items() if name.lower() == wanted]
    synonyms = [i for i, name in id2label.items() if wanted in (part.strip().lower() for part in name.split(","))]
    found = exact or synonyms
    if len(found) == 1:
        return found[0]
    if found:
        named = ", ".join(f"{i} ({id2label[i]!r})" for i in found)
        raise UsageError(f"--label {value!r}: several classes have this name: {named}; give the index.")
    shown = ", ".join(repr(id2label[i]) for i in sorted(id2label)[:10]) + (", ..." if count > 10 else "")
    raise UsageError(
        f"--label {value!r}: not a class of the model.{did_you_mean(value, id2label.values())} Give a class name or "
        f"index ({shown})."
    )


def read_image(source: str) -> Image.Image:
    if not source.startswith(("http://", "https://")) and not Path(source).is_file():
        raise UsageError(f"--image {source}: no such file (give an image file or an http(s) URL).")
    try:
        return load_image(source)
    except Exception as error:  # transformers raises several types for files, URLs and undecodable data
        raise UsageError(f"--image {source}: could not read the image: {error}") from None


def displayed_image(pixel_values: torch.Tensor, processor) -> np.ndarray:
    """The processed image (1, 3, h, w) as the (h, w, 3) picture in [0, 1] the model saw."""
    image = pixel_values[0].float()
    if getattr(processor, "do_normalize", False):
        mean = torch.tensor(processor.image_mean).reshape(-1, 1, 1)
        std = torch.tensor(processor.image_std).reshape(-1, 1, 1)
        image = image * std + mean
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def attention_views(
    model: RefinerViTForImageClassification, processor, image, label: int | None = None
) -> AttentionViews:
    """Runs one image through the processor and the model and keeps the maps, the top 5 and the rank of `label`."""
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    outputs = model(pixel_values, output_attentions=True, output_unrefined_attentions=True)
    probabilities = outputs.logits[0].float().softmax(-1)
    scores, indices = probabilities.topk(min(5, probabilities.numel()))
    labels = model.config.id2label
    return AttentionViews(
        image=displayed_image(pixel_values, processor),
        block_types=list(model.config.block_types),
        used=[maps[0].float() for maps in outputs.attentions],
        unrefined=[maps[0].float() for maps in outputs.unrefined_attentions],
        top5=[(labels.get(int(i), str(int(i))), float(s)) for s, i in zip(scores, indices)],
        truth=None
        if label is None
        else TrueLabel(
            name=labels.get(label, str(label)),
            rank=int((probabilities > probabilities[label]).sum()) + 1,
            probability=float(probabilities[label]),
        ),
    )


def default_layers(block_types: Sequence[str], limit: int = DEFAULT_MAX_LAYERS) -> list[int]:
    """Up to `limit` layers, evenly spread over the refined and shared ones (over all if there are none)."""
    candidates = [i for i, kind in enumerate(block_types) if kind != "plain"] or list(range(len(block_types)))
    if len(candidates) <= limit:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, limit).round().astype(int)
    return [candidates[i] for i in picks]


def check_indices(name: str, indices: Sequence[int], count: int) -> list[int]:
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise UsageError(f"--{name} {bad} out of range: the model has {count} {name} (0 to {count - 1}).")
    return list(indices)


def overlay_attention(
    image: np.ndarray,
    grid_map: torch.Tensor,
    alpha: float = 0.6,
    colormap: str = "inferno",
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """
    The image with a patch-grid map drawn over it: the map is stretched over the image, scaled to [0, 1] (over
    `value_range`, to share a colour scale with other maps, else over its own minimum and maximum) and coloured
    (bright where the attention is high), then blended with opacity `alpha`. Returns `(height, width, 3)` in [0, 1].
    """
    heat = upsample_to_image(grid_map, image.shape[:2], value_range).numpy()
    colours = matplotlib.colormaps[colormap](heat)[..., :3]
    return (1 - alpha) * image + alpha * colours


# A map whose values span less than this fraction of its row's colour scale would look flat on it (in the trained
# default model, the positive maps that layers 1 and 2 refine span 0.006 to 0.07 on rows of -0.7 to 0.7 and -4 to 5).
FLAT_FRACTION = 0.25
OWN_SCALE_COLOUR = "tab:cyan"


def flat_on_row_scale(maps: Sequence[torch.Tensor], fraction: float = FLAT_FRACTION) -> list[bool]:
    """
    Which of a row's maps span less than `fraction` of the row's range (over all its maps), so that they would show as
    flat on a scale shared with the others: those are drawn on their own scale and marked, and the row's colour bar
    spans the others. None are when all would be (maps offset from each other: they share the scale).
    """
    low, high = row_value_range(maps)
    flat = [float(m.max() - m.min()) < fraction * (high - low) for m in maps]
    return [False] * len(maps) if all(flat) else flat


def own_scale_note(grid_map: torch.Tensor) -> str:
    """The mark of a map drawn on its own scale: the range it spans."""
    return f"own scale {float(grid_map.min()):.2g} to {float(grid_map.max()):.2g}"


def row_value_range(maps: Sequence[torch.Tensor]) -> tuple[float, float]:
    """The lowest and highest value over the maps of one row (widened a little if they are all equal)."""
    low = min(float(m.min()) for m in maps)
    high = max(float(m.max()) for m in maps)
    if not high > low:
        spread = 1e-6 * max(abs(low), 1e-30)
        low, high = low - spread, high + spread
    return low, high


def similarity_rows(views: AttentionViews) -> list[LayerSimilarity]:
    """Per layer, the head and cross-layer similarities before and after refinement (NaN where undefined)."""
    return similarity_by_layer(views.used, views.unrefined, views.block_types)


MEASURE_GROUPS = ("heads: cosine", "heads: centred", "layers: cosine", "layers: centred")


def format_similarity_table(rows: list[LayerSimilarity]) -> str:
    """The printed table: per layer, each measure before and after refinement."""
    lines = [
        f"  {'':>5}  {'':<8}" + "".join(f" {group:^15}" for group in MEASURE_GROUPS),
        f"  {'layer':>5}  {'block':<8}" + f" {'before':>7} {'after':>7}" * 4,
    ]
    for row in rows:
        values = (
            row.head_cosine_before, row.head_cosine_after, row.head_pearson_before, row.head_pearson_after,
            row.cross_layer_cosine_before, row.cross_layer_cosine_after,
            row.cross_layer_pearson_before, row.cross_layer_pearson_after,
        )  # fmt: skip
        # "–" where a measure does not apply (no block before the first; one head has no pair).
        cells = "".join(f" {'–' if math.isnan(value) else f'{value:.3f}':>7}" for value in values)
        lines.append(f"  {row.layer:>5}  {row.block_type:<8}" + cells)
    return "\n".join(lines)


def draw(
    views: AttentionViews,
    layers: Sequence[int],
    heads: Sequence[int],
    out: Path,
    panel_size: float = 1.6,
    dpi: int = 100,
    alpha: float = 0.6,
    colormap: str = "inferno",
) -> Path:
    """
    Writes the picture (see the module docstring for its layout and size) to `out`. The maps of one row (one layer:
    every head, before and after refinement) share a colour scale, shown by the row's colour bar, so that before and
    after can be compared by colour; different rows have different scales. A map that would look flat on its row's
    scale ([`flat_on_row_scale`]) is drawn on its own, framed and marked with its range, and the title says so.
    """
    columns, rows = 2 * len(heads), len(layers) + 1
    figure = plt.figure(figsize=(columns * panel_size, (rows + 0.5) * panel_size), dpi=dpi)
    # A narrow last column holds the rows' colour bars; the margins leave room for their numbers and the row labels.
    grid = figure.add_gridspec(
        rows, columns + 1, width_ratios=[1] * columns + [0.08], top=rows / (rows + 0.5), bottom=0.02,
        left=0.3 / columns, right=1 - 0.55 / columns, hspace=0.4, wspace=0.12,
    )  # fmt: skip
    prediction = ", ".join(f"{label} {score:.0%}" for label, score in views.top5)
    title = [f"Top 5: {prediction}"]
    if views.truth is not None:
        title.insert(0, views.truth.verdict(views.top5[0][0]))
    row_maps = {layer: row_panels(views, layer, heads) for layer in layers}
    if any(flat for panels in row_maps.values() for *_, flat in panels):
        title.append(
            'Each row\'s colours follow its colour bar, except panels marked "own scale": their maps span less than '
            f"{FLAT_FRACTION:.0%} of the row's range and would look flat on it"
        )
    figure.suptitle("\n".join(title), fontsize=7 if len(title) > 2 else 8, wrap=True)

    image_axis = figure.add_subplot(grid[0, 0])
    image_axis.imshow(views.image)
    image_axis.set_title("input", fontsize=7)
    image_axis.axis("off")
    # The similarity plot leaves a column for its axis labels when there is room, and one for its legend when wide.
    legend_outside = columns >= 6
    span = grid[0, 2 : columns - 1] if legend_outside else grid[0, 2:columns] if columns >= 4 else grid[0, 1:columns]
    _draw_similarity(figure.add_subplot(span), similarity_rows(views), legend_outside)

    for row, layer in enumerate(layers, start=1):
        kind = views.block_types[layer]
        panels = row_maps[layer]
        value_range = row_value_range([grid_map for *_, grid_map, flat in panels if not flat])
        for n, head in enumerate(heads):
            before_axis = figure.add_subplot(grid[row, 2 * n])
            before_axis.axis("off")
            if kind == "plain":
                before_axis.text(0.5, 0.5, "plain block:\nno refinement", ha="center", va="center", fontsize=6)
            for column, when, panel_head, grid_map, flat in panels:
                if panel_head != head:
                    continue
                axis = figure.add_subplot(grid[row, column]) if column % 2 else before_axis
                axis.imshow(overlay_attention(views.image, grid_map, alpha, colormap, None if flat else value_range))
                axis.set_title(f"head {head} {when}", fontsize=6)
                axis.axis("off")
                if flat:  # drawn on its own scale, which the panel says, in a frame of its own colour
                    axis.text(
                        0.5, 0.03, own_scale_note(grid_map), transform=axis.transAxes, ha="center", va="bottom",
                        fontsize=5, bbox=dict(boxstyle="round,pad=0.2", facecolor="white", alpha=0.85, linewidth=0.8,
                                              edgecolor=OWN_SCALE_COLOUR),
                    )  # fmt: skip
                    axis.add_patch(
                        matplotlib.patches.Rectangle(
                            (0, 0), 1, 1, transform=axis.transAxes, fill=False, linewidth=1.5,
                            edgecolor=OWN_SCALE_COLOUR, clip_on=False,
                        )
                    )  # fmt: skip
            if n == 0:
                box = before_axis.get_position()
                figure.text(
                    box.x0 - 0.1 / columns, (box.y0 + box.y1) / 2, f"layer {layer} ({kind})", rotation=90,
                    ha="right", va="center", fontsize=6,
                )  # fmt: skip
        bar = figure.colorbar(
            matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(*value_range), colormap),
            cax=figure.add_subplot(grid[row, columns]),
        )
        bar.ax.tick_params(labelsize=5, length=2)
        bar.ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi)
    plt.close(figure)
    return out


def row_panels(
    views: AttentionViews, layer: int, heads: Sequence[int]
) -> list[tuple[int, str, int, torch.Tensor, bool]]:
    """
    The maps of one row, as (column, "before" / "after" / "used", head, class-token map over the grid, drawn on its
    own scale): for refined and shared blocks, per head, the map before and after refinement; for plain blocks the map
    used, in the "after" column.
    """
    used = class_token_attention(views.used[layer])
    unrefined = class_token_attention(views.unrefined[layer])
    panels = []
    for n, head in enumerate(heads):
        if views.block_types[layer] == "plain":
            panels.append((2 * n + 1, "used", head, used[head]))
        else:
            panels += [(2 * n, "before", head, unrefined[head]), (2 * n + 1, "after", head, used[head])]
    flat = flat_on_row_scale([grid_map for *_, grid_map in panels])
    return [(*panel, f) for panel, f in zip(panels, flat)]


def _draw_similarity(axis, rows: list[LayerSimilarity], legend_outside: bool = False) -> None:
    indices = [row.layer for row in rows]
    lines = (
        ("head_cosine_before", "cosine, before", "tab:gray", "o--"),
        ("head_cosine_after", "cosine, after", "tab:gray", "o-"),
        ("head_pearson_before", "centred, before", "tab:orange", "s--"),
        ("head_pearson_after", "centred, after", "tab:orange", "s-"),
    )
    for field, label, colour, style in lines:
        axis.plot(indices, [getattr(row, field) for row in rows], style, color=colour, label=label, markersize=3)
    axis.set_xticks(indices)  # layers are whole numbers
    axis.set_xlabel("layer", fontsize=6, labelpad=1)
    axis.set_ylabel("head similarity", fontsize=6)
    axis.set_title("how alike the heads are (1: identical)", fontsize=6)
    values = [getattr(row, field) for row in rows for field, *_ in lines]
    lowest = np.nanmin(values + [0.0]) if not all(np.isnan(values)) else 0.0
    axis.set_ylim(min(lowest, 0.0) - 0.05, 1.05)
    axis.tick_params(labelsize=5, length=2, pad=1)
    if legend_outside:  # beside the plot, clear of its lines
        axis.legend(fontsize=5, loc="upper left", bbox_to_anchor=(1.02, 1.0), handlelength=1.5, borderaxespad=0)
    else:
        axis.legend(fontsize=5, ncol=2, loc="best", handlelength=1.5, columnspacing=0.8)


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.disable_progress_bar()
    model, processor, description = load_model(args.model)
    if args.image is None:
        image, image_name, label = default_image(model)
    else:
        image, image_name, label = read_image(args.image), args.image, None
    if args.label is not None:
        label = label_index(args.label, {int(i): name for i, name in model.config.id2label.items()})
    views = attention_views(model, processor, image, label)
    layers = check_indices("layers", args.layers, len(views.used)) if args.layers else default_layers(views.block_types)
    num_heads = views.used[0].shape[0]
    heads = (
        check_indices("heads", args.heads, num_heads) if args.heads else list(range(min(DEFAULT_MAX_HEADS, num_heads)))
    )

    print(f"Attention of {description} on {image_name}")
    print("Top 5: " + ", ".join(f"{name} ({score:.3f})" for name, score in views.top5))
    if views.truth is not None:
        print(views.truth.verdict(views.top5[0][0]) + ".")
    print(
        "Similarity per layer, before and after refinement: between the heads, and with the map the layer before used "
        "(DeepViT's cosine of the attention columns, and centred: their Pearson correlation; 1 = identical):"
    )
    print(format_similarity_table(similarity_rows(views)))
    out = draw(views, layers, heads, args.out, args.panel_size, args.dpi, args.alpha)
    print(f"Wrote {out}")
    return out


if __name__ == "__main__":
    run_command(main)
