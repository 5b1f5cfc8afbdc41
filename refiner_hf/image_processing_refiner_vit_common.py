# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""What the two Refiner-ViT image processor backends share: defaults and checks, input loading, pixel conversions."""

import base64
import binascii
import io
import math
import os
import warnings
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers.image_utils import (
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
    infer_channel_dimension_format,
    load_image,
    make_flat_list_of_images,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import is_torch_available

from .configuration_refiner_vit import refuse_preset_name


if is_torch_available():
    import torch


class RefinerViTImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    crop_pct (`float`, *optional*, defaults to `self.crop_pct`):
        Ratio of the center crop to the resized image, as in timm's evaluation transform: the shorter side is resized
        to `floor(size / crop_pct)` before cropping `crop_size`. Values above 1 make the crop larger than the resized
        image, which is then zero-padded (black). `None` skips the scaling and resizes straight to `size`.
    """

    crop_pct: float | int | None


def get_refiner_vit_resize_output_size(height: int, width: int, size: SizeDict, crop_pct: float) -> tuple[int, int]:
    """
    Output `(height, width)` of timm's `transforms_imagenet_eval` resize (crop_mode="center") for an image of
    `(height, width)`, a target `size` and `crop_pct`.
    """
    if size.shortest_edge:
        target_height = target_width = size.shortest_edge
    elif size.height and size.width:
        target_height, target_width = size.height, size.width
    else:
        raise ValueError(f"`size` must contain 'shortest_edge' or 'height' and 'width', got {dict(size)}.")
    scale_height, scale_width = math.floor(target_height / crop_pct), math.floor(target_width / crop_pct)
    if scale_height == scale_width:
        # torchvision `Resize(int)`: shorter side to the scale size, longer side truncated
        if height <= width:
            return scale_height, int(scale_height * width / height)
        return int(scale_height * height / width), scale_height
    # timm `ResizeKeepRatio(longest=0)`: smallest aspect-preserving resize covering the target, sides rounded
    ratio = min(height / scale_height, width / scale_width)
    return round(height / ratio), round(width / ratio)


def load_refiner_vit_image(source: str, timeout: float | None = None) -> PIL.Image.Image:
    """Load a local file path, an http(s) URL or base64 image data into a fully decoded PIL image."""
    if source.startswith(("http://", "https://")):
        return load_image(source, timeout=timeout)
    if os.path.isfile(source):
        try:
            image = PIL.Image.open(source)
            # PIL decodes lazily; decoding now makes a truncated or corrupt file fail here, naming the file
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"Could not read image file {source!r}: {error}") from error
        return PIL.ImageOps.exif_transpose(image)
    payload = source.split(",", 1)[-1] if source.startswith("data:image/") else source
    try:
        image = PIL.Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        image.load()
    except (binascii.Error, OSError, SyntaxError, ValueError) as error:
        shown = source if len(source) <= 100 else source[:97] + "..."
        raise ValueError(
            f"Could not load an image from {shown!r}: no file exists at this path, and it is neither an http(s) URL "
            "nor base64-encoded image data."
        ) from error
    return PIL.ImageOps.exif_transpose(image)


def standardize_refiner_vit_images(images: Any) -> Any:
    """
    Check every image of a (nested) list and give `(H, W)` arrays a leading channel axis, raising a message that names
    the problem for empty inputs, unsupported types and arrays of the wrong rank or dtype.
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("No images were provided (got an empty list).")
        return [standardize_refiner_vit_images(image) for image in images]
    if isinstance(images, PIL.Image.Image):
        return images
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "biuf":
            raise TypeError(f"Image arrays must hold bool, integer or float values, got dtype {images.dtype}.")
    elif is_torch_available() and isinstance(images, torch.Tensor):
        if images.dtype.is_complex:
            raise TypeError(f"Image tensors must hold real values, got dtype {images.dtype}.")
    else:
        raise TypeError(
            f"Unsupported image input of type {type(images).__name__}: expected a PIL image, a numpy array, a torch "
            "tensor, a file path, an http(s) URL or a list of these."
        )
    if images.ndim not in (2, 3, 4):
        raise ValueError(
            "Expected an image array of shape (H, W), (C, H, W), (H, W, C) or a batch of those with 4 dimensions, got "
            f"shape {tuple(images.shape)}."
        )
    if 0 in images.shape:
        raise ValueError(f"Got an empty image array of shape {tuple(images.shape)}.")
    # transformers' flattening only accepts 3-D images and 4-D batches; a leading axis of 1 is read as channels-first
    return images[None] if images.ndim == 2 else images


def integer_pixels_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """
    The 8-bit values of an integer (or boolean) image: uint8 as it is, uint16 as a 16-bit image (0..65535 scaled to
    0..255 and rounded), booleans as black and white (PIL's mode "1" convention), and any other integer type as 8-bit
    values, which it must then hold: a value outside 0..255 there is an error rather than a guess at the range.
    """
    pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        return np.round(pixels.astype(np.float32) / 257).astype(np.uint8)  # 65535 / 255 = 257
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"An image of {pixels.dtype} values from {low} to {high}: integer images must hold 8-bit values (0 to "
            "255), or be uint16 for 16-bit ones (scaled from 0..65535). Convert it to uint8, uint16 or float first."
        )
    return pixels.astype(np.uint8)


