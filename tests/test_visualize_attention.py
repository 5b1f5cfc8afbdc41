"""examples/visualize_attention.py: the picture's size and content, and its checks of the arguments."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script, randomize_, tiny_config
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from refiner_hf import RefinerViTForImageClassification
from refiner_hf.assets import sample_image_path
from refiner_hf.attention_analysis import class_token_attention, similarity_by_layer
from refiner_hf.image_processing_refiner_vit import image_processor_for_config
from refiner_hf.training import embedded_data
from refiner_hf.training.errors import UsageError, run_command


SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "visualize_attention.py"
# The printed table's columns after the layer and block type, in order.
FIELDS = [
    f"{group}_{measure}_{when}"
    for group in ("head", "cross_layer")
    for measure in ("cosine", "pearson")
    for when in ("before", "after")
]


@pytest.fixture(scope="module")
def visualizer():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-refiner")
    model = randomize_(RefinerViTForImageClassification(tiny_config())).eval()
    model.save_pretrained(directory)
    image_processor_for_config(model.config).save_pretrained(directory)
    return directory


def test_writes_a_png_of_the_stated_size(visualizer, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "maps.png"
    written = visualizer.main(
        ["--model", str(tiny_model_dir), "--image", str(sample_image_path()), "--layers", "0", "1", "2",
         "--heads", "0", "3", "--out", str(out), "--panel-size", "1.0", "--dpi", "40"]
    )  # fmt: skip
    assert written == out
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        # 2 * heads columns, layers + 1 rows plus a half-panel title band, each panel 1 inch at 40 dpi.
        assert picture.size == (2 * 2 * 40, int((3 + 1.5) * 40))
    printed = capsys.readouterr().out
    # The similarity table: one line per layer; per measure (heads: cosine, centred; layers: cosine, centred) the
    # value before and after refinement, as `similarity_by_layer` gives them for the same image.
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert [(row[0], row[1]) for row in rows] == [("0", "refined"), ("1", "shared"), ("2", "plain"), ("3", "shared")]
    model = AutoModelForImageClassification.from_pretrained(tiny_model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    views = visualizer.attention_views(model, processor, Image.open(sample_image_path()).convert("RGB"))
    expected = similarity_by_layer(views.used, views.unrefined, views.block_types)
    for row, layer in zip(rows, expected):
        values = [float("nan") if value == "–" else float(value) for value in row[2:]]
        fields = [getattr(layer, name) for name in FIELDS]
        np.testing.assert_allclose(values, fields, rtol=0, atol=6e-4)  # printed with 3 decimals
    assert 0.0 <= float(rows[0][2]) <= 1.0  # the first block refines a softmax map: non-negative, cosines in [0, 1]
    assert rows[2][2:4] == [rows[2][2]] * 2 and rows[2][4:6] == [rows[2][4]] * 2  # a plain block's map is not refined
    assert rows[1][6] == rows[1][8] == "1.000"  # a shared block refines the map the block before used
    assert rows[0][6:] == ["–"] * 4  # the first block has no block before


def test_default_layers_spread_over_the_refined_and_shared_blocks(visualizer):
    assert visualizer.default_layers(["refined", "shared", "plain", "shared"]) == [0, 1, 3]
    kinds = ["plain"] + ["refined"] * 9
    assert visualizer.default_layers(kinds) == [1, 4, 6, 9]  # positions 0, 8/3, 16/3, 8 of 9, rounded
    assert visualizer.default_layers(["plain"] * 3) == [0, 1, 2]


def test_overlay_lights_the_patch_the_class_token_attends_to(visualizer):
    # A (heads, tokens, tokens) map on a 4x4 grid whose class token attends only to the patch at row 1, column 2.
    attention = torch.full((2, 17, 17), 1 / 17)
    attention[1, 0] = 0.0
    attention[1, 0, 1 + 1 * 4 + 2] = 1.0
    grid = class_token_attention(attention)[1]
    image = np.full((64, 64, 3), 0.5)
    overlay = visualizer.overlay_attention(image, grid, alpha=0.6)
    assert overlay.shape == (64, 64, 3) and overlay.min() >= 0.0 and overlay.max() <= 1.0
    brightness = overlay.mean(axis=-1)
    row, column = np.unravel_index(brightness.argmax(), brightness.shape)
    assert 16 <= row < 32 and 32 <= column < 48
    inside = brightness[16:32, 32:48].mean()
    outside = np.concatenate([brightness[:8].ravel(), brightness[48:].ravel()]).mean()
    assert inside > outside + 0.2
    # A head with no preference leaves a uniform picture (the map scales to zeros: the colormap's lowest colour).
    uniform = visualizer.overlay_attention(image, class_token_attention(attention)[0], alpha=0.6)
    assert (uniform == uniform[0, 0]).all()


def test_rejects_layers_and_heads_the_model_does_not_have(visualizer, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--layers \[4\] out of range: the model has 4 layers"):
        visualizer.main(["--model", str(tiny_model_dir), "--layers", "4", "--out", str(tmp_path / "x.png")])
    with pytest.raises(ValueError, match=r"--heads \[-1\] out of range"):
        visualizer.main(["--model", str(tiny_model_dir), "--heads", "-1", "--out", str(tmp_path / "x.png")])
    with pytest.raises(UsageError, match=r"--image .*missing.jpg: no such file"):
        visualizer.main(["--model", str(tiny_model_dir), "--image", str(tmp_path / "missing.jpg")])


def test_single_head_model_draws_without_a_similarity(visualizer, tmp_path, capsys):
    directory = tmp_path / "one-head"
    model = randomize_(RefinerViTForImageClassification(tiny_config(num_attention_heads=1, hidden_size=8))).eval()
    model.save_pretrained(directory)
    image_processor_for_config(model.config).save_pretrained(directory)
    out = visualizer.main(["--model", str(directory), "--out", str(tmp_path / "one.png"), "--dpi", "30"])
    with Image.open(out) as picture:  # 1 head: 2 columns; 3 refined/shared layers + 1 row; 1.6-inch panels
        assert picture.size == (int(2 * 1.6 * 30), int((3 + 1.5) * 1.6 * 30))
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    # No pair of heads: no head similarity; the cross-layer similarity needs one head only.
    assert len(rows) == 4 and all(row[2:6] == ["–"] * 4 for row in rows)
    assert all(-1.0 <= float(value) <= 1.0 for row in rows[1:] for value in row[6:])


def save_model(directory: Path, **config_fields) -> Path:
    model = randomize_(RefinerViTForImageClassification(tiny_config(**config_fields))).eval()
    model.save_pretrained(directory)
    image_processor_for_config(model.config, crop_pct=1.0).save_pretrained(directory)
    return directory


def test_a_fashion_mnist_model_is_shown_its_own_data(visualizer, tmp_path, capsys, monkeypatch):
    # A model of the embedded data's classes, where the trainer's default run writes its model.
    names = embedded_data.class_names()
    directory = fashion_mnist_model(tmp_path / "default-run" / "model")
    monkeypatch.setattr(visualizer, "TRAINED_DEFAULT", directory)
    visualizer.main(["--out", str(tmp_path / "maps.png"), "--dpi", "20"])
    assert f"Attention of model {directory} on embedded Fashion-MNIST validation image 0 (Ankle boot)" in (
        capsys.readouterr().out
    )
    image, name, known = visualizer.default_image(AutoModelForImageClassification.from_pretrained(directory))
    array, label = embedded_data.image("validation", 0)
    assert names[label] == "Ankle boot" and image.size == (28, 28) and known == label
    assert np.array_equal(np.asarray(image), np.repeat(array[..., None], 3, axis=-1))

    # Any other model is shown the photo.
    other = save_model(tmp_path / "other")
    visualizer.main(["--model", str(other), "--out", str(tmp_path / "other.png"), "--dpi", "20"])
    assert f"Attention of model {other} on {sample_image_path()}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/no/such/model"], "--model /no/such/model: no such directory."),
        (["--image", "/no/such.jpg"], "--image /no/such.jpg: no such file (give an image file or an http(s) URL)."),
        (["--layer", "1"], "unknown argument --layer. Did you mean --layers?"),
    ],
)
def test_usage_errors_are_one_line(visualizer, tiny_model_dir, capsys, argv, message):
    if "--model" not in argv:
        argv = ["--model", str(tiny_model_dir), *argv]
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: visualizer.main(argv))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{Path(sys.argv[0]).name}: error: {message}")


def test_each_row_has_one_colour_scale_a_colour_bar_and_no_overlapping_labels(
    visualizer, tiny_model_dir, tmp_path, monkeypatch
):
    model = AutoModelForImageClassification.from_pretrained(tiny_model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    views = visualizer.attention_views(model, processor, Image.open(sample_image_path()).convert("RGB"), label=2)
    # Layer 3's maps before refinement (softmax maps, spanning less than 0.1) made flat on its row's scale, as in a
    # trained model: refined maps spanning about 6.
    views.used[3] = torch.randn(views.used[3].shape, generator=torch.Generator().manual_seed(0))
    figure = drawn_figure(visualizer, views, [0, 2, 3], [0, 1, 2], tmp_path, monkeypatch)
    bars = [axis for axis in figure.axes if hasattr(axis, "_colorbar")]
    assert len(bars) == 3  # one per layer row
    marked = 0
    for bar, layer in zip(bars, [0, 2, 3]):
        used = visualizer.class_token_attention(views.used[layer])[:3]
        unrefined = visualizer.class_token_attention(views.unrefined[layer])[:3]
        # The row's scale spans every map drawn on it: before and after refinement (plain: the used map only) but
        # those that would look flat on it, drawn on their own scale and marked with their range.
        panels = visualizer.row_panels(views, layer, [0, 1, 2])
        shown = [used] if views.block_types[layer] == "plain" else [unrefined, used]
        assert [when for _, when, *_ in panels] == (["used"] * 3 if len(shown) == 1 else ["before", "after"] * 3)
        maps = [m[head] for head in range(3) for m in shown]
        assert all(torch.equal(grid_map, m) for (*_, grid_map, _), m in zip(panels, maps))
        on_bar = [m for m, (*_, flat) in zip(maps, panels) if not flat]
        low, high = min(float(m.min()) for m in on_bar), max(float(m.max()) for m in on_bar)
        norm = bar._colorbar.norm
        assert norm.vmin == pytest.approx(low, rel=1e-6) and norm.vmax == pytest.approx(high, rel=1e-6)
        # Flat: spanning less than a quarter of the row's range, unless all do (maps offset from each other).
        row_low, row_high = visualizer.row_value_range(maps)
        narrow = [float(m.max() - m.min()) < visualizer.FLAT_FRACTION * (row_high - row_low) for m in maps]
        assert [flat for *_, flat in panels] == ([False] * len(maps) if all(narrow) else narrow)
        marked += sum(flat for *_, flat in panels)
    notes = [text.get_text() for axis in figure.axes for text in axis.texts if text.get_text().startswith("own")]
    assert len(notes) == marked >= 3  # at least layer 3's before maps
    flat_before = visualizer.class_token_attention(views.unrefined[3])[0]
    assert visualizer.own_scale_note(flat_before) in notes
    # The title names the true label and says whether the top-1 is right, and explains the marked panels.
    title = figure._suptitle.get_text().splitlines()
    assert title[0] == views.truth.verdict(views.top5[0][0]) and title[0].startswith("True label: LABEL_2; the top-1")
    assert title[1].startswith("Top 5: ") and title[2].startswith("Each row's colours follow its colour bar, except")
    # The similarity plot's layer ticks are the layers, as whole numbers.
    (plot,) = [axis for axis in figure.axes if axis.get_xlabel() == "layer"]
    assert list(plot.get_xticks()) == [0, 1, 2, 3]
    assert [label.get_text() for label in plot.get_xticklabels()] == ["0", "1", "2", "3"]
    # No two labels (titles, row labels, legend, the plot's axis labels) overlap.
    renderer = figure.canvas.get_renderer()
    texts = list(figure.texts)  # the title and the row labels
    for axis in figure.axes:
        texts += [axis.title, axis.xaxis.label, axis.yaxis.label]
        legend = axis.get_legend()
        if legend is not None:
            texts.append(legend)
    boxes = [text.get_window_extent(renderer) for text in texts if text.get_visible() and _has_content(text)]
    assert len(boxes) >= 3 * 6 + 3
    for i, first in enumerate(boxes):
        for second in boxes[i + 1 :]:
            assert not first.overlaps(second), (first, second)
    monkeypatch.undo()
    visualizer.plt.close(figure)


def drawn_figure(visualizer, views, layers, heads, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(visualizer.plt, "close", figures.append)  # keep the figure to look at
    visualizer.draw(views, layers, heads, tmp_path / "maps.png")
    (figure,) = figures
    figure.canvas.draw()
    return figure


def _has_content(artist) -> bool:
    return not hasattr(artist, "get_text") or bool(artist.get_text())


def test_a_map_flat_on_its_rows_scale_gets_its_own(visualizer):
    # As in the trained default model: positive maps before refinement, refined maps far wider.
    before, after = torch.linspace(0.006, 0.07, 16).reshape(4, 4), torch.linspace(-4.2, 5.3, 16).reshape(4, 4)
    assert visualizer.flat_on_row_scale([before, after, after.flip(0)]) == [True, False, False]
    assert visualizer.own_scale_note(before) == "own scale 0.006 to 0.07"
    # Maps alike in range share the scale, and so do maps that would all be flat (offset from each other).
    assert visualizer.flat_on_row_scale([after, 0.5 * after]) == [False, False]
    assert visualizer.flat_on_row_scale([before, before + 10]) == [False, False]
    # Drawn on its own scale the flat map shows its pattern; on the row's, it is one colour to within a few percent.
    image = np.zeros((16, 16, 3))
    own = visualizer.overlay_attention(image, before, alpha=1.0)
    shared = visualizer.overlay_attention(image, before, alpha=1.0, value_range=visualizer.row_value_range([after]))
    spread = [np.ptp(picture.reshape(-1, 3), axis=0).max() for picture in (own, shared)]  # per colour channel
    assert spread[0] > 0.8 and spread[1] < 0.15


def fashion_mnist_model(directory):
    """A tiny model directory with the Fashion-MNIST classes, as the trainer's default run saves."""
    names = embedded_data.class_names()
    return save_model(
        directory, image_size=28, patch_size=4, num_labels=10, id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )  # fmt: skip


