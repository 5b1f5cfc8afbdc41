"""Tests for the Refiner-ViT image processors (torchvision and PIL backends) against timm's evaluation transform."""

import base64
import io
import json

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import create_transform
from transformers.image_utils import SizeDict

from refiner_hf.image_processing_pil_refiner_vit import RefinerViTImageProcessorPil
from refiner_hf.image_processing_refiner_vit import RefinerViTImageProcessor
from refiner_hf.image_processing_refiner_vit_common import get_refiner_vit_resize_output_size


BACKENDS = [RefinerViTImageProcessor, RefinerViTImageProcessorPil]
# (crop size S, crop_pct P): Refiner-ViT defaults, no-margin crop, the 448 model (crop larger than the resized image),
# and two other sizes.
SIZES = [(224, 0.9), (224, 1.0), (448, 1.13), (384, 1.0), (160, 0.875)]

# One uint8 level in [0, 255] is 1/255 in [0, 1] pixel units, i.e. 2/255 after normalising with std 0.5.
ONE_LEVEL = 2 / 255
EPS = 1e-6  # float32 rounding between the two normalisation code paths


def _images() -> dict[str, Image.Image]:
    chelsea = skimage.data.chelsea()  # 300x451, landscape
    return {
        "chelsea": Image.fromarray(chelsea),
        "astronaut": Image.fromarray(skimage.data.astronaut()),  # 512x512
        "chelsea_portrait": Image.fromarray(np.ascontiguousarray(chelsea.transpose(1, 0, 2))),  # 451x300
    }


IMAGES = _images()


def _timm_transform(size: int | tuple[int, int], crop_pct: float):
    input_size = (3, size, size) if isinstance(size, int) else (3, *size)
    return create_transform(
        input_size=input_size,
        is_training=False,
        interpolation="bicubic",
        crop_pct=crop_pct,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


def _processor(cls, size: int, crop_pct: float | None, **kwargs):
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, crop_pct=crop_pct, **kwargs)