def check_float_pixels(low: float, high: float, do_rescale: bool | None) -> None:
    """
    Refuses non-finite pixel values, and warns, as transformers' processors do, when an image about to be rescaled by
    1/255 already holds values in [0, 1].
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"An image with non-finite values (from {low} to {high}); pixel values must be finite.")
    if do_rescale and 0.0 <= low and high <= 1.0:
        warnings.warn(
            "It looks like you are trying to rescale already rescaled images: the float pixel values are in [0, 1] "
            "and `do_rescale=True` divides them by 255 again. If they are brightness in [0, 1], pass "
            "`do_rescale=False`; float images are read in the 0..255 range otherwise.",
            UserWarning,
            stacklevel=2,
        )


def pil_image_to_8_bits(image: PIL.Image.Image) -> PIL.Image.Image:
    """
    `image` with 8 bits per channel, its brightness kept: 16-bit images (modes "I;16*") scaled from 0..65535, 32-bit
    integer ones (mode "I") read as 8-bit values, which they must then hold, float ones (mode "F") read as brightness in
    [0, 1], which they must then hold. PIL's own conversion clips these (a 16-bit image turns white, a float one in
    [0, 1] black).
    """
    if image.mode.startswith("I"):
        return PIL.Image.fromarray(integer_pixels_to_uint8(np.asarray(image)), mode="L")
    if image.mode == "F":
        pixels = np.asarray(image)
        low, high = float(pixels.min()), float(pixels.max())
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 1:
            raise ValueError(
                f"A float image (PIL mode F) with values from {low} to {high}: float images are read as brightness in "
                "[0, 1]. Scale it to [0, 1], or convert it to 8 or 16 bits, first."
            )
        return PIL.Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L")
    return image


def exif_upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` turned as its EXIF orientation tag says (a copy without the tag), or `image` itself when it has none."""
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
        return PIL.ImageOps.exif_transpose(image)
    return image


def pil_image_to_refiner_vit_array(image: PIL.Image.Image, do_convert_rgb: bool | None) -> np.ndarray:
    """
    Decode a PIL image to an 8-bit `(H, W)` or `(H, W, C)` array, upright by its EXIF orientation, converting it to
    RGB when `do_convert_rgb`.
    """
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        name = getattr(image, "filename", "") or "<in-memory image>"
        raise ValueError(f"Could not decode image {name!r}: {error}") from error
    # Upright as a viewer shows it, and as the trainer's loader reads it (`training.data.decode_image`): a photo taken
    # with the camera turned stores its pixels sideways and says so in its EXIF orientation tag.
    image = exif_upright(image)
    image = pil_image_to_8_bits(image)
    if do_convert_rgb and image.mode != "RGB":
        # Same as the `Image.open(path).convert("RGB")` of timm's and torchvision's dataset loaders: alpha is dropped
        # rather than composited onto white, and palette/CMYK/grayscale images use PIL's own conversions.
        image = image.convert("RGB")
    return np.array(image)


