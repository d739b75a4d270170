"""MS-CLIP image processor: CLIP's PIL/NumPy pipeline with the MS-CLIP normalisation statistics.

The official MS-CLIP evaluation resizes the shortest edge to 224 with bicubic interpolation, centre-crops 224 x 224
(torchvision ``Resize``/``CenterCrop`` on PIL images) and normalises with the ImageNet mean/std, not OpenAI CLIP's.
This class reproduces that with PIL and NumPy only (no torchvision needed).

Images of every PIL mode become RGB with `convert_image_to_rgb` (16-bit and float greyscale scaled to 8 bits, not
clipped to white); the training and evaluation pipelines (``records_msclip.decode_image``, ``transforms_msclip``)
use the same function.

This file must only import the standard library, ``numpy`` and ``transformers`` (and PIL, which transformers' PIL
backend needs anyway, inside functions): it is copied next to saved checkpoints and imported by
``trust_remote_code=True`` where ``modeling_msclip`` is absent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

# Normalisation statistics per preset; the geometry (bicubic shortest-edge resize, centre crop) is shared.
IMAGE_PRESETS: dict[str, dict[str, tuple[float, float, float]]] = {
    "msclip": {"image_mean": tuple(IMAGENET_DEFAULT_MEAN), "image_std": tuple(IMAGENET_DEFAULT_STD)},
    "clip": {"image_mean": tuple(OPENAI_CLIP_MEAN), "image_std": tuple(OPENAI_CLIP_STD)},
}
DEFAULT_IMAGE_SIZE = 224
UINT16_MAX = 65535


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """8-bit grey levels of a single-channel image of a high-bit-depth mode (``I;16*``, ``I``, ``F``).

    * ``I;16`` and its variants (``I;16B``, ``I;16L``, ``I;16N``): ``round(value * 255 / 65535)``.
    * ``I`` (32-bit integers): the same when every value lies in 0..65535 (16-bit data, as older Pillow opened
      16-bit PNGs), else min-max scaled to 0..255.
    * ``F`` (32-bit floats): ``round(value * 255)`` when every value lies in [0, 1], else min-max scaled.
    * Min-max scaling of a constant image gives 0 (black); NaN counts as 0 and infinities as the extreme finite
      values.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    values = np.nan_to_num(values, nan=0.0, posinf=np.finfo(np.float64).max, neginf=np.finfo(np.float64).min)
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif mode != "F" and (mode.startswith("I;16") or (low >= 0 and high <= UINT16_MAX)):
        scaled = values * (255.0 / UINT16_MAX)
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def convert_image_to_rgb(image: Any) -> Any:
    """Convert a PIL image of any mode to 8-bit RGB.

    * RGB is returned as it is; 1, L, P, CMYK, YCbCr, HSV, RGBX are converted by PIL.
    * Transparency (LA, La, PA, RGBA, RGBa, or a ``transparency`` entry of P/L/RGB/I;16 images) is composited onto
      white, as transformers' image processors do.
    * High-bit-depth greyscale (``I;16``, ``I;16B`` and the other ``I;16`` variants, ``I``, ``F``) is scaled to
      8 bits by the rule of `_scale_to_uint8` instead of being clipped (PIL's own conversion turns a 16-bit
      image all white).
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB" and image.info.get("transparency") is None:
        return image
    if mode in ("I", "F") or mode.startswith("I;"):
        values = np.asarray(image)
        if values.ndim == 3:  # a multi-channel integer buffer: keep the first channel
            values = values[..., 0]
        grey = Image.fromarray(_scale_to_uint8(values, mode))
        transparent = image.info.get("transparency")
        if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
            alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
            rgba = Image.merge("RGBA", (grey, grey, grey, Image.fromarray(alpha)))
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return grey.convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class MSClipImageProcessor(CLIPImageProcessorPil):
    """Image processor for MS-CLIP (PIL backend).

    Defaults: convert to RGB, bicubic resize of the shortest edge to 224, centre crop 224 x 224, rescale to [0, 1],
    normalise with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). Every option of
    ``CLIPImageProcessorPil`` can be overridden; ``from_preset`` builds the MS-CLIP or the OpenAI CLIP preset at any
    image size.

    The centre crop rounds its offset like torchvision's ``CenterCrop`` (``round((height - crop) / 2)``), which the
    official evaluation used; transformers' own crop floors it, which differs by one pixel when the excess is 3 mod 4.
    """

    image_mean = list(IMAGENET_DEFAULT_MEAN)
    image_std = list(IMAGENET_DEFAULT_STD)
    model_input_names = ["pixel_values"]
    # Saving writes `auto_map` and copies this file next to the checkpoint, so `trust_remote_code=True` can load it.
    _auto_class = "AutoImageProcessor"

    @classmethod
    def from_preset(
        cls, preset: str = "msclip", image_size: int = DEFAULT_IMAGE_SIZE, **kwargs: Any
    ) -> MSClipImageProcessor:
        """Build a processor for a named normalisation preset and a square input size.

        Args:
            preset: ``"msclip"`` (ImageNet mean/std, what MS-CLIP was trained and evaluated with) or ``"clip"``
                (OpenAI CLIP mean/std).
            image_size: side of the square model input; the shortest edge is resized to it, then centre-cropped.
            **kwargs: any other image-processor option, overriding the preset (for example ``resample``).

        Returns:
            A configured ``MSClipImageProcessor``.
        """
        if preset not in IMAGE_PRESETS:
            raise ValueError(f"Unknown image preset {preset!r}; choose one of {sorted(IMAGE_PRESETS)}")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        settings: dict[str, Any] = {
            "image_mean": list(IMAGE_PRESETS[preset]["image_mean"]),
            "image_std": list(IMAGE_PRESETS[preset]["image_std"]),
            "size": {"shortest_edge": image_size},
            "crop_size": {"height": image_size, "width": image_size},
        }
        settings.update(kwargs)
        return cls(**settings)

    def preprocess(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' preprocessing, after checking that there is at least one image and none is empty."""
        check_images(images)
        return super().preprocess(images, *args, **kwargs)

    def convert_to_rgb(self, image: Any, input_data_format: Any = None) -> np.ndarray:
        """RGB pixels: PIL images through `convert_image_to_rgb` (every mode, 16-bit and float greyscale scaled to
        8 bits), arrays as transformers converts them."""
        if hasattr(image, "getbands"):
            return np.asarray(convert_image_to_rgb(image))
        return super().convert_to_rgb(image, input_data_format=input_data_format)

    def center_crop(self, image: np.ndarray, size: Any, **kwargs: Any) -> np.ndarray:
        """Crop the centre of a channels-first image, rounding the offset like torchvision's ``CenterCrop``.

        Images smaller than the crop fall back to transformers' behaviour (zero padding).
        """
        if size.height is None or size.width is None:
            raise ValueError(f"crop_size must have 'height' and 'width', got {size}")
        height, width = image.shape[-2:]
        if height < size.height or width < size.width:
            return super().center_crop(image, size, **kwargs)
        top = int(round((height - size.height) / 2.0))
        left = int(round((width - size.width) / 2.0))
        return image[..., top : top + size.height, left : left + size.width]


def check_images(images: Any) -> None:
    """Raise a ValueError for an empty batch or an image with no pixels (transformers would divide by zero).

    Other malformed inputs (objects that are not images, arrays whose channels cannot be told) are left to
    transformers, whose messages already name the problem.
    """
    batch = list(images) if isinstance(images, (list, tuple)) else [images]
    if not batch:
        raise ValueError("images is an empty list: give at least one image")
    for index, image in enumerate(batch):
        if hasattr(image, "getbands"):  # a PIL image: (width, height)
            size = tuple(image.size)
        elif hasattr(image, "shape") and len(image.shape) >= 2:
            size = tuple(image.shape)
        else:
            continue
        if 0 in size:
            raise ValueError(f"images[{index}] has no pixels (size {size})")


__all__ = ["DEFAULT_IMAGE_SIZE", "IMAGE_PRESETS", "MSClipImageProcessor", "check_images", "convert_image_to_rgb"]
