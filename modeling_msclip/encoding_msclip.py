# Copyright 2025 The modeling_msclip authors. Licensed under the Apache License, Version 2.0.
"""Encoding for evaluation: texts and images through a model's feature getters (`encode_texts`, `encode_images`,
`encode_dataset_images`), and loading the model to evaluate (`load_model_and_processor`, a fine-tuned classifier's
vision features with `load_image_classifier_features`, `default_device`).

The encoders only need `model.get_text_features(...)` / `model.get_image_features(...)` returning an object with a
`.pooler_output` (transformers v5 convention), so they also work with `transformers.CLIPModel`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from transformers.image_processing_base import ImageProcessingMixin
from transformers.processing_utils import ProcessorMixin

from .metrics_msclip import default_device
from .records_msclip import decode_image

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Encoding texts and images
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch to eval() (BatchNorm and dropout matter in MS-CLIP) and no_grad, restoring the training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    dtype = parameter.dtype if parameter.is_floating_point() else torch.float32
    return parameter.device, dtype


def _pooled(output: Any) -> torch.Tensor:
    """`.pooler_output` of a v5 feature getter; a plain tensor (v4-style getter) is accepted as is."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"expected a BaseModelOutputWithPooling with a pooler_output, got {type(output).__name__}")
    return pooled


def split_processor(processor: Any) -> tuple[Any, Any]:
    """Return `(tokenizer, image_preprocessor)` from a processor, a `(tokenizer, image_preprocessor)` pair, or None.

    A processor (transformers `ProcessorMixin`) is split into its `.tokenizer` and `.image_processor`.
    """
    if processor is None:
        return None, None
    if isinstance(processor, (tuple, list)):
        if len(processor) != 2:
            raise ValueError("a processor given as a sequence must be (tokenizer, image_processor_or_transform)")
        return processor[0], processor[1]
    if not isinstance(processor, ProcessorMixin):
        raise TypeError(
            f"expected a transformers processor or a (tokenizer, image_processor_or_transform) pair, got "
            f"{type(processor).__name__}"
        )
    return getattr(processor, "tokenizer", None), getattr(processor, "image_processor", None)


def _is_hf_image_processor(obj: Any) -> bool:
    return isinstance(obj, ImageProcessingMixin)


