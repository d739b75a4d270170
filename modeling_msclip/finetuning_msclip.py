"""Image-classification fine-tuning of MS-CLIP with the plain transformers `Trainer`.

`training/run_finetune_classification.py` owns the command line and the run; the pieces it assembles live here. The
model is `MSClipForImageClassification`: the vision tower of an MS-CLIP checkpoint (with its
share of the block stack) and a linear head on the class token. Optionally the head starts as the zero-shot
classifier built from the text embeddings of the class names (``--init_head_from_text``).

Accuracy is computed here with numpy. The `evaluate` library is no dependency of this project, and where it is
installed ``evaluate.load("accuracy")`` takes the metric's code from the Hugging Face Hub (or its cache), so it fails
on machines without Hub access; the definition is the same (fraction of argmax predictions equal to the label).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import EvalPrediction, TrainerCallback

from .configuration_msclip import MSClipConfig
from .data_msclip import load_dataset, prepare_labels
from .encoding_msclip import encode_images
from .evaluation_msclip import DEFAULT_TEMPLATES, build_zero_shot_classifier
from .loss_msclip import logit_scale_exp
from .modeling_msclip import MSClipForImageClassification, MSClipModel
from .pretraining_msclip import apply_patch_dropout
from .processing_msclip import image_processor_only
from .records_msclip import DataStats, decode_image, images_decodable

logger = logging.getLogger(__name__)

STAGE_KEY = "__stage__"
# Images encoded to calibrate the scale of a text-initialised head.
HEAD_CALIBRATION_IMAGES = 64


# --------------------------------------------------------------------------------------------------------------------
# Labelled data
# --------------------------------------------------------------------------------------------------------------------


def load_classification_dataset(
    source: str | os.PathLike | datasets.Dataset,
    *,
    split: str | None = None,
    format: str = "auto",
    image_column: str | None = None,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    require_class_names: bool = False,
) -> tuple[datasets.Dataset, list[str]]:
    """Labelled images with canonical ``image`` (undecoded) and ``label`` (`datasets.ClassLabel`) columns.

    ``data_msclip.load_dataset(source, task="classification", ...)`` (every format of docs/data.md, detected by
    the one set of rules) followed by ``data_msclip.prepare_labels`` (ClassLabel, class names, records with a
    missing or negative label dropped).

    Returns:
        The dataset and the readable class names in label order (folder underscores become spaces).
    """
    dataset = load_dataset(
        source, format=format, task="classification", split=split, image_column=image_column, label_column=label_column
    )
    return prepare_labels(dataset, class_names=class_names, require_class_names=require_class_names)


def align_labels(dataset: datasets.Dataset, reference: datasets.Dataset) -> datasets.Dataset:
    """Renumber ``dataset``'s labels to ``reference``'s class order (by class name); unknown classes raise."""
    names, reference_names = dataset.features["label"].names, reference.features["label"].names
    if names == reference_names:
        return dataset
    unknown = sorted(set(names) - set(reference_names))
    if unknown:
        raise ValueError(f"The evaluation data has classes the training data lacks: {unknown}")
    new_ids = np.array([reference_names.index(name) for name in names])
    features = dataset.features.copy()
    features["label"] = datasets.ClassLabel(names=list(reference_names))
    return dataset.map(
        lambda labels: {"label": new_ids[np.asarray(labels, dtype=np.int64)].tolist()},
        input_columns="label",
        batched=True,
        features=features,
    )


def drop_unreadable_images(dataset: datasets.Dataset, stats: DataStats) -> datasets.Dataset:
    """Remove records whose image cannot be decoded, counting them in ``stats`` as seen and skipped."""
    kept = dataset.filter(images_decodable, input_columns="image", batched=True)
    skipped = len(dataset) - len(kept)
    if skipped:
        logger.warning("Skipped %d record(s) with an unreadable image", skipped)
    # Every rank scans the whole dataset alike; counting on one keeps the summed totals right.
    if int(os.environ.get("RANK", "0")) == 0:
        stats.add(seen=skipped, skipped_corrupt_image=skipped)
    return kept


class StageTaggedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose records say whether they are for training or evaluation (``"__stage__"``).

    The plain `Trainer` has one collator for both; `StageCollator` reads the tag to pick the train or eval transform.
    """

    def __init__(self, dataset: Any, stage: str) -> None:
        self.dataset = dataset
        self.stage = stage

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], STAGE_KEY: self.stage}


class StageCollator:
    """Dispatch a batch to the collator of its stage (``"train"`` or ``"eval"``, see `StageTaggedDataset`)."""

    def __init__(self, collators: Mapping[str, Callable[[list[dict[str, Any]]], dict[str, Any]]]) -> None:
        self.collators = dict(collators)

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        stage = records[0].get(STAGE_KEY, "train") if records else "train"
        return self.collators[stage](records)


