"""Collators that decode and skip: image-text pairs (`ImageTextCollator`) and labelled images
(`ImageClassificationCollator`).
"""

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from transformers.image_processing_base import ImageProcessingMixin

from .records_msclip import (
    CORRUPT_IMAGE,
    EMPTY_CAPTION,
    SAMPLE_KEYS,
    DataStats,
    decode_image,
    describe_image,
    describe_record,
    extract_caption,
    record_name,
)
from .transforms_msclip import as_image_transform, seeded_global_rng

CLIP_CONTEXT_LENGTH = 77


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
        return seeded_global_rng(hash((self.augmentation_seed, self.epoch, int(record[INDEX_KEY]))))

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
                self.stats.log_skip("corrupt image", f"{describe_image(record.get(self.image_column))}: {error!r}")
                continue
            pixel_values.append(pixels)
            labels.append(int(record[self.label_column]))
        self.stats.add(seen=len(records), kept=len(labels), skipped_corrupt_image=len(records) - len(labels))
        return {
            "pixel_values": torch.stack(pixel_values) if pixel_values else _empty_pixel_values(self.image_transform),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
