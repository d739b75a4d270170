"""Fine-tune an MS-CLIP checkpoint for image classification with the plain transformers `Trainer`.

    python training/run_finetune_classification.py --model_name_or_path CKPT \
        --train_data data/fashion-mnist --train_split train --eval_data data/fashion-mnist --eval_split test \
        --format classfolder \
        --output_dir runs/fmnist-ft --max_steps 500 --per_device_train_batch_size 64 --learning_rate 1e-4 \
        --eval_strategy steps --eval_steps 100

CKPT is an MSClipModel or MSClipForPreTraining folder (its vision tower is loaded; ``--init_head_from_text`` starts
the head as the zero-shot classifier), or use ``--model_preset msclip-s-tiny`` to train from scratch. Data are class
folders (root/<class>/*.png), image folders or tables with a label column, save_to_disk folders or Hub datasets with
image + label columns, read by data_msclip.load_dataset; ``--format`` names the format instead of detecting it (the
Fashion-MNIST tree has a metadata.jsonl next to its class folders, so it needs ``--format classfolder``).

All options: ``python training/run_finetune_classification.py --help`` (model, data and transformers
TrainingArguments options), or pass one JSON file holding them. See docs/finetuning.md.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `training` importable

import datasets  # noqa: E402
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed  # noqa: E402

from modeling_msclip.checkpointing_msclip import (  # noqa: E402
    OutputArguments,
    attach_checkpointing,
    checkpoint_to_resume,
)
from modeling_msclip.collators_msclip import ImageClassificationCollator  # noqa: E402
from modeling_msclip.data_msclip import FORMATS  # noqa: E402
from modeling_msclip.evaluation_msclip import DEFAULT_TEMPLATES  # noqa: E402
from modeling_msclip.finetuning_msclip import (  # noqa: E402
    ClassifierFolderCallback,
    SkippedRecordsCallback,
    StageCollator,
    StageTaggedDataset,
    align_labels,
    build_classification_model,
    calibration_pixels,
    compute_metrics,
    drop_unreadable_images,
    finish_classifier_folder,
    initialize_head_from_text,
    load_classification_dataset,
)
from modeling_msclip.modeling_msclip import MSClipModel  # noqa: E402
from modeling_msclip.pretraining_msclip import build_processor  # noqa: E402
from modeling_msclip.records_msclip import DataStats, read_nonempty_lines  # noqa: E402
from modeling_msclip.transforms_msclip import ImageProcessorTransform, TrainImageTransform  # noqa: E402
from training.arguments import CheckpointArguments, parse_arguments_for_this_machine  # noqa: E402

logger = logging.getLogger(__name__)


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


def _first(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


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

    model = build_classification_model(
        class_names,
        checkpoint=model_args.model_name_or_path,
        preset=model_args.model_preset,
        attn_implementation=model_args.attn_implementation,
        patch_dropout=model_args.patch_dropout,
    )
    processor = build_processor(
        model.config.vision_config.image_size, **model_args.processor_options(), require_tokenizer=False
    )
    image_processor = getattr(processor, "image_processor", processor)
    eval_transform = ImageProcessorTransform(image_processor)
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
            model, clip_model, tokenizer, class_names, templates, calibration_pixels(train_dataset, eval_transform)
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


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, OutputArguments]:
    """Parse the command line (or a single ``.json`` file of arguments) for this machine."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, OutputArguments))
    return parse_arguments_for_this_machine(parser, argv)


def main() -> None:
    run_finetuning(*parse_arguments())


if __name__ == "__main__":
    main()
