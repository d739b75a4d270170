"""MS-CLIP for Hugging Face Transformers.

Importing this package registers the MS-CLIP classes with transformers' Auto classes, so ``AutoConfig``,
``AutoModel``, ``AutoModelForZeroShotImageClassification``, ``AutoModelForImageClassification`` and
``AutoProcessor`` resolve saved MS-CLIP folders without ``trust_remote_code``.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
)

from .configuration_msclip import MSClipConfig, MSClipTextConfig, MSClipVisionConfig, available_presets
from .modeling_msclip import MSClipForImageClassification, MSClipModel, MSClipOutput, MSClipPreTrainedModel

AutoConfig.register(MSClipConfig.model_type, MSClipConfig, exist_ok=True)
AutoModel.register(MSClipConfig, MSClipModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(MSClipConfig, MSClipModel, exist_ok=True)
AutoModelForImageClassification.register(MSClipConfig, MSClipForImageClassification, exist_ok=True)

__all__ = [
    "MSClipConfig",
    "MSClipForImageClassification",
    "MSClipModel",
    "MSClipOutput",
    "MSClipPreTrainedModel",
    "MSClipTextConfig",
    "MSClipVisionConfig",
    "available_presets",
]
