"""Image transforms (PIL / numpy / torch only): the training augmentation `TrainImageTransform` and
`ImageProcessorTransform`, which applies an image processor to one image.
"""

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_base import ImageProcessingMixin

# One RGB conversion for training, evaluation and the processor (every PIL mode; see docs/data.md, "Image modes").
from .image_processing_msclip import convert_image_to_rgb

# --------------------------------------------------------------------------------------------------------------------
# Image transforms (PIL / numpy / torch only)
# --------------------------------------------------------------------------------------------------------------------


def _size_to_height_width(size: Any) -> tuple[int, int]:
    """Read ``(height, width)`` from an int, a pair, a dict or a transformers ``SizeDict``."""
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return int(size[0]), int(size[1])
    height = getattr(size, "height", None)
    width = getattr(size, "width", None)
    shortest_edge = getattr(size, "shortest_edge", None)
    if isinstance(size, Mapping):
        height, width, shortest_edge = size.get("height"), size.get("width"), size.get("shortest_edge")
    if height and width:
        return int(height), int(width)
    if shortest_edge:
        return int(shortest_edge), int(shortest_edge)
    raise ValueError(f"Cannot read an output size (height and width, or shortest_edge) from {size!r}")


def _processor_output_size(image_processor: Any) -> tuple[int, int]:
    """``(height, width)`` of an image processor's output: its ``crop_size``, or ``size`` when it does not crop."""
    uses_crop = getattr(image_processor, "do_center_crop", True) and getattr(image_processor, "crop_size", None)
    return _size_to_height_width(image_processor.crop_size if uses_crop else image_processor.size)


def _three_floats(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values if not isinstance(values, (int, float)) else [values] * 3, dtype=np.float32)
    if array.shape != (3,):
        raise ValueError(f"{name} must have one value per RGB channel, got {values!r}")
    return array


def normalize_image(image: Image.Image, mean: np.ndarray, std: np.ndarray, rescale_factor: float) -> torch.Tensor:
    """Turn an RGB PIL image into a ``(3, H, W)`` float tensor ``(pixel * rescale_factor - mean) / std``."""
    array = np.asarray(image, dtype=np.float32) * np.float32(rescale_factor)
    array = (array - mean) / std
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG for the block and restore its previous state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        yield