# --------------------------------------------------------------------------------------------------------------------
# Model, processor and head initialisation
# --------------------------------------------------------------------------------------------------------------------


def _label_maps(class_names: Sequence[str]) -> dict[str, Any]:
    return {
        "id2label": dict(enumerate(class_names)),
        "label2id": {name: index for index, name in enumerate(class_names)},
    }


def build_classification_model(
    class_names: Sequence[str],
    *,
    checkpoint: str | os.PathLike | None = None,
    preset: str | None = None,
    attn_implementation: str = "sdpa",
    patch_dropout: float | None = None,
) -> MSClipForImageClassification:
    """The vision tower of ``checkpoint`` (or a new model of ``preset``: exactly one of the two) with a head for
    ``class_names``. ``patch_dropout`` (``None``: the config's) sets the share of patches dropped while training.

    Raises:
        ValueError: when not exactly one of ``checkpoint`` and ``preset`` is given.
    """
    if bool(checkpoint) == bool(preset):
        raise ValueError("give exactly one of --model_name_or_path and --model_preset")
    labels = _label_maps(class_names)
    kwargs = {"attn_implementation": attn_implementation}
    if preset:
        config = MSClipConfig.from_preset(preset, **labels)
        apply_patch_dropout(config, patch_dropout)
        return MSClipForImageClassification._from_config(config, **kwargs)
    config = MSClipConfig.from_pretrained(checkpoint)
    if "MSClipForImageClassification" in (config.architectures or []) and config.num_labels != len(class_names):
        # A classifier of another label set: keep its vision tower, start a new head.
        kwargs["ignore_mismatched_sizes"] = True
    model, info = MSClipForImageClassification.from_pretrained(checkpoint, **labels, **kwargs, output_loading_info=True)
    not_loaded = sorted(key for key in info["missing_keys"] if not key.startswith("classifier."))
    if not_loaded:
        logger.warning("These vision weights are not in %s and start from scratch: %s", checkpoint, not_loaded)
    apply_patch_dropout(model.config, patch_dropout)
    if model.config.vision_config.patch_dropout and patch_dropout is None:
        logger.warning(
            "%s drops %.2f of the image patches while training (vision_config.patch_dropout); pass "
            "--patch_dropout 0 to fine-tune on whole images",
            checkpoint,
            model.config.vision_config.patch_dropout,
        )
    return model


@torch.no_grad()
def initialize_head_from_text(
    classifier: MSClipForImageClassification,
    clip_model: MSClipModel,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    calibration_pixel_values: torch.Tensor | None = None,
) -> float:
    """Set the head to the zero-shot classifier of ``clip_model`` (the CLIP prompt-ensembling trick).

    With ``T`` the unit-norm prompt-ensembled class embeddings ``[C, P]`` and ``V`` the visual projection ``[P, H]``
    (``e = V h`` is the image embedding of the pooled class token ``h``), the head becomes ``W = s T V``, ``b = 0``,
    so ``logits = s ||e|| cos(e, t_c)``: the zero-shot prediction for every image. ``s`` is the model's learned
    temperature ``exp(logit_scale)`` divided by the mean ``||e||`` of the calibration images, so typical logits
    have the size the contrastive training used.

    Returns:
        The scale ``s``.
    """
    projection = clip_model.projection_head.projection.for_modality("vision").weight
    text_classifier = build_zero_shot_classifier(clip_model, tokenizer, list(class_names), list(templates))
    scale = float(logit_scale_exp(clip_model.logit_scale.detach(), clip_model.config.logit_scale_max, torch.float32))
    if calibration_pixel_values is not None and len(calibration_pixel_values):
        image_embeds = encode_images(clip_model, None, calibration_pixel_values)
        scale /= float(image_embeds.norm(dim=-1).mean().clamp(min=1e-6))
    weight = scale * text_classifier.to(projection.dtype) @ projection.detach().cpu().to(text_classifier.dtype)
    classifier.classifier.weight.copy_(weight.to(classifier.classifier.weight))
    classifier.classifier.bias.zero_()
    return scale


# Where a classifier folder without a tokenizer names its image processor for ``trust_remote_code=True`` loading.
CLASSIFIER_IMAGE_PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing_msclip.MSClipImageProcessor"}


