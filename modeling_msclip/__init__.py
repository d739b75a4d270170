"""MS-CLIP for Hugging Face Transformers.

Importing this package registers the MS-CLIP classes with transformers' Auto classes.
"""

from .configuration_msclip import MSClipConfig, MSClipTextConfig, MSClipVisionConfig, available_presets
from .modeling_msclip import MSClipForImageClassification, MSClipModel, MSClipOutput, MSClipPreTrainedModel

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
