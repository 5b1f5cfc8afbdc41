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
"""Image processor class for Refiner-ViT (torchvision backend), and the evaluation processor of a model."""

import numpy as np
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import group_images_by_shape, reorder_images
from transformers.image_utils import (
    ChannelDimension,
    ImageInput,
    ImageType,
    PILImageResampling,
    SizeDict,
    get_image_type,
)
from transformers.processing_utils import Unpack
from transformers.utils import TensorType, is_torch_available, is_torchvision_available

from .configuration_refiner_vit import PRESETS, RefinerViTConfig
from .image_processing_refiner_vit_common import (
    RefinerViTImageProcessingMixin,
    RefinerViTImageProcessorKwargs,
    check_float_pixels,
    integer_pixels_to_uint8,
    pil_image_to_refiner_vit_array,
    refiner_vit_processor_docstring,
    to_channels_first,
)


if is_torch_available():
    import torch

if is_torchvision_available():
    from torchvision.transforms.v2 import functional as tvF


class RefinerViTImageProcessor(RefinerViTImageProcessingMixin, TorchvisionBackend):
    __doc__ = refiner_vit_processor_docstring("torchvision")

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        device: "torch.device | None" = None,
        **kwargs: Unpack[RefinerViTImageProcessorKwargs],
    ) -> "torch.Tensor":
        """Convert one PIL image, array or tensor to a channels-first tensor (RGB when `do_convert_rgb`)."""
        image_type = get_image_type(image)
        if image_type == ImageType.PIL:
            image = torch.from_numpy(pil_image_to_refiner_vit_array(image, do_convert_rgb))
            input_data_format = ChannelDimension.LAST
        elif image_type == ImageType.NUMPY:
            if image.dtype.kind in "biu":
                image = integer_pixels_to_uint8(image)
            image = np.ascontiguousarray(image)
            # torch cannot wrap read-only buffers (e.g. `np.asarray(pil_image)`) without copying
            image = torch.from_numpy(image if image.flags.writeable else image.copy())
        elif not (image.dtype.is_floating_point or image.dtype == torch.uint8):
            image = torch.from_numpy(integer_pixels_to_uint8(image.cpu().numpy())).to(image.device)
        if image.dtype.is_floating_point:
            check_float_pixels(image.min().item(), image.max().item(), kwargs.get("do_rescale"))

        image = to_channels_first(image, input_data_format)
        if do_convert_rgb:
            image = self.convert_to_rgb(image, input_data_format=ChannelDimension.FIRST)

        image = image.contiguous()
        if device is not None:
            image = image.to(device)
        return image

    def convert_to_rgb(
        self, image: "torch.Tensor", input_data_format: str | ChannelDimension | None = None
    ) -> "torch.Tensor":
        """Convert a channels-first 1-, 3- or 4-channel tensor to RGB."""
        # The base class composites RGBA onto white; dropping alpha instead keeps arrays consistent with PIL inputs.
        if input_data_format == ChannelDimension.LAST:
            image = image.movedim(-1, -3)
        num_channels = image.shape[-3]
        if num_channels == 1:
            image = image.expand(*image.shape[:-3], 3, *image.shape[-2:])
        elif num_channels == 4:
            image = image[..., :3, :, :]
        elif num_channels != 3:
            raise ValueError(f"Cannot convert an image with {num_channels} channels to RGB.")
        if input_data_format == ChannelDimension.LAST:
            image = image.movedim(-3, -1)
        return image

    def resize(
        self,
        image: "torch.Tensor",
        size: SizeDict,
        resample: "PILImageResampling | tvF.InterpolationMode | int | None" = None,
        crop_pct: float | None = None,
        **kwargs,
    ) -> "torch.Tensor":
        """Resize so that the `crop_pct` center crop of the result has size `size` (timm evaluation resize)."""
        size = self._resize_size(*image.shape[-2:], size, crop_pct)
        return super().resize(image, size=size, resample=resample, **kwargs)

    def center_crop(self, image: "torch.Tensor", size: SizeDict, **kwargs) -> "torch.Tensor":
        """Center crop exactly like `torchvision.transforms.CenterCrop`, zero-padding images smaller than the crop."""
        if size.height is None or size.width is None:
            raise ValueError(f"The size dictionary must have keys 'height' and 'width', got {dict(size)}.")
        # The base class truncates the crop offset where torchvision (and so timm) rounds half to even, which shifts
        # some crops by one pixel (e.g. 595 -> 448 starts at 74 in torchvision, 73 in the base class).
        return tvF.center_crop(image, [size.height, size.width])

    def _preprocess(
        self,
        images: list["torch.Tensor"],
        do_resize: bool,
        size: SizeDict,
        resample: "PILImageResampling | tvF.InterpolationMode | int | None",
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float] | None,
        image_std: float | list[float] | None,
        do_pad: bool | None,
        pad_size: SizeDict | None,
        disable_grouping: bool | None,
        return_tensors: str | TensorType | None,
        crop_pct: float | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Resize with `crop_pct`, center-crop, rescale and normalize."""
        grouped_images, grouped_images_index = group_images_by_shape(images, disable_grouping=disable_grouping)
        resized_images_grouped = {}
        for shape, stacked_images in grouped_images.items():
            if do_resize:
                stacked_images = self.resize(stacked_images, size, resample, crop_pct=crop_pct)
            resized_images_grouped[shape] = stacked_images
        resized_images = reorder_images(resized_images_grouped, grouped_images_index)

        grouped_images, grouped_images_index = group_images_by_shape(resized_images, disable_grouping=disable_grouping)
        processed_images_grouped = {}
        for shape, stacked_images in grouped_images.items():
            if do_center_crop:
                stacked_images = self.center_crop(stacked_images, crop_size)
            # Padding happens before normalization, so padded pixels are black like timm's (-1.0 with mean=std=0.5)
            stacked_images = self.rescale_and_normalize(
                stacked_images, do_rescale, rescale_factor, do_normalize, image_mean, image_std
            )
            processed_images_grouped[shape] = stacked_images
        processed_images = reorder_images(processed_images_grouped, grouped_images_index)

        if do_pad:
            processed_images = self.pad(processed_images, pad_size=pad_size, disable_grouping=disable_grouping)

        return BatchFeature(data={"pixel_values": processed_images}, tensor_type=return_tensors)


def default_crop_pct(config: RefinerViTConfig) -> float:
    """
    The evaluation `crop_pct` of the released code for the architecture `config` has (S 0.9, M 1.0, L 1.13, at any
    resolution); 0.9 for other architectures.
    """
    architecture = config.matching_architecture()
    return PRESETS[architecture].crop_pct if architecture else 0.9


def image_processor_for_config(config: RefinerViTConfig, crop_pct: float | None = None) -> RefinerViTImageProcessor:
    """
    The evaluation image processor of a model: crops `config.image_size` after resizing the shorter side to
    `image_size / crop_pct`, with the released `crop_pct` of its architecture ([`default_crop_pct`]) unless one is
    given.
    """
    size = config.image_size
    return RefinerViTImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        crop_pct=default_crop_pct(config) if crop_pct is None else crop_pct,
    )


__all__ = ["RefinerViTImageProcessor", "default_crop_pct", "image_processor_for_config"]