def finish_classifier_folder(folder: str | os.PathLike) -> None:
    """Make a saved classifier folder that has an image processor but no tokenizer load the same way everywhere.

    Such a folder (from ``--model_preset``, or a checkpoint without a tokenizer) has no ``processing_msclip.py``,
    so its ``preprocessor_config.json`` must not map ``AutoProcessor`` to it (an image processor loaded from a
    processor's ``processor_config.json`` carries that entry). Its ``auto_map`` and ``image_processor_type`` are
    moved out of ``preprocessor_config.json`` and ``config.json`` names ``AutoImageProcessor`` instead, because
    transformers' ``AutoVideoProcessor`` (which ``pipeline`` tries for every model) turns an ``AutoImageProcessor``
    entry of the image-processor file into a remote ``MSClipVideoProcessor`` and asks whether to run custom code,
    even with this package imported. After this:

    * with ``modeling_msclip`` imported, ``AutoImageProcessor``, ``AutoModelForImageClassification``,
      ``AutoProcessor`` (the image processor, see `MSClipProcessor.from_pretrained`) and
      ``pipeline("image-classification", model=folder)`` use the package's classes and ask nothing;
    * without it, the same calls with ``trust_remote_code=True`` load the copied ``*_msclip.py`` files.

    A folder with a tokenizer holds the whole processor (``processor_config.json`` and ``processing_msclip.py``)
    and is left as it is.
    """
    folder = Path(folder)
    image_config_path = folder / "preprocessor_config.json"
    if not image_config_path.is_file() or not image_processor_only(folder):
        return
    image_config = json.loads(image_config_path.read_text())
    image_config.pop("auto_map", None)
    image_config.pop("image_processor_type", None)
    image_config_path.write_text(json.dumps(image_config, indent=2, sort_keys=True) + "\n")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {**(config.get("auto_map") or {}), **CLASSIFIER_IMAGE_PROCESSOR_AUTO_MAP}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    source = Path(__file__).resolve().parent / "image_processing_msclip.py"
    if not (folder / source.name).is_file():
        shutil.copy(source, folder / source.name)


class ClassifierFolderCallback(TrainerCallback):
    """Applies `finish_classifier_folder` to every checkpoint the trainer saves (on the main process)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            finish_classifier_folder(Path(args.output_dir) / f"checkpoint-{state.global_step}")


# --------------------------------------------------------------------------------------------------------------------
# Metrics and callbacks
# --------------------------------------------------------------------------------------------------------------------


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and mean per-class recall of argmax predictions (classes absent from ``labels`` are left out).

    ``accuracy`` is what `evaluate`'s "accuracy" metric computes: the fraction of predictions equal to the label.
    """
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"expected logits [N, C] and labels [N], got {logits.shape} and {labels.shape}")
    if labels.size == 0:
        return {"accuracy": float("nan"), "mean_per_class_recall": float("nan")}
    correct = logits.argmax(axis=-1) == labels
    recalls = [correct[labels == label].mean() for label in np.unique(labels)]
    return {"accuracy": float(correct.mean()), "mean_per_class_recall": float(np.mean(recalls))}


def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """`Trainer` ``compute_metrics``: `classification_metrics` of the evaluation predictions."""
    return classification_metrics(eval_prediction.predictions, eval_prediction.label_ids)


class SkippedRecordsCallback(TrainerCallback):
    """Adds the counts of skipped records, summed over ranks, to the training log (``trainer_state.json``)."""

    def __init__(self, stats: Mapping[str, DataStats]) -> None:
        self.stats = dict(stats)

    def counts(self) -> dict[str, int]:
        """``{"<stage>_skipped_corrupt_image": n, ...}`` for every stage, summed over torch.distributed ranks.

        A collective call under torch.distributed: every rank must make it, in the same order.
        """
        return {
            f"{stage}_{key}": value
            for stage, stats in self.stats.items()
            for key, value in stats.as_dict(all_ranks=True).items()
            if key == "skipped_corrupt_image"
        }

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every rank joins the sum (the trainer calls its callbacks on every rank); only the main one logs it.
        counts = self.counts()
        if state.is_world_process_zero:
            state.log_history.append({f"data_{key}": value for key, value in counts.items()})


def calibration_pixels(
    dataset: datasets.Dataset, transform: Callable[[Any], torch.Tensor], limit: int = HEAD_CALIBRATION_IMAGES
) -> torch.Tensor:
    """The pixels of the first ``limit`` readable images of ``dataset``, to calibrate `initialize_head_from_text`."""
    pixels = []
    for record in dataset.select(range(min(limit, len(dataset)))):
        try:
            pixels.append(transform(decode_image(record["image"])))
        except Exception:  # unreadable images are only left out of the calibration
            continue
    return torch.stack(pixels) if pixels else torch.zeros(0)


__all__ = [
    "StageCollator",
    "StageTaggedDataset",
    "align_labels",
    "build_classification_model",
    "calibration_pixels",
    "classification_metrics",
    "compute_metrics",
    "drop_unreadable_images",
    "finish_classifier_folder",
    "initialize_head_from_text",
    "load_classification_dataset",
]
