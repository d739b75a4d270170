"""Image-text data for MS-CLIP: loaders, decode-and-skip collators, augmentations and webdataset shards.

One loader, `load_dataset` (with one format detection, `detect_format`), serves pre-training, evaluation and
fine-tuning. It returns a `datasets.Dataset` (or `datasets.IterableDataset` when streaming) with the canonical
columns of its task:

* ``image``: a `datasets.Image(decode=False)` value, i.e. ``{"bytes": ..., "path": ...}``, so nothing is decoded
  while the dataset is read and a corrupt file cannot crash a run there;
* ``text`` (task "image-text"): the caption (a string, or None when the source had none);
* ``label`` (task "classification"): made a `datasets.ClassLabel` by `prepare_labels`.

Images are decoded in the collator, which drops records with an unreadable image or an empty caption and counts them
in a `DataStats` object. `DataStats` keeps its counters in shared memory, so the counts that `DataLoader` worker
processes make are visible in the main process.
"""

import contextlib
import glob
import io
import json
import logging
import math
import os
import re
import tarfile
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from transformers.image_processing_base import ImageProcessingMixin

# One RGB conversion for training, evaluation and the processor (every PIL mode; see docs/data.md, "Image modes").
from .image_processing_msclip import convert_image_to_rgb

try:  # POSIX only; elsewhere `DataStats` is thread-safe but not process-safe.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None

logger = logging.getLogger(__name__)

FORMATS = ("auto", "imagefolder", "csv", "tsv", "jsonl", "parquet", "webdataset", "hub", "classfolder", "disk")
# Preferred order when a webdataset sample holds more than one image field.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTENSIONS = ("txt", "text", "caption")
IMAGE_COLUMN_CANDIDATES = ("image", "img", "image_path", "filepath", "file_path", "file_name", "path", "jpg", "png")
TEXT_COLUMN_CANDIDATES = ("text", "caption", "captions", "txt", "sentence", "sentences", "description", "title")
METADATA_FILENAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
CLIP_CONTEXT_LENGTH = 77
IMAGE_FEATURE = datasets.Image(decode=False)
WEBDATASET_FEATURES = datasets.Features(
    {
        "image": IMAGE_FEATURE,
        "text": datasets.Value("string"),
        "__key__": datasets.Value("string"),
        "__url__": datasets.Value("string"),
        "json": datasets.Json(),
    }
)
_NO_METADATA = "__msclip_no_metadata__"


# --------------------------------------------------------------------------------------------------------------------
# Counting skipped records across threads and processes
# --------------------------------------------------------------------------------------------------------------------


def _remove_lock_file(path: str, owner_pid: int) -> None:
    # Forked workers inherit the finalizer; only the process that created the file may delete it.
    if os.getpid() == owner_pid:
        try:
            os.remove(path)
        except OSError:
            pass