def _pixels(processor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


def test_defaults():
    for cls in BACKENDS:
        processor = cls()
        assert processor.size == SizeDict(shortest_edge=224)
        assert processor.crop_size == SizeDict(height=224, width=224)
        assert processor.crop_pct == 0.9
        assert tuple(processor.image_mean) == (0.5, 0.5, 0.5)
        assert tuple(processor.image_std) == (0.5, 0.5, 0.5)
        assert processor.rescale_factor == pytest.approx(1 / 255)
        assert processor.resample == Image.Resampling.BICUBIC
        assert processor.do_convert_rgb is True
        assert _pixels(processor, IMAGES["chelsea"]).shape == (1, 3, 224, 224)


@pytest.mark.parametrize(
    ("height", "width", "size", "crop_pct", "expected"),
    [
        (300, 451, 224, 0.9, (248, 372)),  # floor(224 / 0.9) = 248; 248 * 451 / 300 = 372.8 truncated
        (451, 300, 224, 0.9, (372, 248)),
        (300, 451, 448, 1.13, (396, 595)),  # floor(448 / 1.13) = 396
        (512, 512, 224, 0.875, (256, 256)),
    ],
)
def test_resize_output_size(height, width, size, crop_pct, expected):
    assert get_refiner_vit_resize_output_size(height, width, SizeDict(shortest_edge=size), crop_pct) == expected


@pytest.mark.parametrize(("size", "crop_pct"), SIZES)
def test_pil_backend_matches_timm(size, crop_pct):
    processor = _processor(RefinerViTImageProcessorPil, size, crop_pct)
    transform = _timm_transform(size, crop_pct)
    for name, image in IMAGES.items():
        expected = transform(image)
        actual = _pixels(processor, image)[0]
        assert actual.shape == expected.shape == (3, size, size), name
        # Both resize with PIL, so at most one uint8 level (1/255 in [0, 1] units, 2/255 normalised) may differ;
        # in practice they are identical.
        assert (actual - expected).abs().max().item() <= ONE_LEVEL + EPS, name


@pytest.mark.parametrize(("size", "crop_pct"), SIZES)
def test_torchvision_backend_matches_timm(size, crop_pct):
    processor = _processor(RefinerViTImageProcessor, size, crop_pct)
    transform = _timm_transform(size, crop_pct)
    for name, image in IMAGES.items():
        expected = transform(image)
        actual = _pixels(processor, image)[0]
        assert actual.shape == expected.shape == (3, size, size), name
        difference = (actual - expected).abs()
        # Tensor bicubic antialiased resizing (torch's uint8 CPU kernel) vs PIL's: measured max 2 uint8 levels
        # (4/255 = 0.0157 normalised) on chelsea at 448/1.13 and astronaut at 384/1.0, 1 level elsewhere; measured
        # mean <= 6e-5, with under 1% of values differing at all.
        assert difference.max().item() <= 2 * ONE_LEVEL + EPS, name
        assert difference.mean().item() < 1e-3, name


@pytest.mark.parametrize("cls", BACKENDS)
def test_non_square_size_matches_timm(cls):
    # timm keeps the aspect ratio and covers (floor(h / pct), floor(w / pct)) for a non-square input size
    processor = cls(size={"height": 192, "width": 256}, crop_size={"height": 192, "width": 256}, crop_pct=0.9)
    transform = _timm_transform((192, 256), 0.9)
    for name, image in IMAGES.items():
        expected = transform(image)
        actual = _pixels(processor, image)[0]
        assert actual.shape == expected.shape == (3, 192, 256), name
        assert (actual - expected).abs().max().item() <= 2 * ONE_LEVEL + EPS, name


@pytest.mark.parametrize("cls", BACKENDS)
def test_crop_pct_above_one_pads_black_like_timm(cls):
    processor = _processor(cls, 448, 1.13)
    transform = _timm_transform(448, 1.13)
    # The shorter side becomes floor(448 / 1.13) = 396, so 52 rows (landscape) or columns (portrait) are padded,
    # 26 on each side, as torchvision's CenterCrop does.
    pad = (448 - 396) // 2
    for name, image in [("chelsea", IMAGES["chelsea"]), ("chelsea_portrait", IMAGES["chelsea_portrait"])]:
        actual = _pixels(processor, image)[0]
        expected = transform(image)
        if name == "chelsea_portrait":
            actual, expected = actual.transpose(1, 2), expected.transpose(1, 2)
        border = torch.cat([actual[:, :pad], actual[:, -pad:]], dim=1)
        assert torch.equal(border, torch.full_like(border, -1.0)), name
        assert torch.equal(torch.cat([expected[:, :pad], expected[:, -pad:]], dim=1), border), name
        # The first and last image rows are real content, not padding
        assert (actual[:, pad] > -1.0).any() and (actual[:, -pad - 1] > -1.0).any(), name
        assert (expected[:, pad:-pad] - actual[:, pad:-pad]).abs().max().item() <= 2 * ONE_LEVEL + EPS, name


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize(
    ("height", "width", "crop_height", "crop_width"),
    [
        (595, 396, 448, 448),  # odd crop margin 147: torchvision starts at round(73.5) = 74
        (7, 10, 4, 5),  # odd margins 3 and 5
        (5, 9, 8, 4),  # pad height by 3 (1 above, 2 below), crop width
        (6, 6, 9, 11),  # pad both
        (8, 8, 8, 8),
    ],
)
def test_center_crop_matches_torchvision(cls, height, width, crop_height, crop_width):
    image = torch.from_numpy(np.random.default_rng(0).integers(1, 256, (3, height, width), dtype=np.uint8))
    expected = TF.center_crop(image, [crop_height, crop_width])
    crop_size = SizeDict(height=crop_height, width=crop_width)
    processor = cls()
    if cls is RefinerViTImageProcessorPil:
        actual = torch.from_numpy(processor.center_crop(image.numpy(), crop_size))
    else:
        actual = processor.center_crop(image[None], crop_size)[0]
    assert torch.equal(actual, expected)


def test_crop_pct_per_call_and_none():
    image = IMAGES["chelsea"]
    for cls in BACKENDS:
        default = cls()
        per_call = _pixels(default, image, crop_pct=1.0)
        assert torch.equal(per_call, _pixels(cls(crop_pct=1.0), image))
        assert not torch.equal(per_call, _pixels(default, image))
        assert torch.equal(_pixels(default, image, crop_pct=1), per_call)  # integers are accepted
        # None skips the crop_pct scaling, which for a shortest-edge size equals crop_pct=1
        assert torch.equal(_pixels(default, image, crop_pct=None), per_call)


def _rgba_image() -> Image.Image:
    rgb = skimage.data.astronaut()[::4, ::4]
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1], dtype=np.uint8), (rgb.shape[0], 1))
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")