class TrainImageTransform:
    """CLIP's training augmentation: random resized crop, optional horizontal flip, then normalisation.

    The flip is off by default because captions often say "left" or "right". Randomness comes from torch's RNG
    (or ``generator``); `DataLoader` seeds torch differently in every worker, so workers do not repeat crops.
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        horizontal_flip: bool = False,
        resample: int = Image.Resampling.BICUBIC,
        rescale_factor: float = 1 / 255,
        generator: torch.Generator | None = None,
    ) -> None:
        """Configure the augmentation.

        Args:
            size: output ``(height, width)`` or one int for a square.
            mean: per-channel mean subtracted after rescaling to [0, 1].
            std: per-channel standard deviation divided by.
            scale: range of the crop's area as a fraction of the image's area (CLIP uses (0.9, 1.0)).
            ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
            horizontal_flip: flip half of the images left-right.
            resample: PIL resampling filter for the resize.
            rescale_factor: multiplies the uint8 pixels before normalisation.
            generator: optional torch generator for reproducible crops.
        """
        self.size = _size_to_height_width(size)
        self.mean = _three_floats(mean, "mean")
        self.std = _three_floats(std, "std")
        if np.any(self.std == 0):
            raise ValueError(f"std must not contain zeros, got {std!r}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale!r}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio!r}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.horizontal_flip = horizontal_flip
        self.resample = resample
        self.rescale_factor = rescale_factor
        self.generator = generator

    @classmethod
    def from_image_processor(cls, image_processor: Any, **kwargs: Any) -> "TrainImageTransform":
        """Build the transform with the output size, mean, std and rescale factor of an image processor.

        The output size is the processor's ``crop_size`` (or ``size`` when it does not centre-crop), so training
        and evaluation images have the same shape. Keyword arguments override the processor's values.
        """
        options = {
            "size": _processor_output_size(image_processor),
            "mean": image_processor.image_mean,
            "std": image_processor.image_std,
            "rescale_factor": getattr(image_processor, "rescale_factor", 1 / 255),
        }
        resample = getattr(image_processor, "resample", None)
        if resample is not None:
            options["resample"] = int(resample)
        options.update(kwargs)
        size = options.pop("size")
        return cls(size, **options)

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of the produced tensors."""
        return self.size

    def _uniform(self, low: float, high: float) -> float:
        return float(torch.empty(()).uniform_(low, high, generator=self.generator))

    def _randint(self, high_inclusive: int) -> int:
        return int(torch.randint(high_inclusive + 1, (), generator=self.generator))

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """Sample a crop ``(left, top, right, bottom)`` inside a ``width`` x ``height`` image.

        Ten tries at an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; if none fits, the
        largest centred crop whose aspect ratio lies within `ratio`.
        """
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * self._uniform(*self.scale)
            aspect = math.exp(self._uniform(*log_ratio))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = self._randint(height - crop_height)
                left = self._randint(width - crop_width)
                return left, top, left + crop_width, top + crop_height
        image_ratio = width / height
        if image_ratio < self.ratio[0]:
            crop_width, crop_height = width, round(width / self.ratio[0])
        elif image_ratio > self.ratio[1]:
            crop_width, crop_height = round(height * self.ratio[1]), height
        else:
            crop_width, crop_height = width, height
        top = (height - crop_height) // 2
        left = (width - crop_width) // 2
        return left, top, left + crop_width, top + crop_height

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Augment one RGB PIL image into a normalised ``(3, height, width)`` tensor."""
        image = convert_image_to_rgb(image)
        box = self.crop_box(*image.size)
        height, width = self.size
        image = image.resize((width, height), resample=self.resample, box=box)
        if self.horizontal_flip and self._uniform(0.0, 1.0) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return normalize_image(image, self.mean, self.std, self.rescale_factor)

    def __repr__(self) -> str:
        return (
            f"TrainImageTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
            f"horizontal_flip={self.horizontal_flip}, mean={self.mean.tolist()}, std={self.std.tolist()})"
        )


class ImageProcessorTransform:
    """The evaluation (no-augmentation) transform: an image processor applied to one image.

    The collators and the other per-image callers take ``PIL image -> (3, height, width) tensor``; this adapts any
    transformers image processor (``MSClipImageProcessor``: bicubic resize of the shortest edge, centre crop,
    normalisation) to that, so evaluation pixels are the processor's own, computed by it. `ImageTextCollator` and
    `ImageClassificationCollator` also take an image processor directly and wrap it in this class.
    """

    def __init__(self, image_processor: Any) -> None:
        """Wrap ``image_processor`` (an instance of a transformers image processor)."""
        if not isinstance(image_processor, ImageProcessingMixin):
            # Caught here, not in the data-loader workers, where it would fail on every record.
            raise TypeError(
                f"ImageProcessorTransform takes a transformers image processor (e.g. MSClipImageProcessor), got "
                f"{image_processor!r}; a per-image callable is used as a transform as it is"
            )
        self.image_processor = image_processor

    @property
    def output_size(self) -> tuple[int, int]:
        """``(height, width)`` of the produced tensors."""
        return _processor_output_size(self.image_processor)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one PIL image into a ``(3, height, width)`` tensor."""
        # convert_image_to_rgb first: a processor other than MSClipImageProcessor (e.g. CLIP's) would convert
        # high-bit-depth and transparent images by its own rules, not the project's.
        return self.image_processor(images=convert_image_to_rgb(image), return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ImageProcessorTransform({type(self.image_processor).__name__})"


def as_image_transform(transform_or_processor: Any) -> Callable[[Image.Image], torch.Tensor]:
    """A per-image transform from a transformers image processor (wrapped in `ImageProcessorTransform`) or from a
    callable ``PIL image -> (3, height, width) tensor`` (returned as it is)."""
    if isinstance(transform_or_processor, ImageProcessingMixin):
        return ImageProcessorTransform(transform_or_processor)
    if not callable(transform_or_processor):
        raise TypeError(
            f"image_transform must be an image processor or a callable taking one PIL image, got "
            f"{transform_or_processor!r}"
        )
    return transform_or_processor
