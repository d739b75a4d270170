"""Records of image-text data: counting what is skipped (`DataStats`, shared across threads and processes), decoding
images and captions, and dropping bad records up front.
"""

import io
import logging
import math
import os
import tempfile
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

# One RGB conversion for training, evaluation and the processor (every PIL mode; see docs/data.md, "Image modes").
from .image_processing_msclip import convert_image_to_rgb

try:  # POSIX only; elsewhere `DataStats` is thread-safe but not process-safe.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None

logger = logging.getLogger(__name__)


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
    return describe_image(record.get(image_column))


def describe_image(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("path") or "<bytes>")
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return f"<{type(value).__name__}>"


def clean_caption_value(value: Any) -> str | None:
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
        candidates = [caption for caption in (clean_caption_value(item) for item in value) if caption]
        if not candidates:
            return None
        if choice == "random":
            return candidates[int(torch.randint(len(candidates), ()))]
        return candidates[0]
    return clean_caption_value(value)


# --------------------------------------------------------------------------------------------------------------------
# Filtering bad records up front
# --------------------------------------------------------------------------------------------------------------------


def _captions_present(batch: dict[str, list[Any]], text_column: str) -> list[bool]:
    size = len(next(iter(batch.values())))
    rows = [{key: values[index] for key, values in batch.items()} for index in range(size)]
    return [extract_caption(row, text_column) is not None for row in rows]


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