class DataStats:
    """Counts of records seen, kept and skipped, shared by the main process and its `DataLoader` workers.

    The counters live in a shared-memory tensor: forked workers inherit it and spawned workers receive it through
    torch's multiprocessing pickler, so increments made in any worker are visible in the process that created the
    object. Updates take a per-process thread lock plus an ``flock`` on a small lock file, which makes them safe
    across threads, workers and several data loaders sharing one object. Each process (and each rank under
    torch.distributed) has its own counters; `as_dict(all_ranks=True)` sums them over ranks.

    Invariant: ``seen == kept + skipped_corrupt_image + skipped_empty_caption``.

    Where each record is counted: ``kept`` counts the records that pass every check *when they are batched* (the
    collators and the streams count ``seen`` and ``kept`` at collation, once per epoch). A pre-scan
    (`drop_bad_records`) counts only the records it drops, as seen and skipped; the records it keeps are counted
    by the collator when they are batched, so nothing is counted twice. Between a pre-scan and the first batch the
    counters therefore read ``kept 0``; `summary` then reports the pre-scan instead (``data: pre-scan kept 10 of
    13, skipped 3 (...); none batched yet``), from `prescan_kept`, the number of records this process's map-style
    pre-scans kept (None without one; not shared with workers or summed over ranks).
    """

    FIELDS = ("seen", "kept", "skipped_corrupt_image", "skipped_empty_caption")

    def __init__(self, max_warnings: int = 5) -> None:
        """Create zeroed counters.

        Args:
            max_warnings: how many skipped records each process logs with their reason (the rest are only counted).
        """
        self.max_warnings = max_warnings
        self._counts = torch.zeros(len(self.FIELDS), dtype=torch.int64).share_memory_()
        fd, self._lock_path = tempfile.mkstemp(prefix="msclip-datastats-", suffix=".lock")
        os.close(fd)
        weakref.finalize(self, _remove_lock_file, self._lock_path, os.getpid())
        self._init_process_local_state()
        self.prescan_kept: int | None = None

    def _init_process_local_state(self) -> None:
        self._thread_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._lock_fd_pid: int | None = None
        self._warnings_logged = 0

    def __getstate__(self) -> dict[str, Any]:
        # Under torch's ForkingPickler (DataLoader spawn/forkserver workers) the tensor travels as shared memory;
        # under plain pickle it is copied, which yields independent counters.
        return {"counts": self._counts, "lock_path": self._lock_path, "max_warnings": self.max_warnings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._counts = state["counts"]
        self._lock_path = state["lock_path"]
        self.max_warnings = state["max_warnings"]
        self._init_process_local_state()
        self.prescan_kept = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if fcntl is None:
                yield
                return
            # flock locks belong to an open file description, and a forked child shares its parent's: every
            # process must open the file itself for the lock to exclude the others.
            if self._lock_fd_pid != os.getpid():
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                self._lock_fd_pid = os.getpid()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def add(
        self,
        *,
        seen: int = 0,
        kept: int = 0,
        skipped_corrupt_image: int = 0,
        skipped_empty_caption: int = 0,
    ) -> None:
        """Add to the counters (one locked update, so call it once per batch rather than once per record)."""
        delta = torch.tensor([seen, kept, skipped_corrupt_image, skipped_empty_caption], dtype=torch.int64)
        with self._locked():
            self._counts += delta

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._locked():
            self._counts.zero_()

    def log_skip(self, reason: str, detail: str) -> None:
        """Log why a record was skipped, for the first `max_warnings` skips of this process."""
        if self._warnings_logged < self.max_warnings:
            self._warnings_logged += 1
            logger.warning("Skipping a record (%s): %s", reason, detail)

    def as_dict(self, all_ranks: bool = False) -> dict[str, int]:
        """Return the counters by name.

        Args:
            all_ranks: sum the counters over all torch.distributed ranks (a collective call: every rank must make
                it). Ignored when torch.distributed is not initialised.
        """
        counts = self._counts.clone()
        if all_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            backend = torch.distributed.get_backend()
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            counts = counts.to(device)
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
        return dict(zip(self.FIELDS, (int(value) for value in counts.tolist())))

    @property
    def seen(self) -> int:
        """Records examined."""
        return int(self._counts[0])

    @property
    def kept(self) -> int:
        """Records that made it into a batch."""
        return int(self._counts[1])

    @property
    def skipped_corrupt_image(self) -> int:
        """Records skipped because the image was missing, unreadable or corrupt."""
        return int(self._counts[2])

    @property
    def skipped_empty_caption(self) -> int:
        """Records skipped because the caption was missing, empty or only whitespace."""
        return int(self._counts[3])

    @property
    def skipped(self) -> int:
        """All skipped records."""
        return self.skipped_corrupt_image + self.skipped_empty_caption

    def summary(self, all_ranks: bool = False, counts: dict[str, int] | None = None) -> str:
        """One line for the end-of-run log, e.g. ``data: seen 100, kept 97, skipped 3 (corrupt image 2, ...)``.

        Between a map-style pre-scan of this process (`prescan_kept` is set) and the first batch (``kept`` is 0 and
        every record seen was skipped), the line reports the pre-scan instead:
        ``data: pre-scan kept 10 of 13, skipped 3 (...); none batched yet``.

        ``counts`` formats counters already read with `as_dict` (saves a second collective with ``all_ranks``).
        """
        counts = counts if counts is not None else self.as_dict(all_ranks=all_ranks)
        skipped = counts["skipped_corrupt_image"] + counts["skipped_empty_caption"]
        reasons = (
            f"(corrupt or unreadable image {counts['skipped_corrupt_image']}, "
            f"empty caption {counts['skipped_empty_caption']})"
        )
        if self.prescan_kept is not None and counts["kept"] == 0 and counts["seen"] == skipped:
            total = self.prescan_kept + skipped
            return f"data: pre-scan kept {self.prescan_kept} of {total}, skipped {skipped} {reasons}; none batched yet"
        return f"data: seen {counts['seen']}, kept {counts['kept']}, skipped {skipped} {reasons}"

    def __repr__(self) -> str:
        return f"DataStats({self.as_dict()})"


# --------------------------------------------------------------------------------------------------------------------
# Decoding records
# --------------------------------------------------------------------------------------------------------------------


def _open_image_bytes(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # force the full decode so truncated files fail here, not later inside a transform
    return image


def decode_image(value: Any) -> Image.Image:
    """Decode one image value into a fully loaded RGB PIL image.

    Args:
        value: a `datasets.Image(decode=False)` dict ``{"bytes", "path"}``, raw bytes, a local path or URL, a PIL
            image or an ``(H, W[, C])`` uint8 array.

    Returns:
        The RGB image.

    Raises:
        ValueError, OSError, TypeError (or PIL's errors) when the value holds no readable image; callers that must
        not crash catch `Exception`.
    """
    if value is None:
        raise ValueError("the record has no image")
    if isinstance(value, Image.Image):
        value.load()
        image = value
    elif isinstance(value, Mapping):
        if value.get("bytes") is not None:
            image = _open_image_bytes(value["bytes"])
        elif value.get("path"):
            image = decode_image(value["path"])
        else:
            raise ValueError("the image value has neither bytes nor a path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = _open_image_bytes(bytes(value))
    elif isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if "://" in path:  # remote files go through datasets' own opener (hf://, http(s)://, s3://, ...)
            image = datasets.Image(decode=True).decode_example({"path": path, "bytes": None})
            image.load()
        else:
            with open(path, "rb") as handle:
                image = _open_image_bytes(handle.read())
    elif isinstance(value, np.ndarray):
        image = Image.fromarray(value)
    else:
        raise TypeError(f"cannot decode an image from a {type(value).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image has zero size {image.size}")
    return convert_image_to_rgb(image)


EMPTY_CAPTION = "empty caption"
CORRUPT_IMAGE = "corrupt image"
SAMPLE_KEYS = "sample_keys"


def record_name(record: Mapping[str, Any]) -> str:
    """The key a record is logged under (``--log_seen_samples``): its webdataset key, else its image file name, else
    its caption."""
    if record.get("__key__"):
        return str(record["__key__"])
    image = record.get("image")
    if isinstance(image, Mapping) and image.get("path"):
        return Path(str(image["path"])).name
    return str(record.get("text"))


def describe_record(record: Mapping[str, Any], image_column: str = "image") -> str:
    """A name for a record in skip messages: its webdataset key and shard, else its image path (else the caption)."""
    if record.get("__key__"):
        url = record.get("__url__")
        return f"{record['__key__']} in {url}" if url else str(record["__key__"])
    return _describe_image(record.get(image_column))


def _describe_image(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("path") or "<bytes>")
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return f"<{type(value).__name__}>"


def _clean_caption_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, float) and math.isnan(value):  # pandas reads an empty CSV cell as NaN
        return None
    if not isinstance(value, str):
        value = str(value)
    value = value.strip()
    return value or None


def extract_caption(record: Mapping[str, Any], text_column: str = "text", choice: str = "first") -> str | None:
    """Return the stripped caption of a record, or None when it is missing, empty or whitespace.

    A list of captions (several per image, COCO style) yields its first non-empty entry (``choice="first"``) or a
    random one drawn from torch's RNG (``choice="random"``, seeded per `DataLoader` worker). When the text column is
    missing or None, the ``caption`` key of a webdataset ``json`` field is used.
    """
    value = record.get(text_column)
    if value is None and isinstance(record.get("json"), Mapping):
        value = record["json"].get("caption")
    if isinstance(value, (list, tuple)):
        candidates = [caption for caption in (_clean_caption_value(item) for item in value) if caption]
        if not candidates:
            return None
        if choice == "random":
            return candidates[int(torch.randint(len(candidates), ()))]
        return candidates[0]
    return _clean_caption_value(value)


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


# --------------------------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------------------------


def _empty_pixel_values(transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    height, width = getattr(transform, "output_size", (0, 0))
    return torch.zeros((0, 3, height, width), dtype=torch.float32)


INDEX_KEY = "__index__"


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose records also carry their position under ``"__index__"``.

    `ImageTextCollator(augmentation_seed=...)` uses it to give every sample its own augmentation randomness.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], INDEX_KEY: index}


@contextlib.contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG for the block and restore its previous state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        yield


class ImageTextCollator:
    """Decode, filter, transform and tokenise a list of records into a CLIP training batch.

    Records with an empty or missing caption, or an image that cannot be decoded (or transformed), are dropped
    from the batch and counted in `stats`; they never raise. With ``refill_from`` (the training `IndexedDataset`)
    each dropped record is replaced by a record drawn from it, so that the batch keeps its size (contrastive losses
    under DDP need the same batch size on every rank); without it the batch can be smaller than requested, or empty
    (``input_ids.shape[0] == 0``) when every record is bad. Streams filter before batching instead
    (`streaming_msclip.ImageTextStream` uses `decode_record` and `collate_decoded`).
    Works as a `DataLoader` ``collate_fn`` with ``num_workers > 0``: the counts reach the main process.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_transform: Callable[[Image.Image], torch.Tensor] | ImageProcessingMixin,
        *,
        image_column: str = "image",
        text_column: str = "text",
        padding: bool | str = True,
        max_length: int = CLIP_CONTEXT_LENGTH,
        caption_choice: str = "random",
        stats: DataStats | None = None,
        augmentation_seed: int | None = None,
        refill_from: "IndexedDataset | None" = None,
        max_refill_draws: int = 100,
        sample_keys: bool = False,
    ) -> None:
        """Configure the collator.

        Args:
            tokenizer: a transformers tokenizer (e.g. ``MSClipTokenizer``).
            image_transform: maps an RGB PIL image to a ``(3, H, W)`` tensor (`TrainImageTransform`, ...), or an
                image processor, used through `ImageProcessorTransform` (evaluation preprocessing).
            image_column: record key of the image.
            text_column: record key of the caption (a string or a list of strings).
            padding: True / "longest" pads to the longest caption of the batch; "max_length" pads to `max_length`.
            max_length: captions are truncated to this many tokens (77 for CLIP).
            caption_choice: "random" or "first", for records holding a list of captions.
            stats: counters to update; a new `DataStats` when omitted (read it back as ``collator.stats``).
            augmentation_seed: draw each record's random augmentation (and caption choice) from a generator seeded
                by ``(augmentation_seed, epoch, record["__index__"])`` (see `IndexedDataset`), so a sample is
                augmented identically whichever worker, rank or resumed run collates it. Set ``collator.epoch``
                at each epoch. ``None`` uses torch's global RNG.
            refill_from: replace each bad record that carries ``"__index__"`` by one drawn from this dataset, at an
                index that is a function of ``(augmentation_seed, epoch, index, draw)`` (the same on every rank and
                after a resume). Records without an index (evaluation data) are not refilled.
            max_refill_draws: stop with an error when this many draws in a row find no good record.
            sample_keys: add the `record_name` of every pair in the batch under `SAMPLE_KEYS` (the trainer logs
                what it trains on from it, ``--log_seen_samples``).
        """
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding must be True, 'longest' or 'max_length', got {padding!r}")
        if caption_choice not in ("random", "first"):
            raise ValueError(f"caption_choice must be 'random' or 'first', got {caption_choice!r}")
        self.tokenizer = tokenizer
        self.image_transform = as_image_transform(image_transform)
        self.image_column = image_column
        self.text_column = text_column
        self.padding = padding
        self.max_length = max_length
        self.caption_choice = caption_choice
        self.stats = stats if stats is not None else DataStats()
        self.augmentation_seed = augmentation_seed
        self.refill_from = refill_from
        self.max_refill_draws = max_refill_draws
        self.sample_keys = sample_keys
        self.epoch = 0

    def _record_rng(self, record: Mapping[str, Any]) -> contextlib.AbstractContextManager:
        """A context in which torch's global RNG is seeded for this record (when per-record seeding is on)."""
        if self.augmentation_seed is None or INDEX_KEY not in record:
            return contextlib.nullcontext()
        return _seeded_global_rng(hash((self.augmentation_seed, self.epoch, int(record[INDEX_KEY]))))

    def decode_records(
        self, records: Sequence[Mapping[str, Any]], names: list[str] | None = None
    ) -> tuple[list[torch.Tensor], list[str]]:
        """Return the transformed images and captions of the good records (replacements included), counting the bad
        ones; ``names`` receives the `record_name` of each good record."""
        pixel_values, captions = [], []
        empty_caption = corrupt_image = seen = 0
        for record in records:
            for draw in range(self.max_refill_draws + 1):
                seen += 1
                with self._record_rng(record):
                    caption, pixels, problem, detail = self.decode_record(record)
                if problem is None:
                    pixel_values.append(pixels)
                    captions.append(caption)
                    if names is not None:
                        names.append(record_name(record))
                    break
                self.stats.log_skip(problem, detail)
                if problem == EMPTY_CAPTION:
                    empty_caption += 1
                else:
                    corrupt_image += 1
                if self.refill_from is None or INDEX_KEY not in record:
                    break
                record = self._replacement(record, draw)
            else:
                raise RuntimeError(
                    f"{self.max_refill_draws} records drawn in a row to replace a bad one were bad too: is most of the "
                    "training data unreadable?"
                )
        self.stats.add(
            seen=seen,
            kept=len(captions),
            skipped_corrupt_image=corrupt_image,
            skipped_empty_caption=empty_caption,
        )
        return pixel_values, captions

    def _replacement(self, record: Mapping[str, Any], draw: int) -> Mapping[str, Any]:
        """The record that replaces a bad one: drawn by index, reproducibly (see ``refill_from``)."""
        key = hash((self.augmentation_seed or 0, self.epoch, int(record[INDEX_KEY]), draw, 0x5EED))  # ints only
        return self.refill_from[key % len(self.refill_from)]

    def decode_record(
        self, record: Mapping[str, Any]
    ) -> tuple[str | None, torch.Tensor | None, str | None, str | None]:
        """``(caption, pixels, None, None)`` for a good record, else ``(None, None, reason, detail)`` where the
        reason is `EMPTY_CAPTION` or `CORRUPT_IMAGE` and the detail names the record (its key, source and error).
        Never raises for a bad record and logs nothing (the caller counts and names skips)."""
        caption = extract_caption(record, self.text_column, self.caption_choice)
        if caption is None:
            return None, None, EMPTY_CAPTION, describe_record(record, self.image_column)
        try:
            pixels = self.image_transform(decode_image(record.get(self.image_column)))
        except Exception as error:  # any decode failure must skip the record, never end the run
            return None, None, CORRUPT_IMAGE, f"{describe_record(record, self.image_column)}: {error!r}"
        return caption, pixels, None, None

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate records into ``dict(input_ids, attention_mask, pixel_values, return_loss=True)``."""
        names: list[str] | None = [] if self.sample_keys else None
        pixel_values, captions = self.decode_records(records, names)
        batch = self.collate_decoded(pixel_values, captions)
        if names is not None:
            batch[SAMPLE_KEYS] = names
        return batch

    def collate_decoded(self, pixel_values: Sequence[torch.Tensor], captions: Sequence[str]) -> dict[str, Any]:
        """Tokenise decoded captions and stack transformed images into a training batch."""
        if not captions:
            width = self.max_length if self.padding == "max_length" else 0
            return {
                "input_ids": torch.zeros((0, width), dtype=torch.long),
                "attention_mask": torch.zeros((0, width), dtype=torch.long),
                "pixel_values": _empty_pixel_values(self.image_transform),
                "return_loss": True,
            }
        text_inputs = self.tokenizer(
            list(captions),
            padding="max_length" if self.padding == "max_length" else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {
            "input_ids": text_inputs["input_ids"],
            "attention_mask": text_inputs["attention_mask"],
            "pixel_values": torch.stack(pixel_values),
            "return_loss": True,
        }


class ImageClassificationCollator:
    """Decode and transform ``(image, label)`` records into ``dict(pixel_values, labels)`` for evaluation.

    Unreadable images are dropped and counted in `stats` like `ImageTextCollator` does.
    """

    def __init__(
        self,
        image_transform: Callable[[Image.Image], torch.Tensor] | ImageProcessingMixin,
        *,
        image_column: str = "image",
        label_column: str = "label",
        stats: DataStats | None = None,
    ) -> None:
        """Configure the collator (see `ImageTextCollator` for the arguments)."""
        self.image_transform = as_image_transform(image_transform)
        self.image_column = image_column
        self.label_column = label_column
        self.stats = stats if stats is not None else DataStats()

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate records into ``dict(pixel_values, labels)``."""
        pixel_values, labels = [], []
        for record in records:
            try:
                pixels = self.image_transform(decode_image(record.get(self.image_column)))
            except Exception as error:  # skip and count, never end the run
                self.stats.log_skip("corrupt image", f"{_describe_image(record.get(self.image_column))}: {error!r}")
                continue
            pixel_values.append(pixels)
            labels.append(int(record[self.label_column]))
        self.stats.add(seen=len(records), kept=len(labels), skipped_corrupt_image=len(records) - len(labels))
        return {
            "pixel_values": torch.stack(pixel_values) if pixel_values else _empty_pixel_values(self.image_transform),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


# --------------------------------------------------------------------------------------------------------------------
# Filtering bad records up front
# --------------------------------------------------------------------------------------------------------------------


def _captions_present(batch: dict[str, list[Any]], text_column: str) -> list[bool]:
    size = len(next(iter(batch.values())))
    rows = [{key: values[index] for key, values in batch.items()} for index in range(size)]
    return [extract_caption(row, text_column) is not None for row in rows]


def iter_captions(
    source: str | os.PathLike,
    *,
    format: str = "auto",
    split: str | None = None,
    text_column: str | None = None,
    limit: int | None = None,
) -> Iterator[str]:
    """Every non-empty caption of a dataset, read lazily without decoding images.

    Reads any source `load_dataset` reads, image-text datasets and caption-only tables alike (streamed, so a large
    dataset is not loaded whole); a record with several captions yields each of them. Used to train a tokenizer on
    one's own captions.

    Args:
        source: the dataset (image folder, CSV/TSV/JSONL, webdataset shards, saved dataset, Hub name).
        format: one of `FORMATS`.
        split: split to read (None: the only one).
        text_column: caption column (auto-detected when None).
        limit: stop after this many records.

    Yields:
        Stripped captions.
    """
    dataset = load_dataset(source, format=format, task="captions", split=split, text_column=text_column, streaming=True)
    for number, record in enumerate(dataset):
        if limit is not None and number >= limit:
            return
        value = record.get("text")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            caption = _clean_caption_value(item)
            if caption:
                yield caption


def read_nonempty_lines(path: str | os.PathLike) -> list[str]:
    """The stripped, non-empty lines of a text file (class names, prompt templates)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def images_decodable(images: list[Any]) -> list[bool]:
    """One flag per image: can it be decoded (batched `datasets` filter; a bad image drops its record)."""
    valid = []
    for value in images:
        try:
            decode_image(value)
            valid.append(True)
        except Exception:  # a bad image is a reason to drop the record, not to stop
            valid.append(False)
    return valid


def drop_bad_records(
    dataset: datasets.Dataset,
    *,
    image_column: str = "image",
    text_column: str = "text",
    stats: DataStats | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Remove records with an empty caption or an undecodable image before training, so batches stay full.

    The dataset is filtered now, with ``num_proc`` processes. The collator's own check (and replacement of bad
    records) stays in place as a safety net; the images of kept records are decoded twice. Streams are not
    pre-scanned: `streaming_msclip.ImageTextStream` filters each record before it joins a batch.

    Counting (see `DataStats`): the pre-scan adds only the records it drops to `stats`, as seen and skipped. The
    records it keeps are counted as seen and kept by the collator (or stream) when they are batched, as every
    record is, so ``seen == kept + skipped`` holds at every moment and nothing is counted twice. A map-style
    pre-scan also adds the number it kept to ``stats.prescan_kept``, so that `DataStats.summary` reads, before the
    first batch, ``data: pre-scan kept 10 of 13, skipped 3 (...); none batched yet`` rather than ``kept 0``; after
    one epoch through the collator the counters read ``seen 13, kept 10, skipped 3``.
    """
    stats = stats if stats is not None else DataStats()
    if isinstance(dataset, datasets.IterableDataset):
        raise TypeError(
            "drop_bad_records scans a map-style dataset; a stream filters its records itself (ImageTextStream)"
        )
    total = len(dataset)
    with_caption = dataset.filter(
        _captions_present, batched=True, fn_kwargs={"text_column": text_column}, num_proc=num_proc
    )
    valid = with_caption.filter(images_decodable, input_columns=image_column, batched=True, num_proc=num_proc)
    empty_caption = total - len(with_caption)
    corrupt_image = len(with_caption) - len(valid)
    stats.add(
        seen=empty_caption + corrupt_image,
        skipped_corrupt_image=corrupt_image,
        skipped_empty_caption=empty_caption,
    )
    stats.prescan_kept = (stats.prescan_kept or 0) + len(valid)
    return valid


# --------------------------------------------------------------------------------------------------------------------
# Webdataset shards (img2dataset layout)
# --------------------------------------------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """Split a tar member name into (sample key, field) the webdataset way: the key ends at the basename's first dot.

    ``"dir/000001.jpg" -> ("dir/000001", "jpg")``; ``"a/000001.seg.png" -> ("a/000001", "seg.png")``.
    """
    directory, _, basename = name.rpartition("/")
    if "." not in basename or basename.startswith("."):
        return None, None
    stem, _, field = basename.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field.lower()


def _assemble_webdataset_record(
    key: str, fields: dict[str, bytes], shard: str, image_field: str | None, text_field: str | None
) -> dict[str, Any]:
    image_fields = [image_field] if image_field else [ext for ext in IMAGE_EXTENSIONS if ext in fields]
    image = None
    for field in image_fields:
        if field in fields:
            image = {"bytes": fields[field], "path": f"{key}.{field}"}
            break
    metadata = None
    if "json" in fields:
        try:
            metadata = json.loads(fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            logger.warning("Ignoring unreadable %s.json in %s", key, shard)
    text = None
    for field in [text_field] if text_field else CAPTION_EXTENSIONS:
        if field in fields:
            text = fields[field].decode("utf-8", errors="replace")
            break
    if text is None and isinstance(metadata, Mapping) and isinstance(metadata.get("caption"), str):
        text = metadata["caption"]
    return {"image": image, "text": text, "__key__": key, "__url__": shard, "json": metadata}


def _open_shard(shard: str) -> Any:
    """A binary file object for a local shard path or an fsspec URL (``s3://``, ``gs://``, ``https://``, ...)."""
    if "://" in shard:
        import fsspec

        return fsspec.open(shard, "rb").open()
    return open(shard, "rb")


def iter_webdataset_shard(
    shard: str, image_field: str | None = None, text_field: str | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the samples of one tar shard as ``{"image", "text", "__key__", "__url__", "json"}`` dicts.

    Members that share a key and follow each other form one sample (img2dataset writes them so). The image is the
    first of `IMAGE_EXTENSIONS` present (or ``image_field``), the caption the first of `CAPTION_EXTENSIONS` (or
    ``text_field``), falling back to the ``caption`` of the ``.json`` member. A truncated or corrupt shard yields
    the samples before the damage and logs a warning instead of raising.
    """
    current_key, fields = None, {}
    try:
        with _open_shard(shard) as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, field = split_member_name(member.name)
                if key is None:
                    continue
                if current_key is not None and key != current_key:
                    yield _assemble_webdataset_record(current_key, fields, shard, image_field, text_field)
                    fields = {}
                current_key = key
                handle = archive.extractfile(member)
                fields[field] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError) as error:
        logger.warning("Shard %s is corrupt or truncated (%r); using the samples read before the damage", shard, error)
        current_key, fields = None, {}  # the sample in progress may be incomplete
    if current_key is not None:
        yield _assemble_webdataset_record(current_key, fields, shard, image_field, text_field)


def _generate_webdataset_records(
    shards: list[str], image_field: str | None, text_field: str | None, signature: str
) -> Iterator[dict[str, Any]]:
    # `signature` (sizes and modification times) only feeds datasets' cache fingerprint.
    del signature
    for shard in shards:
        yield from iter_webdataset_shard(shard, image_field, text_field)


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style braces: ``"s/{000..002}.tar"`` and ``"{a,b}.tar"`` (nested and repeated allowed)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    prefix, suffix = pattern[: match.start()], pattern[match.end() :]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        first, last = range_match.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(prefix + option + suffix)]


def _is_shard_path(path: str) -> bool:
    return path.endswith((".tar", ".tar.gz", ".tgz"))


def find_webdataset_shards(source: str) -> dict[str, list[str]]:
    """Find tar shards by split.

    ``source`` is a shard, a brace/glob pattern of shards (one split, "train"), or a folder. In a folder, shards
    directly inside form split "train" and shards inside a sub-folder form the split named after it
    (``shards/test/000000.tar`` is split "test").
    """
    if any(character in source for character in "*?[{"):
        paths = set()
        for pattern in expand_braces(source):
            if any(character in pattern for character in "*?["):
                paths.update(glob.glob(pattern))
            elif os.path.isfile(pattern):
                paths.add(pattern)
            else:
                raise FileNotFoundError(f"Shard {pattern} (from {source!r}) does not exist")
        if not paths:
            raise FileNotFoundError(f"No shard matches {source!r}")
        return {"train": sorted(paths)}
    path = Path(source)
    if path.is_file():
        return {"train": [str(path)]}
    if not path.is_dir():
        raise FileNotFoundError(f"No such shard or folder: {source}")
    splits: dict[str, list[str]] = {}
    top_level = sorted(str(child) for child in path.iterdir() if child.is_file() and _is_shard_path(child.name))
    if top_level:
        splits["train"] = top_level
    for child in sorted(path.iterdir()):
        if child.is_dir():
            shards = sorted(str(grandchild) for grandchild in child.iterdir() if _is_shard_path(grandchild.name))
            if shards:
                if child.name in splits:
                    raise ValueError(f"{source} has shards both at its top level and in {child}: both mean 'train'")
                splits[child.name] = shards
    if not splits:
        raise FileNotFoundError(f"No *.tar shards in {source} or in its sub-folders")
    return splits


def _files_signature(paths: Sequence[str]) -> str:
    parts = []
    for path in paths:
        status = os.stat(path)
        parts.append(f"{os.path.abspath(path)}:{status.st_size}:{status.st_mtime_ns}")
    return "|".join(parts)


def _load_webdataset(
    source: str,
    split: str | None,
    streaming: bool,
    cache_dir: str | None,
    image_field: str | None,
    text_field: str | None,
) -> datasets.Dataset | datasets.IterableDataset:
    splits = find_webdataset_shards(source)
    name = _choose_split(list(splits), split, source)
    gen_kwargs = {
        "shards": splits[name],
        "image_field": image_field,
        "text_field": text_field,
        "signature": _files_signature(splits[name]),
    }
    # Our own reader (instead of datasets' "webdataset" builder) so that a corrupt shard, an undecodable .txt or
    # .json, or a sample missing a field is skipped and counted rather than ending the run; the shard list is
    # still split across DataLoader workers when streaming.
    if streaming:
        return datasets.IterableDataset.from_generator(
            _generate_webdataset_records, features=WEBDATASET_FEATURES, gen_kwargs=gen_kwargs, split=name
        )
    return datasets.Dataset.from_generator(
        _generate_webdataset_records,
        features=WEBDATASET_FEATURES,
        gen_kwargs=gen_kwargs,
        cache_dir=cache_dir,
        split=datasets.NamedSplit(name),
    )


# --------------------------------------------------------------------------------------------------------------------
# Loading image-text datasets
# --------------------------------------------------------------------------------------------------------------------


def _choose_split(available: Sequence[str], split: str | None, source: Any) -> str:
    if split is None:
        if len(available) == 1:
            return available[0]
        raise ValueError(f"{source} has the splits {sorted(available)}: pass split= to choose one")
    if split not in available:
        raise ValueError(f"{source} has no split {split!r}; its splits are {sorted(available)}")
    return split


def pick_split(loaded: Any, split: str | None, source: Any) -> datasets.Dataset | datasets.IterableDataset:
    """``loaded`` itself, or its split ``split`` when it is a dataset dict (``None``: its only split; an error
    naming the splits otherwise)."""
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return loaded[_choose_split(list(loaded), split, source)]
    return loaded


TASKS = ("image-text", "classification", "captions")
LABEL_COLUMN_CANDIDATES = ("label",)
TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
# A path that does not exist and ends in one of these is a local path with a typo, never a Hub dataset id.
LOCAL_FILE_EXTENSIONS = (
    ".csv",
    ".tsv",
    ".tab",
    ".json",
    ".jsonl",
    ".parquet",
    ".arrow",
    ".tar",
    ".tgz",
    ".gz",
    ".zip",
    ".txt",
    *(f".{extension}" for extension in IMAGE_EXTENSIONS),
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_PATTERN_CHARACTERS = "*?[{"


def looks_like_local_path(source: str | os.PathLike) -> bool:
    """Whether a path is meant as a local one (so that, when it does not exist, it is an error, not a Hub id).

    Local-looking: absolute; starting with ``.`` or ``~`` (``./x``, ``../x``); holding a backslash or two or more
    ``/``; ending in a file extension of `LOCAL_FILE_EXTENSIONS` (``.jsonl``, ``.csv``, ``.tar``, ``.parquet``,
    ...); or ``dir/name`` where the folder ``dir`` exists here.
    """
    source = os.fspath(source)
    if os.path.isabs(source) or source.startswith((".", "~")) or "\\" in source or source.count("/") >= 2:
        return True
    if source.lower().endswith(LOCAL_FILE_EXTENSIONS):
        return True
    parent = os.path.dirname(source)
    return bool(parent) and os.path.isdir(parent)


def looks_like_hub_id(source: str | os.PathLike) -> bool:
    """Whether ``source`` reads as a Hub dataset id: ``name`` or ``owner/name`` (letters, digits, ``_``, ``.``,
    ``-``) that is not a local-looking path (see `looks_like_local_path`)."""
    source = os.fspath(source)
    return _HUB_ID.fullmatch(source) is not None and not looks_like_local_path(source)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _is_image_file_name(name: str) -> bool:
    stem, dot, extension = name.rpartition(".")
    return bool(dot and stem) and extension.lower() in IMAGE_EXTENSIONS


def _list_folder(folder: Path) -> tuple[list[str], list[str]]:
    """The sorted (file names, sub-folder names) of a folder; hidden entries are left out."""
    files, folders = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                folders.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
    return sorted(files), sorted(folders)


def _holds_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() and _is_image_file_name(entry.name) for entry in entries)


def folder_layout(root: str | os.PathLike) -> dict[str, list[str]]:
    """What a folder holds at its top level and one level down, as paths relative to it.

    Returns:
        ``{"shards": [...], "metadata": [...], "class_folders": [...], "images": [...]}``: ``*.tar`` shards,
        ``metadata.jsonl/csv/parquet`` files, class folders (a sub-folder that holds images and no metadata file,
        ``root/<class>/``, or a sub-folder of a split folder that holds images, ``root/<split>/<class>/``) and up
        to three image files lying directly in ``root``.
    """
    root = Path(root)
    layout: dict[str, list[str]] = {"shards": [], "metadata": [], "class_folders": [], "images": []}
    files, folders = _list_folder(root)
    layout["shards"] += [name for name in files if _is_shard_path(name.lower())]
    layout["metadata"] += [name for name in files if name in METADATA_FILENAMES]
    layout["images"] += [name for name in files if _is_image_file_name(name)][:3]
    for folder in folders:
        sub_files, sub_folders = _list_folder(root / folder)
        layout["shards"] += [f"{folder}/{name}" for name in sub_files if _is_shard_path(name.lower())]
        metadata = [f"{folder}/{name}" for name in sub_files if name in METADATA_FILENAMES]
        layout["metadata"] += metadata
        if not metadata and any(_is_image_file_name(name) for name in sub_files):
            layout["class_folders"].append(folder)
        if not any(_is_image_file_name(name) for name in sub_files):  # a split folder: its sub-folders may be classes
            layout["class_folders"] += [f"{folder}/{sub}" for sub in sub_folders if _holds_images(root / folder / sub)]
    return layout


def _class_names_of(class_folders: Sequence[str]) -> list[str]:
    return sorted({folder.rpartition("/")[2] for folder in class_folders})


def _some(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


def _no_captions_error(source: Any) -> ValueError:
    return ValueError(
        f"{source} is read as class folders (root/<class>/*.png): class folders carry no captions, so they cannot "
        "be image-text pairs for pre-training or retrieval. Add a metadata.jsonl with file_name and a caption "
        "column (then it is an image folder), or use the data for classification (zero-shot, linear probe, "
        "fine-tuning)."
    )


def _detect_folder_format(path: Path, source: str) -> str:
    if _is_saved_dataset(path):
        return "disk"
    layout = folder_layout(path)
    candidates: dict[str, list[str]] = {}
    if layout["shards"]:
        candidates["webdataset"] = layout["shards"]
    if layout["metadata"]:
        candidates["imagefolder"] = layout["metadata"]
    elif len(_class_names_of(layout["class_folders"])) >= 2:
        candidates["classfolder"] = [f"{folder}/" for folder in layout["class_folders"]]
    if len(candidates) == 1:
        return next(iter(candidates))
    if candidates:
        listed = "; ".join(f"format='{name}' ({_some(paths)})" for name, paths in candidates.items())
        raise ValueError(f"The folder {source} fits several formats: {listed}. Pass format= to choose one.")
    if layout["class_folders"]:
        reason = (
            f"it holds one image sub-folder ({layout['class_folders'][0]}/) and no metadata file: class folders "
            "need at least two classes, and an image folder needs a metadata.jsonl (file_name and caption or label "
            "columns)"
        )
    elif layout["images"]:
        reason = (
            f"it holds images ({_some(layout['images'])}) but no metadata file: an image folder needs a "
            "metadata.jsonl (file_name and caption or label columns) next to them"
        )
    else:
        reason = (
            f"it holds no *.tar shards, no {'/'.join(METADATA_FILENAMES)} and no class folders "
            "(root/<class>/*.png), directly or one level down"
        )
    raise ValueError(f"Cannot tell the format of the folder {source}: {reason}. Pass format= (one of {FORMATS[1:]}).")


def detect_format(source: str | os.PathLike, *, split: str | None = None) -> str:
    """The format of a source path, by one set of rules for every task (see docs/data.md, "Format detection").

    When ``split`` names a sub-folder of a folder ``source``, that split folder (what is read) is examined.

    * a glob/brace pattern, or a URL ending in ``.tar`` -> "webdataset";
    * a file: ``*.csv`` -> "csv", ``*.tsv``/``*.tab`` -> "tsv", ``*.jsonl``/``*.json`` -> "jsonl",
      ``*.parquet`` -> "parquet", ``*.tar``/``*.tar.gz``/``*.tgz`` -> "webdataset";
    * a folder written by ``save_to_disk`` (``state.json`` / ``dataset_dict.json``) -> "disk";
    * a folder with ``*.tar`` shards (directly or one level down) -> "webdataset";
    * a folder with a ``metadata.jsonl``/``metadata.csv``/``metadata.parquet`` (directly or one level down)
      -> "imagefolder", also when its images sit in sub-folders;
    * a folder with at least two image sub-folders (``root/<class>/``, ``root/<split>/<class>/``) and no
      metadata file -> "classfolder";
    * a path that does not exist: a Hub id (`looks_like_hub_id`: ``name`` or ``owner/name``) -> "hub", anything
      else -> `FileNotFoundError` naming it.

    A folder that fits several formats (shards next to an image folder or class folders) is refused with a
    `ValueError` that lists the candidates; so is a folder that fits none.
    """
    source = os.fspath(source)
    if split is not None and (Path(source) / split).is_dir() and not _is_saved_dataset(Path(source)):
        source = os.path.join(source, split)
    if any(character in source for character in _PATTERN_CHARACTERS):
        return "webdataset"
    if "://" in source:
        if _is_shard_path(source.lower()):
            return "webdataset"
        raise ValueError(f"Cannot tell the format of the URL {source}: pass format= (shard URLs end in .tar)")
    path = Path(source)
    if path.is_file():
        lower = path.name.lower()
        if lower.endswith(".csv"):
            return "csv"
        if lower.endswith((".tsv", ".tab")):
            return "tsv"
        if lower.endswith((".jsonl", ".json")):
            return "jsonl"
        if lower.endswith(".parquet"):
            return "parquet"
        if _is_shard_path(lower):
            return "webdataset"
        raise ValueError(
            f"Cannot tell the format of the file {source}: expected .csv, .tsv, .jsonl, .parquet or .tar; pass format="
        )
    if path.is_dir():
        return _detect_folder_format(path, source)
    if looks_like_hub_id(source):
        return "hub"
    where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
    hint = ""
    if _HUB_ID.fullmatch(source) and not source.lower().endswith(LOCAL_FILE_EXTENSIONS):
        hint = "; to load a Hub dataset of that name anyway, pass format='hub'"
    raise FileNotFoundError(f"No such file or folder: {source!r}{where}{hint}")


def _column_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)  # features unknown (e.g. a generator): look at one record
    if first is None:
        raise ValueError("The dataset is empty")
    return list(first)


def _find_column(columns: Sequence[str], requested: str | None, candidates: Sequence[str], what: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"The {what} column {requested!r} is not among the dataset's columns {list(columns)}")
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    lowered = {column.lower(): column for column in columns}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    raise ValueError(f"Cannot find the {what} column among {list(columns)}: pass {what}_column=")


def _resolve_image_paths(batch: dict[str, list[Any]], column: str, base_dir: str) -> dict[str, list[Any]]:
    resolved = []
    for value in batch[column]:
        if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
            resolved.append(None)
            continue
        value = str(value).strip()
        if "://" not in value and not os.path.isabs(value):
            value = os.path.normpath(os.path.join(base_dir, value))
        resolved.append({"bytes": None, "path": value})
    return {column: resolved}


def _rename(
    dataset: datasets.Dataset | datasets.IterableDataset, old: str, new: str, columns: Sequence[str]
) -> datasets.Dataset | datasets.IterableDataset:
    if old == new:
        return dataset
    if new in columns:
        raise ValueError(
            f"Cannot rename the selected column {old!r} to {new!r}: the dataset already has a different {new!r} "
            "column. Rename or remove it first."
        )
    return dataset.rename_column(old, new)


def _undecoded_image_column(
    dataset: datasets.Dataset | datasets.IterableDataset, image_column: str, image_base_dir: str | os.PathLike | None
) -> datasets.Dataset | datasets.IterableDataset:
    """Make ``image_column`` an undecoded `datasets.Image`; paths are resolved against ``image_base_dir`` if given."""
    features = dataset.features
    feature = features.get(image_column) if features is not None else None
    if image_base_dir is not None and not isinstance(feature, (datasets.Image, dict)):
        new_features = None
        if features is not None:
            new_features = features.copy()
            new_features[image_column] = IMAGE_FEATURE
        return dataset.map(
            _resolve_image_paths,
            batched=True,
            fn_kwargs={"column": image_column, "base_dir": os.path.abspath(image_base_dir)},
            features=new_features,
        )
    castable = isinstance(feature, datasets.Value) and feature.dtype in (
        "string",
        "large_string",
        "binary",
        "large_binary",
    )
    if isinstance(feature, datasets.Image) or castable:
        return dataset.cast_column(image_column, IMAGE_FEATURE)
    return dataset


def _has_candidate(columns: Sequence[str], candidates: Sequence[str]) -> bool:
    lowered = {column.lower() for column in columns}
    return any(candidate in columns or candidate in lowered for candidate in candidates)


def prepare_image_text_columns(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
    image_base_dir: str | os.PathLike | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Give a dataset the canonical ``image`` (undecoded `datasets.Image`) and ``text`` columns.

    Args:
        dataset: any image-text dataset.
        image_column: the column holding images or image paths; detected from `IMAGE_COLUMN_CANDIDATES` if None.
        text_column: the caption column; detected from `TEXT_COLUMN_CANDIDATES` if None.
        image_base_dir: when given, the image column holds paths relative to this folder (CSV/JSONL sources).

    Returns:
        The dataset with ``image`` and ``text`` columns; other columns are kept.
    """
    columns = _column_names(dataset)
    features = dataset.features
    if (
        text_column is None
        and features is not None
        and isinstance(features.get("label"), datasets.ClassLabel)
        and not _has_candidate(columns, TEXT_COLUMN_CANDIDATES)
    ):
        raise _no_captions_error(f"The dataset with columns {columns}")
    image_column = _find_column(columns, image_column, IMAGE_COLUMN_CANDIDATES, "image")
    text_column = _find_column(columns, text_column, TEXT_COLUMN_CANDIDATES, "text")
    dataset = _undecoded_image_column(dataset, image_column, image_base_dir)
    dataset = _rename(dataset, image_column, "image", columns)
    return _rename(dataset, text_column, "text", [c if c != image_column else "image" for c in columns])


def _no_label_column_error(columns: Sequence[str], source: Any, split: str | None) -> ValueError:
    where = f"{source}" + (f" (split {split})" if split else "")
    message = (
        f"{where} has no label column: classification needs one (detected: {'/'.join(LABEL_COLUMN_CANDIDATES)}), "
        f"and its columns are {list(columns)}. Pass label_column= (--label-column / --label_column) naming the "
        "column that holds each image's class."
    )
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source) / split if split and (Path(source) / split).is_dir() else Path(source)
        classes = _class_names_of(folder_layout(folder)["class_folders"])
        if len(classes) >= 2:
            message += (
                f" Its sub-folders look like class folders ({_some(classes, 5)}): to take the folder names as the "
                "classes, pass format='classfolder' (--format classfolder)."
            )
    return ValueError(message)


def prepare_classification_columns(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    image_base_dir: str | os.PathLike | None = None,
    source: Any = "The dataset",
    split: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Give a dataset the canonical ``image`` (undecoded `datasets.Image`) and ``label`` columns.

    The label column is ``label_column``, else the first of `LABEL_COLUMN_CANDIDATES` present; without one this
    raises a `ValueError` naming the columns found (and suggesting ``format="classfolder"`` when ``source`` is a
    folder whose sub-folders look like class folders). A different column named ``label`` is dropped. The labels
    themselves are left as they are: `prepare_labels` turns them into a `ClassLabel`.
    """
    columns = _column_names(dataset)
    image_column = _find_column(columns, image_column, IMAGE_COLUMN_CANDIDATES, "image")
    if label_column is not None:
        if label_column not in columns:
            raise ValueError(f"The label column {label_column!r} is not among the dataset's columns {columns}")
    else:
        lowered = {column.lower(): column for column in columns}
        found = [lowered[name] for name in LABEL_COLUMN_CANDIDATES if name in lowered]
        if not found:
            raise _no_label_column_error(columns, source, split)
        label_column = found[0]
    dataset = _undecoded_image_column(dataset, image_column, image_base_dir)
    dataset = _rename(dataset, image_column, "image", columns)
    if label_column != "label":
        if "label" in columns:
            dataset = dataset.remove_columns("label")
        dataset = dataset.rename_column(label_column, "label")
    return dataset


def _imagefolder_files(root: str, split: str | None) -> dict[str, Any]:
    # A split folder is read on its own: with data_dir alone, datasets lists and prepares every split.
    split_dir = Path(root) / split if split is not None else None
    if split_dir is not None and split_dir.is_dir():
        return {"data_files": {split: [str(split_dir / "**")]}}
    return {"data_dir": root}


def _to_iterable(dataset: datasets.Dataset) -> datasets.IterableDataset:
    # Several shards, so that DataLoader workers each get a part of the data.
    return dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 64)))


_DATASET_OBJECTS = (datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict, datasets.IterableDatasetDict)


def _task_columns(
    dataset: datasets.Dataset | datasets.IterableDataset,
    task: str,
    *,
    image_column: str | None,
    text_column: str | None,
    label_column: str | None,
    image_base_dir: str | os.PathLike | None = None,
    source: Any = "The dataset",
    split: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    if task == "image-text":
        return prepare_image_text_columns(
            dataset, image_column=image_column, text_column=text_column, image_base_dir=image_base_dir
        )
    if task == "captions":  # a caption table needs no image column (tokenizer training)
        columns = _column_names(dataset)
        return _rename(dataset, _find_column(columns, text_column, TEXT_COLUMN_CANDIDATES, "text"), "text", columns)
    return prepare_classification_columns(
        dataset,
        image_column=image_column,
        label_column=label_column,
        image_base_dir=image_base_dir,
        source=source,
        split=split,
    )


def load_dataset(
    source: str | os.PathLike | datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict,
    *,
    format: str = "auto",
    task: str = "image-text",
    split: str | None = None,
    streaming: bool = False,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a dataset for pre-training, evaluation or fine-tuning: the one loader of the project.

    ``format="auto"`` decides with `detect_format` (the same rules for every task). Formats:

    * ``"imagefolder"``: a folder of images with ``metadata.jsonl`` / ``metadata.csv`` / ``metadata.parquet``
      holding ``file_name`` and caption or label columns (images may sit in sub-folders); split sub-folders
      (``train/``, ``validation/``, ``test/``) become splits, and a split folder is read on its own.
    * ``"csv"``, ``"tsv"``, ``"jsonl"``, ``"parquet"``: a table of image paths (relative to the table's folder, or
      absolute) and captions or labels. TSV is read without quote handling, as CC3M-style files need.
    * ``"webdataset"``: tar shards as img2dataset writes them (``<key>.jpg``/``.png`` + ``<key>.txt`` and
      ``<key>.json``): a shard, a glob/brace pattern, or a folder (sub-folders are splits). Here
      ``image_column``/``text_column`` name the member extensions. Image-text only.
    * ``"classfolder"``: ``root/<class_name>/*.png`` or ``root/<split>/<class_name>/*`` (metadata files ignored);
      ``label`` is a `datasets.ClassLabel` over the sorted folder names. Classification only: class folders carry
      no captions.
    * ``"disk"``: a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder.
    * ``"hub"``: a Hub dataset id, loaded with `datasets.load_dataset`. With ``format="auto"`` only a missing
      path that looks like ``name`` or ``owner/name`` is one (`looks_like_hub_id`); a missing local-looking path
      is a `FileNotFoundError` naming it.
    * a `datasets.Dataset` / `IterableDataset` / `DatasetDict` object is used as it is.

    Images are left undecoded (``datasets.Image(decode=False)``); the collators decode them and skip bad ones.

    Args:
        source: path, pattern, Hub id or datasets object.
        format: one of `FORMATS`.
        task: ``"image-text"`` (canonical ``image`` + ``text`` columns) or ``"classification"`` (canonical
            ``image`` + ``label``; pass the result to `prepare_labels` for a `ClassLabel` and the class names), or
            ``"captions"`` (a canonical ``text`` column, no image needed: caption-only tables for a tokenizer).
        split: split to return; None picks the only split and raises if there are several.
        streaming: return a lazily read `datasets.IterableDataset`.
        image_column: column with the image or image path (detected from `IMAGE_COLUMN_CANDIDATES` when None).
        text_column: caption column, image-text and captions tasks (detected from `TEXT_COLUMN_CANDIDATES` when None).
        label_column: label column, classification task (``label`` when None; without one, an error naming the
            columns found).
        cache_dir: datasets cache folder (defaults to datasets' own).

    Returns:
        A `datasets.Dataset`, or a `datasets.IterableDataset` when streaming; other columns are kept.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: an unknown format or task, a layout that fits several formats or none, class folders for the
            image-text task, a missing column.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}; expected one of {FORMATS}")
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}")
    columns = {"image_column": image_column, "text_column": text_column, "label_column": label_column}
    if isinstance(source, _DATASET_OBJECTS):
        dataset = pick_split(source, split, "The dataset")
        if streaming and isinstance(dataset, datasets.Dataset):
            dataset = _to_iterable(dataset)
        return _task_columns(dataset, task, **columns)
    source = os.fspath(source)
    path = Path(source)
    if split is not None and path.is_dir() and not _is_saved_dataset(path) and _is_saved_dataset(path / split):
        source, path, split = str(path / split), path / split, None  # a saved dataset per split folder
    kind = detect_format(source, split=split) if format == "auto" else format
    if kind == "classfolder":
        if task in ("image-text", "captions"):
            raise _no_captions_error(source)
        if label_column not in (None, "label"):
            raise ValueError(
                f"Class folders have one label column, 'label' (the folder names); label_column={label_column!r} "
                "does not apply to them"
            )
        dataset, class_names = load_class_folder_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
        if len(class_names) < 2:
            logger.warning("%s holds %d class folder(s): %s", source, len(class_names), class_names)
        return dataset
    if kind == "webdataset":
        if task == "classification":
            raise ValueError(
                f"Webdataset shards ({source}) are read for the image-text task only; for classification use an "
                "image folder with a label column, class folders, a table or a saved dataset"
            )
        return _load_webdataset(source, split, streaming, cache_dir, image_column, text_column)
    if kind == "disk":
        if not path.is_dir():
            raise FileNotFoundError(f"No such save_to_disk folder: {source}")
        dataset = pick_split(datasets.load_from_disk(source), split, source)
        if streaming:
            dataset = _to_iterable(dataset)
        return _task_columns(dataset, task, source=source, split=split, **columns)
    if kind == "imagefolder":
        if not path.exists():
            raise FileNotFoundError(f"No such image folder: {source}")
        if not path.is_dir():
            raise NotADirectoryError(f"An imagefolder source must be a folder: {source}")
        loaded = datasets.load_dataset(
            "imagefolder", **_imagefolder_files(source, split), split=split, streaming=streaming, cache_dir=cache_dir
        )
        dataset = pick_split(loaded, split, source)
        return _task_columns(dataset, task, source=source, split=split, **{**columns, "image_column": "image"})
    if kind in TABLE_FORMATS:
        if not path.is_file():
            raise FileNotFoundError(f"No such {kind.upper()} file: {source}")
        name = split or "train"
        options: dict[str, Any] = {}
        if kind in ("csv", "tsv"):
            # Only empty cells are missing: a caption reading "NA" or "null" stays text.
            options = {"keep_default_na": False, "na_values": [""]}
            if kind == "tsv":
                options.update(delimiter="\t", quoting=3)  # csv.QUOTE_NONE
        builder = {"jsonl": "json", "tsv": "csv"}.get(kind, kind)
        dataset = datasets.load_dataset(
            builder, data_files={name: source}, split=name, streaming=streaming, cache_dir=cache_dir, **options
        )
        return _task_columns(dataset, task, image_base_dir=path.parent, source=source, split=split, **columns)
    loaded = datasets.load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
    return _task_columns(pick_split(loaded, split, source), task, source=source, split=split, **columns)


def load_image_text_dataset(
    source: str | os.PathLike | datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict,
    *,
    format: str = "auto",
    image_column: str | None = None,
    text_column: str | None = None,
    split: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Image-text pairs with canonical ``image`` and ``text`` columns: ``load_dataset(source, task="image-text",
    ...)`` (see `load_dataset` for the formats). Class folders are refused: they carry no captions."""
    return load_dataset(
        source,
        format=format,
        task="image-text",
        split=split,
        streaming=streaming,
        image_column=image_column,
        text_column=text_column,
        cache_dir=cache_dir,
    )


def class_name_from_folder(folder_name: str) -> str:
    """Readable class name of a class folder: underscores become spaces (``"ankle_boot" -> "ankle boot"``)."""
    return folder_name.replace("_", " ")


def load_class_folder_dataset(
    root: str | os.PathLike,
    *,
    split: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, list[str]]:
    """Load ``root/<class_name>/*.png`` (or ``root/<split>/<class_name>/*``) for classification.

    Metadata files in the tree are ignored, so a captioned image folder whose images sit in class sub-folders
    (as `processing/fashion_mnist.py` writes it) also loads as class folders; ``format="auto"`` reads such a folder
    as an image folder (it has a metadata file), so ask for class folders with ``format="classfolder"``.

    Returns:
        The dataset with ``image`` (undecoded) and ``label`` (a `datasets.ClassLabel` over the sorted folder
        names) columns, and the readable class names in label order (see `class_name_from_folder`).
    """
    root = os.fspath(root)
    if not Path(root).is_dir():
        raise NotADirectoryError(f"A class-folder source must be a folder: {root}")
    loaded = datasets.load_dataset(
        "imagefolder",
        **_imagefolder_files(root, split),
        metadata_filenames=[_NO_METADATA],
        drop_labels=False,
        split=split,
        streaming=streaming,
        cache_dir=cache_dir,
    )
    dataset = pick_split(loaded, split, root).cast_column("image", IMAGE_FEATURE)
    label_feature = dataset.features["label"]
    return dataset, [class_name_from_folder(name) for name in label_feature.names]


def _is_labelled(value: Any) -> bool:
    return value is not None and value != "" and not (isinstance(value, int) and value < 0)


def _labelled(labels: list[Any]) -> list[bool]:
    return [_is_labelled(value) for value in labels]


def prepare_labels(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    require_class_names: bool = False,
) -> tuple[datasets.Dataset | datasets.IterableDataset, list[str]]:
    """Turn the labels of a classification dataset into a `datasets.ClassLabel` ``label`` column.

    The step after ``load_dataset(..., task="classification")``. Records with a missing, empty or negative label
    are dropped (with a warning). Labels may be a `ClassLabel` (renamed by ``class_names`` when given, which must
    be as many), strings (encoded in sorted order) or integers (named by ``class_names``, else by their number,
    unless ``require_class_names``, which makes that an error: zero-shot prompts need real names). A streamed
    dataset needs a `ClassLabel` (its names cannot be collected without reading it all).

    Args:
        dataset: a dataset with the label column.
        label_column: the column with the labels, renamed to ``label`` (a different ``label`` column is dropped).
        class_names: names in label order, for integer labels (or to rename a `ClassLabel`'s classes).
        require_class_names: refuse integer labels that have no names.

    Returns:
        The dataset and the readable class names in label order (underscores become spaces, as in class folders).
    """
    columns = _column_names(dataset)
    if label_column not in columns:
        raise ValueError(f"The label column {label_column!r} is not among the dataset's columns {columns}")
    if label_column != "label":
        if "label" in columns:
            dataset = dataset.remove_columns("label")
        dataset = dataset.rename_column(label_column, "label")
    feature = dataset.features["label"] if dataset.features is not None else None
    if isinstance(dataset, datasets.IterableDataset):
        if not isinstance(feature, datasets.ClassLabel):
            raise ValueError(
                "The labels of a streamed dataset must be a ClassLabel (their names cannot be collected without "
                "reading the whole dataset): load it with streaming=False"
            )
        dataset = dataset.filter(_labelled, input_columns="label", batched=True)
    else:
        before = len(dataset)
        dataset = dataset.filter(_labelled, input_columns="label", batched=True)
        if len(dataset) < before:
            logger.warning("Dropped %d record(s) without a label", before - len(dataset))
    if isinstance(feature, datasets.ClassLabel):
        if class_names is not None:
            if len(class_names) != feature.num_classes:
                raise ValueError(f"{len(class_names)} class names given for {feature.num_classes} classes")
            dataset = dataset.cast_column("label", datasets.ClassLabel(names=list(class_names)))
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        dataset = dataset.class_encode_column("label")
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        num_classes = max(dataset["label"], default=-1) + 1
        if class_names is None and require_class_names:
            raise ValueError("The labels are plain integers without class names: pass the class names (--class-names)")
        if class_names is None:
            class_names = [str(index) for index in range(num_classes)]
        elif len(class_names) < num_classes:
            raise ValueError(f"Label {num_classes - 1} occurs but only {len(class_names)} class names were given")
        dataset = dataset.cast_column("label", datasets.ClassLabel(names=list(class_names)))
    else:
        raise ValueError(f"The label column must hold class ids or class names, not {feature}")
    return dataset, [class_name_from_folder(name) for name in dataset.features["label"].names]


# --------------------------------------------------------------------------------------------------------------------
# Writing webdataset shards
# --------------------------------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: str | os.PathLike, *, overwrite: bool, owned: Sequence[str]) -> Path:
    """Make sure ``output_dir`` can receive new output without silently replacing anything a user saved.

    A missing folder is created and an empty one is used. A non-empty folder raises `FileExistsError` unless
    ``overwrite`` is set; then only the entries matching the glob patterns in ``owned`` (what this tool writes)
    are deleted and everything else is left alone.
    """
    import shutil

    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"The output {path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    if not any(path.iterdir()):
        return path
    if not overwrite:
        raise FileExistsError(f"The output folder {path} is not empty; pass --overwrite (overwrite=True) to replace it")
    for pattern in owned:
        for entry in path.glob(pattern):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return path


class WebDatasetShardWriter:
    """Write samples into img2dataset-layout shards ``000000.tar, 000001.tar, ...``.

    Each sample becomes ``<key>.<image extension>``, ``<key>.txt`` (the caption) and ``<key>.json`` (the caption,
    the key and any metadata). Keys are the 5-digit shard index followed by the index within the shard. Member
    times and owners are fixed, so the same samples give byte-identical shards. A shard is written under a
    ``.partial`` name and renamed when complete, so a crash never leaves a truncated ``.tar`` behind.
    """

    def __init__(self, output_dir: str | os.PathLike, *, samples_per_shard: int = 10000) -> None:
        """Configure the writer (the folder is created if needed).

        Args:
            output_dir: where the shards go.
            samples_per_shard: samples in every shard but the last.
        """
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.shards: list[Path] = []
        self.num_samples = 0
        self._key_digits = len(str(samples_per_shard - 1))
        self._archive: tarfile.TarFile | None = None
        self._partial_path: Path | None = None
        self._in_shard = 0

    def __enter__(self) -> "WebDatasetShardWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        info.uname = info.gname = ""
        self._archive.addfile(info, io.BytesIO(data))

    def _finish_shard(self) -> None:
        if self._archive is None:
            return
        self._archive.close()
        final_path = self._partial_path.with_suffix("")  # "000000.tar.partial" -> "000000.tar"
        os.replace(self._partial_path, final_path)
        self.shards.append(final_path)
        self._archive = None

    def write(
        self,
        image_bytes: bytes,
        image_extension: str,
        caption: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Append one sample and return its key."""
        extension = image_extension.lower().lstrip(".")
        if extension not in IMAGE_EXTENSIONS:
            raise ValueError(f"Unsupported image extension {image_extension!r}; expected one of {IMAGE_EXTENSIONS}")
        if self._archive is None or self._in_shard >= self.samples_per_shard:
            self._finish_shard()
            self._partial_path = self.output_dir / f"{len(self.shards):06d}.tar.partial"
            self._archive = tarfile.open(self._partial_path, "w")
            self._in_shard = 0
        key = f"{len(self.shards):05d}{self._in_shard:0{self._key_digits}d}"
        record = {"key": key, "caption": caption}
        record.update({name: value for name, value in (metadata or {}).items() if name not in ("key", "caption")})
        self._add_member(f"{key}.{extension}", image_bytes)
        self._add_member(f"{key}.txt", caption.encode("utf-8"))
        self._add_member(f"{key}.json", json.dumps(record, sort_keys=True, default=str).encode("utf-8"))
        self._in_shard += 1
        self.num_samples += 1
        return key

    def close(self) -> list[Path]:
        """Finish the current shard and return all shard paths."""
        self._finish_shard()
        return self.shards


_PIL_FORMAT_TO_EXTENSION = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}
_EXTENSION_TO_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _raw_image_bytes(value: Any) -> bytes | None:
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)) and "://" not in os.fspath(value):
        with open(value, "rb") as handle:
            return handle.read()
    return None


def _json_safe_metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if isinstance(record.get("json"), Mapping):
        metadata.update(record["json"])
    for name, value in record.items():
        if name in ("image", "text", "json") or name.startswith("__"):
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # e.g. a decoded image in a second column: not metadata
        metadata[name] = value
    return metadata


def write_webdataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    output_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 10000,
    image_format: str = "keep",
    jpeg_quality: int = 95,
    overwrite: bool = False,
    stats: DataStats | None = None,
) -> list[Path]:
    """Write a canonical image-text dataset (``image``/``text`` columns) as img2dataset-layout tar shards.

    Records with an empty caption or an undecodable image are skipped and counted in `stats`. Other columns go
    into each sample's ``.json``.

    Args:
        dataset: output of `load_image_text_dataset`.
        output_dir: folder for the shards; must be empty unless ``overwrite`` (which deletes only old ``*.tar``).
        samples_per_shard: samples per shard.
        image_format: "keep" stores the original bytes (an image whose format differs from the first image's is
            re-encoded to it, so every sample has the same extension, as loaders expect); "jpg" or "png" stores
            every image in that format (re-encoding only images in another format).
        jpeg_quality: quality for JPEG re-encoding.
        overwrite: allow a non-empty output folder.
        stats: counters to update (a new `DataStats` when omitted).

    Returns:
        The shard paths.
    """
    if image_format not in ("keep", "jpg", "png"):
        raise ValueError(f"image_format must be 'keep', 'jpg' or 'png', got {image_format!r}")
    stats = stats if stats is not None else DataStats()
    prepare_output_dir(output_dir, overwrite=overwrite, owned=("*.tar", "*.tar.partial"))
    target = None if image_format == "keep" else image_format
    seen = kept = corrupt_image = empty_caption = reencoded = 0
    with WebDatasetShardWriter(output_dir, samples_per_shard=samples_per_shard) as writer:
        for record in dataset:
            seen += 1
            caption = extract_caption(record, "text", "first")
            if caption is None:
                empty_caption += 1
                stats.log_skip("empty caption", _describe_image(record.get("image")))
                continue
            try:
                image = decode_image(record.get("image"))
                raw = _raw_image_bytes(record.get("image"))
                source_format = Image.open(io.BytesIO(raw)).format if raw is not None else None
            except Exception as error:  # skip and count, never end the run
                corrupt_image += 1
                stats.log_skip("corrupt image", f"{_describe_image(record.get('image'))}: {error!r}")
                continue
            extension = _PIL_FORMAT_TO_EXTENSION.get(source_format)
            if target is None:
                target = extension if extension in _EXTENSION_TO_PIL_FORMAT else "png"
            if extension != target:
                buffer = io.BytesIO()
                options = {"quality": jpeg_quality} if target == "jpg" else {}
                image.save(buffer, format=_EXTENSION_TO_PIL_FORMAT[target], **options)
                raw = buffer.getvalue()
                reencoded += 1
            writer.write(raw, target, caption, _json_safe_metadata(record))
            kept += 1
    if reencoded:
        logger.info("Re-encoded %d images to %s so that every sample has the same extension", reencoded, target)
    stats.add(seen=seen, kept=kept, skipped_corrupt_image=corrupt_image, skipped_empty_caption=empty_caption)
    return writer.shards
