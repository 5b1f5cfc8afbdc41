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
"""Image processor class for Refiner-ViT (PIL backend)."""

import numpy as np
import PIL.Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    ChannelDimension,
    ImageInput,
    ImageType,
    PILImageResampling,
    SizeDict,
    get_image_type,
)
from transformers.processing_utils import Unpack
from transformers.utils import TensorType

from .image_processing_refiner_vit_common import (
    RefinerViTImageProcessingMixin,
    RefinerViTImageProcessorKwargs,
    check_float_pixels,
    integer_pixels_to_uint8,
    pil_image_to_refiner_vit_array,
    refiner_vit_processor_docstring,
    to_channels_first,
)


class RefinerViTImageProcessorPil(RefinerViTImageProcessingMixin, PilBackend):
    __doc__ = refiner_vit_processor_docstring("PIL")

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        **kwargs: Unpack[RefinerViTImageProcessorKwargs],
    ) -> np.ndarray:
        """Convert one PIL image, array or tensor to a channels-first array (RGB when `do_convert_rgb`)."""
        image_type = get_image_type(image)
        if image_type == ImageType.PIL:
            image = pil_image_to_refiner_vit_array(image, do_convert_rgb)
            input_data_format = ChannelDimension.LAST
        elif image_type == ImageType.TORCH:
            image = image.detach().cpu().numpy()
        if image.dtype.kind in "biu":
            image = integer_pixels_to_uint8(image)
        else:
            check_float_pixels(float(image.min()), float(image.max()), kwargs.get("do_rescale"))

        image = to_channels_first(image, input_data_format)
        if do_convert_rgb:
            image = self.convert_to_rgb(image, input_data_format=ChannelDimension.FIRST)
        return np.ascontiguousarray(image)

    def convert_to_rgb(self, image: np.ndarray, input_data_format: str | ChannelDimension | None = None) -> np.ndarray:
        """Convert a channels-first 1-, 3- or 4-channel array to RGB."""
        # The base class composites RGBA onto white; dropping alpha instead keeps arrays consistent with PIL inputs.
        channel_axis = -1 if input_data_format == ChannelDimension.LAST else -3
        num_channels = image.shape[channel_axis]
        if num_channels == 1:
            image = np.repeat(image, 3, axis=channel_axis)
        elif num_channels == 4:
            image = np.take(image, [0, 1, 2], axis=channel_axis)
        elif num_channels != 3:
            raise ValueError(f"Cannot convert an image with {num_channels} channels to RGB.")
        return image

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: "PILImageResampling | None" = None,
        crop_pct: float | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Resize so that the `crop_pct` center crop of the result has size `size` (timm evaluation resize)."""
        size = self._resize_size(*image.shape[-2:], size, crop_pct)
        if image.dtype.kind == "f":
            # Float images are resampled as floats, channel by channel in PIL's mode "F" (the base class would round
            # them to 8 bits and clip the overshoot), as the torchvision backend does with float tensors.
            resample = PILImageResampling.BICUBIC if resample is None else resample
            channels = [
                PIL.Image.fromarray(channel.astype(np.float32), mode="F").resize((size.width, size.height), resample)
                for channel in image
            ]
            return np.stack([np.asarray(channel) for channel in channels])
        return super().resize(image, size=size, resample=resample, **kwargs)

    def center_crop(self, image: np.ndarray, size: SizeDict, **kwargs) -> np.ndarray:
        """Center crop exactly like `torchvision.transforms.CenterCrop`, zero-padding images smaller than the crop."""
        if size.height is None or size.width is None:
            raise ValueError(f"The size dictionary must have keys 'height' and 'width', got {dict(size)}.")
        crop_height, crop_width = size.height, size.width
        height, width = image.shape[-2:]
        # The base class puts the odd padding pixel before the image and truncates the crop offset; torchvision (and
        # so timm) puts it after and rounds the offset half to even, so both would shift some crops by one pixel.
        if crop_height > height or crop_width > width:
            pad_height, pad_width = max(crop_height - height, 0), max(crop_width - width, 0)
            padding = ((0, 0), (pad_height // 2, (pad_height + 1) // 2), (pad_width // 2, (pad_width + 1) // 2))
            image = np.pad(image, padding, mode="constant", constant_values=0)
            height, width = image.shape[-2:]
        top = int(round((height - crop_height) / 2.0))
        left = int(round((width - crop_width) / 2.0))
        return image[..., top : top + crop_height, left : left + crop_width]

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: "PILImageResampling | None",
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        do_pad: bool | None,
        pad_size: SizeDict | None,
        return_tensors: str | TensorType | None,
        crop_pct: float | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Resize with `crop_pct`, center-crop, rescale and normalize."""
        processed_images = []
        for image in images:
            if do_resize:
                image = self.resize(image, size, resample, crop_pct=crop_pct)
            # Padding happens before normalization, so padded pixels are black like timm's (-1.0 with mean=std=0.5)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed_images.append(image)

        if do_pad:
            processed_images = self.pad(processed_images, pad_size=pad_size)

        return BatchFeature(data={"pixel_values": processed_images}, tensor_type=return_tensors)


__all__ = ["RefinerViTImageProcessorPil"]