def test_the_true_label_of_the_default_image_and_of_label(visualizer, tiny_model_dir, tmp_path, capsys, monkeypatch):
    directory = fashion_mnist_model(tmp_path / "model")
    model = AutoModelForImageClassification.from_pretrained(directory).eval()
    processor = AutoImageProcessor.from_pretrained(directory)
    image, _, label = visualizer.default_image(model)
    views = visualizer.attention_views(model, processor, image, label)
    with torch.no_grad():
        probabilities = model(**processor(image, return_tensors="pt")).logits[0].softmax(-1)
    assert views.truth.name == "Ankle boot" and views.truth.probability == pytest.approx(float(probabilities[9]))
    assert views.truth.rank == 1 + int((probabilities > probabilities[9]).sum())
    right = visualizer.TrueLabel("Ankle boot", 1, 0.8)
    assert right.verdict("Ankle boot") == "True label: Ankle boot; the top-1 is right"
    wrong = visualizer.TrueLabel("Ankle boot", 2, 0.14)
    assert wrong.verdict("Sneaker") == "True label: Ankle boot; the top-1, Sneaker, is wrong (Ankle boot is 2nd, 14%)"
    assert [visualizer.ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd"
    ]  # fmt: skip
    # The default image's label is printed; --label names another (a name in any case, or an index).
    capsys.readouterr()
    visualizer.main(["--model", str(directory), "--out", str(tmp_path / "a.png"), "--dpi", "20"])
    assert "\nTrue label: Ankle boot; the top-1" in capsys.readouterr().out
    for given in ("sneaker", "7"):
        visualizer.main(["--model", str(directory), "--label", given, "--out", str(tmp_path / "b.png"), "--dpi", "20"])
        assert "\nTrue label: Sneaker; the top-1" in capsys.readouterr().out
    # A synonym of an ImageNet name is enough when only one class has it.
    imagenet = {0: "tabby, tabby cat", 1: "tiger cat", 2: "crane", 3: "crane"}
    names = ("Tabby Cat", "tabby, tabby cat", "tiger cat")
    assert [visualizer.label_index(name, imagenet) for name in names] == [0, 0, 1]
    with pytest.raises(UsageError, match=r"several classes have this name: 2 \('crane'\), 3 \('crane'\); give the"):
        visualizer.label_index("crane", imagenet)
    # A photo has no known label: no such line.
    visualizer.main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "c.png"), "--dpi", "20"])
    assert "True label" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "label, message",
    [
        ("Sneakers", "--label 'Sneakers': not a class of the model. Did you mean Sneaker? Give a class name or index"),
        ("10", "--label 10: out of range; the model has 10 classes (0 to 9)."),
        ("-1", "--label -1: out of range; the model has 10 classes (0 to 9)."),
    ],
)
def test_a_label_the_model_does_not_have_is_a_usage_error(visualizer, tmp_path, capsys, label, message):
    directory = fashion_mnist_model(tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: visualizer.main(["--model", str(directory), "--label", label]))
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{Path(sys.argv[0]).name}: error: {message}"), lines


def test_a_shared_scale_shows_a_larger_map_brighter(visualizer):
    image = np.zeros((32, 32, 3))
    grid = torch.tensor([[0.0, 1.0], [1.0, 2.0]])
    value_range = visualizer.row_value_range([grid, 2 * grid])
    assert value_range == (0.0, 4.0)
    small = visualizer.overlay_attention(image, grid, alpha=1.0, value_range=value_range)
    large = visualizer.overlay_attention(image, 2 * grid, alpha=1.0, value_range=value_range)
    assert large.mean() > small.mean() + 0.1
    # On their own scales the two would look the same.
    np.testing.assert_allclose(
        visualizer.overlay_attention(image, grid, alpha=1.0), visualizer.overlay_attention(image, 2 * grid, alpha=1.0)
    )
    low, high = visualizer.row_value_range([torch.full((2, 2), 3.0)])
    assert low < 3.0 < high and high - low < 1e-4