def to_channels_first(image: Any, input_data_format: str | ChannelDimension | None) -> Any:
    """
    A numpy array or torch tensor of shape `(H, W)`, `(C, H, W)` or `(H, W, C)` (`input_data_format`, inferred when
    None, with 1, 3 or 4 channels) as `(C, H, W)`.
    """
    if image.ndim == 2:
        return image[None]
    if input_data_format is None:
        try:
            input_data_format = infer_channel_dimension_format(image, num_channels=(1, 3, 4))
        except ValueError:
            raise ValueError(
                f"Could not find the channel dimension of an image of shape {tuple(image.shape)}: expected 1, 3 "
                "or 4 channels in the first or last dimension."
            ) from None
    if input_data_format == ChannelDimension.LAST:
        return np.moveaxis(image, -1, 0) if isinstance(image, np.ndarray) else image.permute(2, 0, 1)
    return image


class RefinerViTImageProcessingMixin:
    """
    What both backends share: timm's evaluation-transform defaults (mean = std = 0.5, bicubic, `crop_pct`), the
    `crop_pct` check, and input loading and checking (paths decoded with PIL, clear errors for bad inputs).
    """

    valid_kwargs = RefinerViTImageProcessorKwargs
    # `save_pretrained` writes both backends' code (and what it imports) beside `preprocessor_config.json`, named in its
    # `auto_map` (see `to_dict`), so that a saved directory loads either backend with `trust_remote_code=True`.
    _auto_class = "AutoImageProcessor"

    resample = PILImageResampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"shortest_edge": 224}
    default_to_square = False
    crop_size = {"height": 224, "width": 224}
    crop_pct = 0.9
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`from_pretrained` of the backend, answering a preset name at once ([`refuse_preset_name`])."""
        refuse_preset_name(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def __init__(self, **kwargs: Unpack[RefinerViTImageProcessorKwargs]):
        super().__init__(**kwargs)
        # Checked here too, not only per call: a processor loaded from a damaged preprocessor_config.json says so.
        self._validate_settings(
            crop_pct=self.crop_pct,
            size=self.size,
            crop_size=self.crop_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
            rescale_factor=self.rescale_factor,
        )

    @staticmethod
    def _validate_settings(
        crop_pct: float | None = None,
        size: SizeDict | None = None,
        crop_size: SizeDict | None = None,
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
        rescale_factor: float | None = None,
        **kwargs,
    ) -> None:
        """Raises a `ValueError` naming the setting that no image could be processed with."""

        def numbers(value) -> list:
            return list(value) if isinstance(value, (list, tuple)) else [value]

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if crop_pct is not None and not (is_number(crop_pct) and crop_pct > 0):
            raise ValueError(f"`crop_pct` must be a positive number or None, got {crop_pct!r}.")
        for name, sizes in (("size", size), ("crop_size", crop_size)):
            given = {key: value for key, value in dict(sizes or {}).items() if value is not None}
            if any(not isinstance(value, int) or value <= 0 for value in given.values()):
                raise ValueError(f"`{name}` must hold positive whole numbers of pixels, got {given}.")
        if image_mean is not None and not all(is_number(value) for value in numbers(image_mean)):
            raise ValueError(f"`image_mean` must hold finite numbers, got {image_mean!r}.")
        if image_std is not None and not all(is_number(value) and value > 0 for value in numbers(image_std)):
            raise ValueError(
                f"`image_std` must hold positive finite numbers (normalizing divides by it), got {image_std!r}."
            )
        if rescale_factor is not None and not (is_number(rescale_factor) and rescale_factor > 0):
            raise ValueError(f"`rescale_factor` must be a positive finite number, got {rescale_factor!r}.")

    def _validate_preprocess_kwargs(self, crop_pct: float | None = None, **kwargs) -> None:
        self._validate_settings(crop_pct=crop_pct, **kwargs)
        super()._validate_preprocess_kwargs(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # Both backends, whichever one is saved (transformers would name only the saved one, and `backend="pil"` would
        # then silently load the torchvision processor).
        output["auto_map"] = {"AutoImageProcessor": image_processor_auto_map()}
        return output

    def fetch_images(self, image_url_or_urls: ImageInput | str | list) -> ImageInput:
        """Load file paths, URLs and base64 strings with PIL, leaving already-loaded images untouched."""
        # Decoding with PIL (instead of the base class' torchvision decoder) gives both backends, and the reference
        # pipeline, the same pixels, and lets corrupt files fail with their name in the message.
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, str):
            return load_refiner_vit_image(image_url_or_urls)
        # Anything else is checked by `standardize_refiner_vit_images`, which names the offending type
        return image_url_or_urls

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> ImageInput:
        images = standardize_refiner_vit_images(self.fetch_images(images))
        return make_flat_list_of_images(images, expected_ndims=expected_ndims)

    @staticmethod
    def _resize_size(height: int, width: int, size: SizeDict, crop_pct: float | None) -> SizeDict:
        """The size to resize a `(height, width)` image to: timm's evaluation resize with `crop_pct`, else `size`."""
        if crop_pct is None:
            return size
        new_height, new_width = get_refiner_vit_resize_output_size(height, width, size, crop_pct)
        return SizeDict(height=new_height, width=new_width)


