"""Image-classification fine-tuning of MS-CLIP with the plain transformers `Trainer`.

`training/run_finetune_classification.py` only parses the command line and calls `run_finetuning`; everything
testable lives here. The model is `MSClipForImageClassification`: the vision tower of an MS-CLIP checkpoint (with its
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import (
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from .checkpointing_msclip import OutputArguments, attach_checkpointing, checkpoint_to_resume
from .configuration_msclip import MSClipConfig
from .data_msclip import (
    FORMATS,
    DataStats,
    EvalImageTransform,
    ImageClassificationCollator,
    TrainImageTransform,
    decode_image,
    images_decodable,
    load_dataset,
    prepare_labels,
    read_nonempty_lines,
)
from .evaluation_msclip import DEFAULT_TEMPLATES, build_zero_shot_classifier, encode_images
from .loss_msclip import logit_scale_exp
from .modeling_msclip import MSClipForImageClassification, MSClipModel
from .pretraining_msclip import CheckpointArguments, apply_patch_dropout, build_processor
from .processing_msclip import image_processor_only

logger = logging.getLogger(__name__)

STAGE_KEY = "__stage__"
# Images encoded to calibrate the scale of a text-initialised head.
HEAD_CALIBRATION_IMAGES = 64


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments(CheckpointArguments):
    """Which model to fine-tune (its vision tower; text-only weights are unused) and how its head starts."""

    init_head_from_text: bool = field(
        default=False,
        metadata={
            "help": "Start the classifier as the zero-shot classifier: class-name prompts embedded by the "
            "checkpoint's text tower (needs --model_name_or_path of an MS-CLIP dual encoder and a tokenizer)."
        },
    )
    prompt_templates: str | None = field(
        default=None,
        metadata={"help": "Text file of prompt templates, one per line with a {} placeholder (default: generic)."},
    )


@dataclass
class DataArguments:
    """Where the labelled images come from and how they are prepared."""

    train_data: str = field(
        metadata={
            "help": "Training images: class folders (root/<class>/*.png, or root/<split>/<class>/*), an image "
            "folder with a label column in metadata.jsonl, a CSV/TSV/JSONL/Parquet table, a save_to_disk folder or a "
            "Hub dataset (see docs/data.md)."
        }
    )
    eval_data: str | None = field(default=None, metadata={"help": "Evaluation images (same formats)."})
    train_split: str | None = field(default=None, metadata={"help": "Split of --train_data (e.g. train)."})
    eval_split: str | None = field(default=None, metadata={"help": "Split of --eval_data (e.g. test)."})
    format: str = field(
        default="auto",
        metadata={
            "help": f"Format of --train_data and --eval_data, one of {FORMATS}. auto detects it (docs/data.md); "
            "a folder with a metadata.jsonl is an image folder, so pass classfolder to read class sub-folders next "
            "to one (the Fashion-MNIST tree)."
        },
    )
    eval_format: str | None = field(default=None, metadata={"help": "Format of --eval_data (default: --format)."})
    data_format: str | None = field(default=None, metadata={"help": "Deprecated name of --format."})
    image_column: str | None = field(
        default=None, metadata={"help": "Image column of a table or datasets source (default: detected)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column (default: label; class folders: the folder names)."}
    )
    class_names: str | None = field(
        default=None,
        metadata={"help": "Text file of class names in label order, for integer labels without ClassLabel names."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation images."})
    no_augmentation: bool = field(default=False, metadata={"help": "Train on the evaluation transform."})
    crop_scale_min: float = field(
        default=0.08, metadata={"help": "Lower bound of the random-resized-crop area (as in ImageNet fine-tuning)."}
    )
    no_horizontal_flip: bool = field(default=False, metadata={"help": "Do not flip training images left-right."})
    skip_record_check: bool = field(
        default=False,
        metadata={"help": "Do not pre-scan for unreadable images (the collator still skips and counts them)."},
    )


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


def build_classification_model(model_args: ModelArguments, class_names: Sequence[str]) -> MSClipForImageClassification:
    """Load the vision tower of a checkpoint (or build a preset from scratch) with a head for ``class_names``."""
    if bool(model_args.model_name_or_path) == bool(model_args.model_preset):
        raise ValueError("give exactly one of --model_name_or_path and --model_preset")
    labels = _label_maps(class_names)
    kwargs = {"attn_implementation": model_args.attn_implementation}
    if model_args.model_preset:
        config = MSClipConfig.from_preset(model_args.model_preset, **labels)
        apply_patch_dropout(config, model_args.patch_dropout)
        return MSClipForImageClassification._from_config(config, **kwargs)
    source = model_args.model_name_or_path
    config = MSClipConfig.from_pretrained(source)
    if "MSClipForImageClassification" in (config.architectures or []) and config.num_labels != len(class_names):
        # A classifier of another label set: keep its vision tower, start a new head.
        kwargs["ignore_mismatched_sizes"] = True
    model, info = MSClipForImageClassification.from_pretrained(source, **labels, **kwargs, output_loading_info=True)
    not_loaded = sorted(key for key in info["missing_keys"] if not key.startswith("classifier."))
    if not_loaded:
        logger.warning("These vision weights are not in %s and start from scratch: %s", source, not_loaded)
    apply_patch_dropout(model.config, model_args.patch_dropout)
    if model.config.vision_config.patch_dropout and model_args.patch_dropout is None:
        logger.warning(
            "%s drops %.2f of the image patches while training (vision_config.patch_dropout); pass "
            "--patch_dropout 0 to fine-tune on whole images",
            source,
            model.config.vision_config.patch_dropout,
        )
    return model


def _image_processor_of(processor: Any) -> Any:
    return getattr(processor, "image_processor", processor)


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
    if clip_model.config.share_projection_head:
        projection = clip_model.projection.weight
    else:
        projection = clip_model.visual_projection.weight
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


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


def _first(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def _calibration_pixels(dataset: datasets.Dataset, transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    pixels = []
    for record in dataset.select(range(min(HEAD_CALIBRATION_IMAGES, len(dataset)))):
        try:
            pixels.append(transform(decode_image(record["image"])))
        except Exception:  # unreadable images are only left out of the calibration
            continue
    return torch.stack(pixels) if pixels else torch.zeros(0)


def run_finetuning(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    output_args: OutputArguments | None = None,
    callbacks: Sequence[TrainerCallback] | None = None,
) -> Trainer:
    """Fine-tune `MSClipForImageClassification` with the plain `Trainer` and save model, processor and metrics.

    Writes to ``output_dir``: the model and its processor, ``train_results.json``, ``eval_results.json`` (accuracy
    and mean per-class recall of the final model, when there is evaluation data), ``all_results.json`` and
    ``trainer_state.json``. The metrics also hold the numbers of skipped (unreadable) images per stage.

    Returns:
        The trainer (its ``model`` is the fine-tuned model).
    """
    output_args = output_args or OutputArguments()
    checkpoint = checkpoint_to_resume(training_args, overwrite=output_args.overwrite_output_dir)
    training_args.remove_unused_columns = False  # the collator needs the raw image column
    set_seed(training_args.seed)

    stats = {"train": DataStats()}
    class_names_file = read_nonempty_lines(data_args.class_names) if data_args.class_names else None
    data_format = data_args.format
    if data_args.data_format is not None:
        logger.warning("--data_format is deprecated; use --format")
        if data_format == "auto":
            data_format = data_args.data_format
    load_options = {
        "image_column": data_args.image_column,
        "label_column": data_args.label_column,
        "class_names": class_names_file,
    }
    train_dataset, class_names = load_classification_dataset(
        data_args.train_data, split=data_args.train_split, format=data_format, **load_options
    )
    train_dataset = _first(train_dataset, data_args.max_train_samples)
    eval_dataset = None
    if data_args.eval_data:
        stats["eval"] = DataStats()
        eval_dataset, _ = load_classification_dataset(
            data_args.eval_data, split=data_args.eval_split, format=data_args.eval_format or data_format, **load_options
        )
        eval_dataset = _first(align_labels(eval_dataset, train_dataset), data_args.max_eval_samples)
    if not data_args.skip_record_check:
        train_dataset = drop_unreadable_images(train_dataset, stats["train"])
        if eval_dataset is not None:
            eval_dataset = drop_unreadable_images(eval_dataset, stats["eval"])
    if len(train_dataset) == 0:
        raise ValueError(f"No usable training images in {data_args.train_data}")

    model = build_classification_model(model_args, class_names)
    processor = build_processor(model_args, model.config.vision_config.image_size, require_tokenizer=False)
    image_processor = _image_processor_of(processor)
    eval_transform = EvalImageTransform(image_processor)
    if data_args.no_augmentation:
        train_transform = eval_transform
    else:
        train_transform = TrainImageTransform.from_image_processor(
            image_processor,
            scale=(data_args.crop_scale_min, 1.0),
            horizontal_flip=not data_args.no_horizontal_flip,
        )

    if model_args.init_head_from_text:
        templates = (
            read_nonempty_lines(model_args.prompt_templates) if model_args.prompt_templates else DEFAULT_TEMPLATES
        )
        if not templates:
            raise ValueError(f"--prompt_templates {model_args.prompt_templates} holds no templates")
        tokenizer = getattr(processor, "tokenizer", None)
        if not model_args.model_name_or_path or tokenizer is None:
            raise ValueError(
                "--init_head_from_text needs --model_name_or_path and a tokenizer (in the model folder, "
                "--processor_name_or_path or --vocab)"
            )
        if "MSClipForImageClassification" in (model.config.architectures or []):
            raise ValueError(
                "--init_head_from_text needs a dual-encoder checkpoint (MSClipModel or "
                "MSClipForPreTraining); this one is an image classifier without a text tower"
            )
        clip_model = MSClipModel.from_pretrained(model_args.model_name_or_path)
        scale = initialize_head_from_text(
            model, clip_model, tokenizer, class_names, templates, _calibration_pixels(train_dataset, eval_transform)
        )
        logger.info(
            "Classifier initialised from the text embeddings of %d classes (scale %.4g)", len(class_names), scale
        )
        del clip_model

    collator = StageCollator(
        {
            stage: ImageClassificationCollator(transform, stats=stats[stage])
            for stage, transform in (("train", train_transform), ("eval", eval_transform))
            if stage in stats
        }
    )
    skipped = SkippedRecordsCallback(stats)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=StageTaggedDataset(train_dataset, "train"),
        eval_dataset=StageTaggedDataset(eval_dataset, "eval") if eval_dataset is not None else None,
        data_collator=collator,
        processing_class=processor,
        compute_metrics=compute_metrics,
        callbacks=[skipped, ClassifierFolderCallback(), *(callbacks or [])],
    )
    attach_checkpointing(trainer, checkpoint)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        finish_classifier_folder(training_args.output_dir)
    train_metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
    train_metrics.update({key: value for key, value in skipped.counts().items() if key.startswith("train_")})
    trainer.log_metrics("train", train_metrics)
    trainer.save_metrics("train", train_metrics)
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        eval_metrics["eval_samples"] = len(eval_dataset)
        # Summed over ranks (each rank's collator counts the records of its own share); every rank calls it.
        eval_metrics["eval_skipped_corrupt_image"] = stats["eval"].as_dict(all_ranks=True)["skipped_corrupt_image"]
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()
    return trainer


__all__ = [
    "DataArguments",
    "ModelArguments",
    "OutputArguments",
    "StageCollator",
    "StageTaggedDataset",
    "align_labels",
    "build_classification_model",
    "build_processor",
    "classification_metrics",
    "compute_metrics",
    "drop_unreadable_images",
    "finish_classifier_folder",
    "initialize_head_from_text",
    "load_classification_dataset",
    "run_finetuning",
]