def preprocess_images(preprocess: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """Preprocess PIL images with an HF image processor or a per-image callable returning a [3, H, W] tensor."""
    if preprocess is None:
        raise ValueError("images are not pixel tensors, so an image processor or transform is required")
    if _is_hf_image_processor(preprocess):
        return preprocess(images=list(images), return_tensors="pt")["pixel_values"]
    if not callable(preprocess):
        raise TypeError(f"image_processor_or_transform must be an image processor or a callable, got {preprocess!r}")
    return torch.stack([torch.as_tensor(preprocess(image)) for image in images])


def _image_preprocessor(image_processor_or_transform: Any) -> Any:
    if isinstance(image_processor_or_transform, ProcessorMixin):
        return image_processor_or_transform.image_processor
    return image_processor_or_transform


def _embed_pixel_batch(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    device, dtype = model_device_and_dtype(model)
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    return _pooled(model.get_image_features(pixel_values=pixel_values)).float().cpu()


def encode_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Encode texts with `model.get_text_features(...).pooler_output` (eval mode, no grad).

    Args:
        model: a model with `get_text_features(input_ids, attention_mask=None)`.
        tokenizer: a transformers tokenizer (or a processor, whose `.tokenizer` is used). Called with
            `padding=True, truncation=True` (truncation to the tokenizer's `model_max_length`).
        texts: the strings to encode.
        batch_size: texts per forward pass.

    Returns:
        `[len(texts), embed_dim]` float32 CPU tensor of *unnormalised* projected embeddings.
    """
    if isinstance(tokenizer, ProcessorMixin):
        tokenizer = tokenizer.tokenizer
    if tokenizer is None:
        raise ValueError("encode_texts needs a tokenizer")
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    if not texts:
        raise ValueError("encode_texts got no texts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device, _ = model_device_and_dtype(model)
    outputs = []
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            batch = [str(text) for text in texts[start : start + batch_size]]
            tokens = tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
            inputs = {"input_ids": tokens["input_ids"].to(device)}
            if tokens.get("attention_mask") is not None:
                inputs["attention_mask"] = tokens["attention_mask"].to(device)
            outputs.append(_pooled(model.get_text_features(**inputs)).float().cpu())
    return torch.cat(outputs)


def encode_images(
    model: torch.nn.Module,
    image_processor_or_transform: Any,
    images: Sequence[Any] | torch.Tensor,
    batch_size: int = 64,
) -> torch.Tensor:
    """Encode images with `model.get_image_features(pixel_values).pooler_output` (eval mode, no grad).

    Args:
        model: a model with `get_image_features(pixel_values)`.
        image_processor_or_transform: a transformers image processor (called on a list of PIL images with
            `return_tensors="pt"`), a processor (its `.image_processor` is used), a callable mapping one RGB PIL
            image to a `[3, H, W]` tensor, or None when `images` is already a `[N, 3, H, W]` pixel tensor.
        images: PIL images, paths, `datasets` image dicts or HWC uint8 arrays; or a pixel tensor.
        batch_size: images per forward pass.

    Returns:
        `[num_images, embed_dim]` float32 CPU tensor of *unnormalised* projected embeddings. An unreadable image
        raises a ValueError naming its index (the dataset-level `evaluate_*` functions skip and count those).
    """
    preprocess = _image_preprocessor(image_processor_or_transform)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(images) == 0:
        raise ValueError("encode_images got no images")
    outputs = []
    with eval_mode(model):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            if isinstance(batch, torch.Tensor):
                pixel_values = batch
            else:
                pil_images = []
                for offset, image in enumerate(batch):
                    try:
                        pil_images.append(decode_image(image))
                    except (OSError, ValueError, TypeError) as error:
                        raise ValueError(f"image {start + offset} cannot be read: {error}") from error
                pixel_values = preprocess_images(preprocess, pil_images)
            outputs.append(_embed_pixel_batch(model, pixel_values))
    return torch.cat(outputs)


def iter_rows(dataset: Iterable[Any]) -> Iterator[tuple[int, Any | None, Exception | None]]:
    """Yield `(index, row, error)`; a row that fails to load (e.g. a corrupt image file) is yielded with its error."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        for index in range(len(dataset)):
            try:
                yield index, dataset[index], None
            except Exception as error:  # noqa: BLE001 - any decoding failure of one record must not end the run
                yield index, None, error
    else:
        for index, row in enumerate(dataset):
            yield index, row, None


def encode_dataset_images(
    model: torch.nn.Module,
    preprocess: Any,
    dataset: Iterable[Any],
    image_column: str,
    extract: Callable[[Any], Any],
    batch_size: int,
) -> tuple[torch.Tensor | None, list[Any], int]:
    """Stream a dataset through the image encoder, keeping `extract(row)` for every used row.

    Rows whose image cannot be read or whose `extract` fails are skipped, logged and counted, so one corrupt file
    never ends an evaluation. Only one batch of decoded images is held in memory at a time.

    Returns:
        (`[num_used, embed_dim]` embeddings or None if no row was usable, extracted values, number skipped).
    """
    preprocess = _image_preprocessor(preprocess)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    embeds, extras, num_skipped = [], [], 0
    pending: list[Image.Image] = []
    with eval_mode(model):
        for index, row, error in iter_rows(dataset):
            try:
                if error is not None:
                    raise error
                image = decode_image(row[image_column])
                extra = extract(row)
            except Exception as skip_error:  # noqa: BLE001 - bad records are skipped and counted, never fatal
                num_skipped += 1
                logger.warning("skipping record %d: %s", index, skip_error)
                continue
            pending.append(image)
            extras.append(extra)
            if len(pending) == batch_size:
                embeds.append(_embed_pixel_batch(model, preprocess_images(preprocess, pending)))
                pending = []
        if pending:
            embeds.append(_embed_pixel_batch(model, preprocess_images(preprocess, pending)))
    if num_skipped:
        logger.warning("%d record(s) skipped", num_skipped)
    return (torch.cat(embeds) if embeds else None), extras, num_skipped


# ----------------------------------------------------------------------------------------------------------------------
# Loading the model to evaluate
# ----------------------------------------------------------------------------------------------------------------------


def is_image_classifier_checkpoint(model_dir: str | os.PathLike) -> bool:
    """Whether a saved folder is an `MSClipForImageClassification` (its config's ``architectures``)."""
    from .configuration_msclip import MSClipConfig

    return "MSClipForImageClassification" in (MSClipConfig.from_pretrained(model_dir).architectures or [])


def image_classifier_refusal(
    model_dir: str | os.PathLike, tasks: str = "zero-shot classification and retrieval"
) -> str:
    """Why a fine-tuned classifier cannot be evaluated on ``tasks``, and what to do instead."""
    return (
        f"{model_dir} is a fine-tuned image classifier (MSClipForImageClassification): it has a vision tower and a "
        f"classification head but no text tower or projection, so {tasks} cannot be evaluated with it (an "
        "MSClipModel loaded from it would start them from random weights). Its accuracy is the fine-tuning "
        "evaluation: eval_results.json of run_finetune_classification.py --eval_data (see docs/finetuning.md); "
        "evaluate the dual-encoder checkpoint it was fine-tuned from for zero-shot and retrieval; "
        "--linear_probe_train/--linear_probe_test fit a linear probe on its vision features."
    )


def load_model_and_processor(
    model_dir: str | os.PathLike, device: str | None = None, attn_implementation: str | None = None
) -> tuple[torch.nn.Module, Any]:
    """Load `MSClipModel` and `MSClipProcessor` from a saved directory with this package's own classes (no remote
    code), in eval mode on `device` (default: CUDA if available, else CPU).

    A fine-tuned `MSClipForImageClassification` folder, or any checkpoint that lacks weights of `MSClipModel`
    (they would start random: an evaluation of noise), is a ``ValueError``; see `load_image_classifier_features`
    for a classifier's vision features.
    """
    from .modeling_msclip import MSClipModel
    from .processing_msclip import MSClipProcessor

    if is_image_classifier_checkpoint(model_dir):
        raise ValueError(image_classifier_refusal(model_dir))
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model, info = MSClipModel.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(
            f"{model_dir} lacks {len(missing)} weight(s) of MSClipModel, which would start from random values "
            f"(e.g. {', '.join(missing[:3])}): it is no MS-CLIP dual-encoder checkpoint"
        )
    model.to(default_device(device)).eval()
    processor = MSClipProcessor.from_pretrained(model_dir)
    return model, processor


class ClassifierImageFeatures(torch.nn.Module):
    """The vision features of an `MSClipForImageClassification` behind ``get_image_features``: the pooled class
    token after the vision post-LayerNorm, the input of its head (no projection), for the linear probe."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def get_image_features(self, pixel_values: torch.Tensor) -> Any:
        return self.classifier.pooled_image_features(pixel_values)


def load_image_classifier_features(
    model_dir: str | os.PathLike, device: str | None = None, attn_implementation: str | None = None
) -> tuple[ClassifierImageFeatures, Any]:
    """A fine-tuned classifier's vision features (`ClassifierImageFeatures`, eval mode, on `device`) and its image
    processor, as ``(model, (None, image_processor))`` for `evaluate_linear_probe`."""
    from .image_processing_msclip import MSClipImageProcessor
    from .modeling_msclip import MSClipForImageClassification

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    classifier = MSClipForImageClassification.from_pretrained(model_dir, **kwargs)
    model = ClassifierImageFeatures(classifier).to(default_device(device)).eval()
    return model, (None, MSClipImageProcessor.from_pretrained(model_dir))