def image_processor_auto_map() -> dict[str, str]:
    """The `auto_map` entry of `preprocessor_config.json`: each backend's class, in the files saved beside it."""
    # Imported here because those modules import this one. As relative imports they also have transformers'
    # remote-code loader fetch both backends' files with either, so that a directory re-saved where the package is not
    # installed still carries both backends.
    from .image_processing_pil_refiner_vit import RefinerViTImageProcessorPil
    from .image_processing_refiner_vit import RefinerViTImageProcessor

    return {
        backend: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
        for backend, cls in (("torchvision", RefinerViTImageProcessor), ("pil", RefinerViTImageProcessorPil))
    }


_ARGUMENTS_DOCSTRING = """    Args:
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Convert inputs to RGB. PIL images use `Image.convert("RGB")` (alpha is dropped); arrays with 1 channel are
            repeated, arrays with 4 channels are treated as RGBA and lose their alpha channel.
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize the image.
        size (`dict[str, int]`, *optional*, defaults to `{"shortest_edge": 224}`):
            Size before `crop_pct` scaling: the shorter side is resized to `floor(size["shortest_edge"] / crop_pct)`.
            `{"height": h, "width": w}` with `h != w` uses timm's aspect-preserving resize for non-square sizes.
        crop_pct (`float`, *optional*, defaults to 0.9):
            Ratio of the crop to the resized image. Passing `crop_pct=None` to the call resizes straight to `size`.
        resample (`PILImageResampling`, *optional*, defaults to `PILImageResampling.BICUBIC`):
            Resampling filter.
        do_center_crop (`bool`, *optional*, defaults to `True`):
            Whether to center-crop the image.
        crop_size (`dict[str, int]`, *optional*, defaults to `{"height": 224, "width": 224}`):
            Output size of the center crop.
        do_rescale (`bool`, *optional*, defaults to `True`):
            Whether to rescale pixel values by `rescale_factor`.
        rescale_factor (`float`, *optional*, defaults to `1/255`):
            Rescaling factor.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalize the image.
        image_mean (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Normalization mean.
        image_std (`list[float]`, *optional*, defaults to `[0.5, 0.5, 0.5]`):
            Normalization standard deviation.
"""


def refiner_vit_processor_docstring(backend: str) -> str:
    """The class docstring of a backend: what it computes and the arguments both backends share."""
    return f"""
    Constructs a Refiner-ViT image processor ({backend} backend) that reproduces timm's evaluation transform: resize the
    shorter side to `floor(size["shortest_edge"] / crop_pct)` (bicubic), center-crop `crop_size`, zero-padding like
    `torchvision.transforms.CenterCrop` where the crop is larger than the image, then rescale to [0, 1] and normalize.

{_ARGUMENTS_DOCSTRING}"""


__all__ = ["RefinerViTImageProcessingMixin", "RefinerViTImageProcessorKwargs"]
