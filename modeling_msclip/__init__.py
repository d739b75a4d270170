"""MS-CLIP for Hugging Face Transformers.

Importing this package registers the MS-CLIP classes with transformers' Auto classes, so ``AutoConfig``,
``AutoModel``, ``AutoModelForZeroShotImageClassification``, ``AutoModelForImageClassification`` and
``AutoProcessor`` resolve saved MS-CLIP folders without ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    AutoTokenizer,
)

from .configuration_msclip import (
    MSClipConfig,
    MSClipObjectiveConfig,
    MSClipTextConfig,
    MSClipVisionConfig,
    available_presets,
)
from .image_processing_msclip import MSClipImageProcessor
from .modeling_msclip import (
    MSClipForImageClassification,
    MSClipForPreTraining,
    MSClipModel,
    MSClipOutput,
    MSClipPreTrainedModel,
    MSClipPreTrainingOutput,
)
from .processing_msclip import MSClipProcessor, build_msclip_processor
from .tokenization_msclip import MSClipTokenizer, build_msclip_tokenizer, train_msclip_tokenizer

AutoConfig.register(MSClipConfig.model_type, MSClipConfig, exist_ok=True)
AutoModel.register(MSClipConfig, MSClipModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(MSClipConfig, MSClipModel, exist_ok=True)
AutoModelForImageClassification.register(MSClipConfig, MSClipForImageClassification, exist_ok=True)
AutoModelForPreTraining.register(MSClipConfig, MSClipForPreTraining, exist_ok=True)
AutoTokenizer.register(MSClipConfig, tokenizer_class=MSClipTokenizer, exist_ok=True)
AutoImageProcessor.register(MSClipConfig, image_processor_classes={"pil": MSClipImageProcessor}, exist_ok=True)
AutoProcessor.register(MSClipConfig, MSClipProcessor, exist_ok=True)

__all__ = [
    "MSClipConfig",
    "MSClipObjectiveConfig",
    "MSClipForImageClassification",
    "MSClipForPreTraining",
    "MSClipImageProcessor",
    "MSClipModel",
    "MSClipOutput",
    "MSClipPreTrainedModel",
    "MSClipPreTrainingOutput",
    "MSClipProcessor",
    "MSClipTextConfig",
    "MSClipTokenizer",
    "MSClipVisionConfig",
    "available_presets",
    "build_msclip_processor",
    "build_msclip_tokenizer",
    "train_msclip_tokenizer",
]
