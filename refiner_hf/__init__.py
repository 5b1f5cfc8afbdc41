"""Refiner-ViT for Hugging Face `transformers`: configuration, models, image processors and checkpoint conversion.

Importing the package registers the model type `"refiner-vit"` with `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification` and `AutoImageProcessor`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .configuration_refiner_vit import RefinerViTConfig
from .conversion import CheckpointError, convert_original_checkpoint, load_original_weights
from .image_processing_pil_refiner_vit import RefinerViTImageProcessorPil
from .image_processing_refiner_vit import RefinerViTImageProcessor
from .modeling_refiner_vit import (
    RefinerViTForImageClassification,
    RefinerViTImageClassifierOutput,
    RefinerViTModel,
    RefinerViTModelOutput,
    RefinerViTPreTrainedModel,
)


__version__ = "0.1.0"

AutoConfig.register(RefinerViTConfig.model_type, RefinerViTConfig, exist_ok=True)
AutoModel.register(RefinerViTConfig, RefinerViTModel, exist_ok=True)
AutoModelForImageClassification.register(RefinerViTConfig, RefinerViTForImageClassification, exist_ok=True)
AutoImageProcessor.register(
    RefinerViTConfig,
    image_processor_classes={"torchvision": RefinerViTImageProcessor, "pil": RefinerViTImageProcessorPil},
    exist_ok=True,
)

__all__ = [
    "CheckpointError",
    "RefinerViTConfig",
    "RefinerViTForImageClassification",
    "RefinerViTImageClassifierOutput",
    "RefinerViTImageProcessor",
    "RefinerViTImageProcessorPil",
    "RefinerViTModel",
    "RefinerViTModelOutput",
    "RefinerViTPreTrainedModel",
    "convert_original_checkpoint",
    "load_original_weights",
]