def _mode_images() -> dict[str, Image.Image]:
    base = Image.fromarray(skimage.data.astronaut()[::4, ::4])
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0  # PIL ignores this when converting to RGB; it must not whiten pixels
    return {
        "L": base.convert("L"),
        "RGBA": _rgba_image(),
        "CMYK": base.convert("CMYK"),
        "P": palette,
        "LA": _rgba_image().convert("LA"),
        "1": base.convert("1"),
    }


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1"])
def test_pil_modes_convert_like_pil(cls, mode):
    image = _mode_images()[mode]
    assert image.mode == mode
    processor = cls()
    actual = _pixels(processor, image)
    assert actual.shape == (1, 3, 224, 224)
    assert torch.equal(actual, _pixels(processor, image.convert("RGB")))


@pytest.mark.parametrize("cls", BACKENDS)
def test_arrays_convert_like_pil(cls):
    processor = cls()
    gray = np.array(_mode_images()["L"])
    rgba = np.array(_rgba_image())
    expected_gray = _pixels(processor, Image.fromarray(gray).convert("RGB"))
    expected_rgba = _pixels(processor, Image.fromarray(rgba).convert("RGB"))  # alpha dropped
    assert torch.equal(_pixels(processor, gray), expected_gray)  # (H, W)
    assert torch.equal(_pixels(processor, gray[..., None]), expected_gray)  # (H, W, 1)
    assert torch.equal(_pixels(processor, torch.from_numpy(gray)[None]), expected_gray)  # (1, H, W) tensor
    assert torch.equal(_pixels(processor, rgba), expected_rgba)  # (H, W, 4)
    assert torch.equal(_pixels(processor, torch.from_numpy(rgba).permute(2, 0, 1)), expected_rgba)  # (4, H, W)
    rgb = skimage.data.chelsea()
    assert torch.equal(_pixels(processor, rgb), _pixels(processor, Image.fromarray(rgb)))


def _saved_and_reopened(image: Image.Image, format: str) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    buffer.seek(0)
    return Image.open(buffer)


def _deep_images() -> dict[str, tuple[object, Image.Image]]:
    """Images of more than 8 bits per channel, with the 8-bit image each must read as."""
    gray = np.array(_mode_images()["L"])
    rgb = skimage.data.astronaut()[::4, ::4]
    return {
        "16-bit PNG": (
            _saved_and_reopened(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
            Image.fromarray(gray),
        ),
        "16-bit big-endian": (Image.fromarray(gray.astype(">u2") * 257), Image.fromarray(gray)),
        "32-bit integer image, 8-bit values": (Image.fromarray(gray.astype(np.int32)), Image.fromarray(gray)),
        "float TIFF in [0, 1]": (
            _saved_and_reopened(Image.fromarray(gray.astype(np.float32) / 255, mode="F"), "TIFF"),
            Image.fromarray(gray),
        ),
        "uint16 array": (rgb.astype(np.uint16) * 257, Image.fromarray(rgb)),
        "uint16 tensor": (torch.from_numpy(rgb.astype(np.int32) * 257).to(torch.uint16), Image.fromarray(rgb)),
        "int64 array, 8-bit values": (rgb.astype(np.int64), Image.fromarray(rgb)),
        "int16 tensor, 8-bit values": (torch.from_numpy(rgb.astype(np.int16)), Image.fromarray(rgb)),
    }


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize("kind", list(_deep_images()))
def test_deep_images_keep_their_brightness(cls, kind):
    image, expected = _deep_images()[kind]
    processor = cls()
    # A 16-bit image used to come out white and a [0, 1] float one black; each now reads as its 8-bit image.
    assert torch.equal(_pixels(processor, image), _pixels(processor, expected.convert("RGB")))


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((8, 8, 3), 300, dtype=np.int32), r"int32 values from 300 to 300: integer images must hold 8-bit"),
        (torch.full((3, 8, 8), -1, dtype=torch.int16), r"int16 values from -1 to -1"),
        (Image.fromarray(np.full((8, 8), 1000, dtype=np.int32)), r"int32 values from 1000 to 1000"),
        (Image.fromarray(np.full((8, 8), 255.0, dtype=np.float32), mode="F"), r"mode F\) with values from 255.0"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), r"non-finite values"),
        (torch.full((3, 8, 8), float("inf")), r"non-finite values"),
    ],
)
def test_pixel_values_of_unknown_range_are_refused(cls, image, message):
    with pytest.raises(ValueError, match=message):
        cls()(image, return_tensors="pt")


@pytest.mark.parametrize("cls", BACKENDS)
def test_float_images_in_unit_range_warn_and_read_right_without_rescaling(cls):
    rgb = skimage.data.astronaut()[::4, ::4]
    unit = rgb.astype(np.float32) / 255
    processor = cls()
    expected = _pixels(processor, rgb.astype(np.float32))
    for image in (unit, torch.from_numpy(unit).permute(2, 0, 1)):
        with pytest.warns(UserWarning, match="already rescaled images.*pass `do_rescale=False`"):
            wrong = _pixels(processor, image)
        assert wrong.max() < -0.98  # divided by 255 twice: nearly black, as the warning says
        torch.testing.assert_close(_pixels(processor, image, do_rescale=False), expected, atol=1e-5, rtol=0)


def test_both_backends_agree_on_float_images():
    rng = np.random.default_rng(0)
    for shape in ((40, 48, 3), (20, 24, 3), (50, 30)):
        image = rng.uniform(0, 255, shape).astype(np.float32)
        for crop_pct in (0.9, 1.2):
            torchvision_pixels, pil_pixels = (
                _pixels(_processor(cls, 32, crop_pct), image)
                for cls in (RefinerViTImageProcessor, RefinerViTImageProcessorPil)
            )
            # Both resample floats as floats (no rounding to 8 bits, no clipping of the bicubic overshoot)
            torch.testing.assert_close(torchvision_pixels, pil_pixels, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls", BACKENDS)
def test_batch_equals_single_images(cls):
    processor = cls()
    images = list(IMAGES.values())
    batch = _pixels(processor, images)
    assert batch.shape == (3, 3, 224, 224)
    for index, image in enumerate(images):
        assert torch.equal(batch[index], _pixels(processor, image)[0])


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        ("not an image", ValueError, r"Could not load an image from 'not an image': no file exists"),
        ("/nonexistent/cat.jpg", ValueError, r"Could not load an image from '/nonexistent/cat.jpg'"),
        ({"pixel_values": 1}, TypeError, r"Unsupported image input of type dict"),
        (3, TypeError, r"Unsupported image input of type int"),
        (None, TypeError, r"Unsupported image input of type NoneType"),
        ([Image.new("RGB", (8, 8)), 1.5], TypeError, r"Unsupported image input of type float"),
        ([], ValueError, r"No images were provided"),
        (torch.zeros(5), ValueError, r"got shape \(5,\)"),
        (torch.zeros(1, 1, 3, 8, 8), ValueError, r"got shape \(1, 1, 3, 8, 8\)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), ValueError, r"empty image array of shape \(0, 8, 3\)"),
        (np.zeros((8, 8, 2), dtype=np.uint8), ValueError, r"channel dimension of an image of shape \(8, 8, 2\)"),
        (np.full((8, 8), "a"), TypeError, r"must hold bool, integer or float values, got dtype <U1"),
        (torch.zeros(3, 8, 8, dtype=torch.complex64), TypeError, r"must hold real values"),
    ],
)
def test_bad_inputs_raise_clearly(cls, images, error, message):
    with pytest.raises(error, match=message):
        cls()(images, return_tensors="pt")


@pytest.mark.parametrize("cls", BACKENDS)
def test_bad_crop_pct_raises(cls):
    with pytest.raises(ValueError, match=r"`crop_pct` must be a positive number or None, got 0"):
        cls(crop_pct=0)
    with pytest.raises(ValueError, match=r"`crop_pct` must be a positive number or None, got -1.0"):
        cls()(IMAGES["chelsea"], crop_pct=-1.0)


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_std", [0.5, 0.0, 0.5], r"`image_std` must hold positive finite numbers .*0.5, 0.0, 0.5"),
        ("image_mean", [0.5, float("nan"), 0.5], r"`image_mean` must hold finite numbers"),
        ("crop_size", {"height": -224, "width": 224}, r"`crop_size` must hold positive whole numbers of pixels"),
        ("size", {"shortest_edge": 0}, r"`size` must hold positive whole numbers of pixels"),
        ("rescale_factor", float("inf"), r"`rescale_factor` must be a positive finite number"),
        ("crop_pct", float("nan"), r"`crop_pct` must be a positive number or None, got nan"),
    ],
)
def test_settings_no_image_can_use_are_refused_when_loaded_and_per_call(cls, tmp_path, field, value, message):
    cls().save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        cls.from_pretrained(tmp_path)
    if field not in ("size", "crop_size"):  # sizes given per call are converted by transformers first
        with pytest.raises(ValueError, match=message):
            cls()(IMAGES["chelsea"], **{field: value})


@pytest.mark.parametrize("cls", BACKENDS)
def test_files_and_base64(cls, tmp_path):
    image = IMAGES["chelsea"]
    processor = cls()
    expected = _pixels(processor, image)

    png = tmp_path / "chelsea.png"
    image.save(png)
    assert torch.equal(_pixels(processor, str(png)), expected)
    assert torch.equal(_pixels(processor, [str(png), image])[1], expected[0])
    encoded = base64.b64encode(png.read_bytes()).decode()
    assert torch.equal(_pixels(processor, encoded), expected)
    assert torch.equal(_pixels(processor, "data:image/png;base64," + encoded), expected)

    # Paths are decoded with PIL in both backends, so a JPEG gives the same pixels as opening it yourself
    jpeg = tmp_path / "chelsea.jpg"
    image.save(jpeg, quality=90)
    assert torch.equal(_pixels(processor, str(jpeg)), _pixels(processor, Image.open(jpeg).convert("RGB")))


@pytest.mark.parametrize("cls", BACKENDS)
def test_corrupt_files_raise_naming_the_file(cls, tmp_path):
    buffer = io.BytesIO()
    IMAGES["chelsea"].save(buffer, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("plain text")
    processor = cls()
    with pytest.raises(ValueError, match=r"Could not read image file '.*truncated\.jpg': image file is truncated"):
        processor(str(truncated))
    with pytest.raises(ValueError, match=r"Could not read image file '.*notes\.png': cannot identify image file"):
        processor(str(not_an_image))
    # A lazily opened PIL image fails the same way once decoded
    with pytest.raises(ValueError, match=r"Could not decode image '.*truncated\.jpg'"):
        processor(Image.open(truncated))


@pytest.mark.parametrize("cls", BACKENDS)
def test_save_and_load_round_trip(cls, tmp_path):
    processor = cls(
        size={"shortest_edge": 448}, crop_size={"height": 448, "width": 448}, crop_pct=1.13, image_mean=[0.4, 0.5, 0.6]
    )
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["crop_pct"] == 1.13
    assert config["size"] == {"shortest_edge": 448}
    assert config["crop_size"] == {"height": 448, "width": 448}
    assert config["image_mean"] == [0.4, 0.5, 0.6]
    assert config["image_std"] == [0.5, 0.5, 0.5]
    assert config["image_processor_type"] == "RefinerViTImageProcessor"

    for loader in BACKENDS:
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, loader)
        assert loaded.crop_pct == 1.13
        assert loaded.size == SizeDict(shortest_edge=448)
        assert loaded.crop_size == SizeDict(height=448, width=448)
        assert tuple(loaded.image_mean) == (0.4, 0.5, 0.6)
        assert tuple(loaded.image_std) == (0.5, 0.5, 0.5)
        if loader is cls:
            assert torch.equal(_pixels(loaded, IMAGES["chelsea"]), _pixels(processor, IMAGES["chelsea"]))
