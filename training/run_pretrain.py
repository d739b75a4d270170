"""Pre-train an MS-CLIP model on image-text pairs.

One process:
    python training/run_pretrain.py --model_preset msclip-s-tiny --train_data DIR --vocab BPE --output_dir OUT
Several processes (DDP) or DeepSpeed ZeRO:
    accelerate launch --config_file configuration/accelerate/multi_process.yaml training/run_pretrain.py ...
    accelerate launch --config_file configuration/accelerate/deepspeed_zero2.yaml training/run_pretrain.py ...

All options: ``python training/run_pretrain.py --help`` (model, data and transformers TrainingArguments options),
or pass one JSON file holding them. See docs/training.md.
Runs the same under plain ``python``, ``torchrun`` and ``accelerate launch`` (DDP or DeepSpeed ZeRO).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `training` importable

from transformers import HfArgumentParser, TrainerCallback, set_seed  # noqa: E402

from modeling_msclip.checkpointing_msclip import attach_checkpointing, checkpoint_to_resume  # noqa: E402
from modeling_msclip.collators_msclip import ImageTextCollator, IndexedDataset  # noqa: E402
from modeling_msclip.pretraining_msclip import (  # noqa: E402
    AugmentationEpochCallback,
    DataStatsCallback,
    build_model,
    build_model_config,
    build_processor,
    build_train_stream,
    build_zero_shot_callback,
    load_image_text_pairs,
    read_list,
)
from modeling_msclip.records_msclip import DataStats  # noqa: E402
from modeling_msclip.streaming_msclip import SOURCE_SEPARATOR, StreamMonitor, load_stream_state  # noqa: E402
from modeling_msclip.trainer_msclip import MSClipTrainer, MSClipTrainingArguments, check_world_size  # noqa: E402
from modeling_msclip.transforms_msclip import ImageProcessorTransform, TrainImageTransform  # noqa: E402
from training.arguments import CheckpointArguments, parse_arguments_for_this_machine  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments(CheckpointArguments):
    """Which model to pre-train and with which objective."""

    model_config: str | None = field(default=None, metadata={"help": "JSON file of an MSClipConfig."})
    objective: str | None = field(
        default=None, metadata={"help": "Loss: clip, siglip, nclip or xclip (default: the checkpoint's, else clip)."}
    )
    objective_settings: str | None = field(
        default=None,
        metadata={"help": "JSON object of further MSClipObjectiveConfig fields, e.g. '{\"local_loss\": false}'"},
    )


@dataclass
class DataArguments:
    """Where the image-text pairs come from and how they are prepared."""

    train_data: str = field(
        metadata={
            "help": "Training pairs: image folder, CSV/TSV/JSONL, webdataset shards (local or fsspec URLs), Hub name. "
            "With --streaming, several sources joined by '::' are mixed (see --train_data_weights)."
        }
    )
    train_data_weights: str | None = field(
        default=None,
        metadata={"help": "Mixing weights of the '::'-joined --train_data sources, e.g. '3::1' (default: equal)."},
    )
    train_format: str = field(default="auto", metadata={"help": "Format of --train_data (see docs/data.md)."})
    train_split: str | None = field(
        default=None, metadata={"help": "Split of --train_data (default: the only one / train)."}
    )
    eval_data: str | None = field(default=None, metadata={"help": "Held-out pairs for the evaluation loss."})
    eval_split: str | None = field(default=None, metadata={"help": "Split of --eval_data."})
    eval_format: str = field(default="auto", metadata={"help": "Format of --eval_data (see docs/data.md)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (auto-detected by default)."})
    text_column: str | None = field(default=None, metadata={"help": "Caption column (auto-detected by default)."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training data (ImageTextStream): each rank and DataLoader worker reads its own "
            "shards, shuffled, filtered before batching so every batch is full; resumable mid-epoch."
        },
    )
    train_num_samples: int | None = field(
        default=None,
        metadata={
            "help": "Streaming: records per epoch over all ranks (default: counted from sizes.json, img2dataset "
            "*_stats.json, tar headers or the dataset's length). Required with --dataset_resampled and remote shards."
        },
    )
    dataset_resampled: bool = field(
        default=False,
        metadata={"help": "Streaming: draw shards with replacement; an epoch is --train_num_samples records."},
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "Streaming: records in the shuffle buffer of each worker (0: no shuffling)."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for the pre-scan of map-style data (run once, then cached)."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "Use only the first N training pairs (streaming: an epoch of N records, as --train_num_samples)."
        },
    )
    text_padding: str = field(
        default="longest", metadata={"help": "'longest' pads each batch to its longest caption; 'max_length' to 77."}
    )
    crop_scale_min: float = field(default=0.9, metadata={"help": "Lower bound of the random-resized-crop area."})
    no_augmentation: bool = field(default=False, metadata={"help": "Train on the evaluation transform."})
    zeroshot_eval_data: str | None = field(
        default=None, metadata={"help": "Labelled images for zero-shot accuracy during training (any data format)."}
    )
    zeroshot_eval_split: str | None = field(default=None, metadata={"help": "Split of --zeroshot_eval_data."})
    zeroshot_eval_format: str = field(
        default="auto",
        metadata={"help": "Format of --zeroshot_eval_data (see docs/data.md; classfolder for class folders)."},
    )
    zeroshot_label_column: str = field(default="label", metadata={"help": "Integer label column of that data."})
    zeroshot_class_names: str | None = field(
        default=None, metadata={"help": "Class names in label order: a file (one per line) or comma-separated."}
    )
    zeroshot_templates: str | None = field(
        default=None, metadata={"help": "File of prompt templates, one per line, each with one {} placeholder."}
    )
    zeroshot_eval_steps: int | None = field(
        default=None, metadata={"help": "Run the zero-shot evaluation every N steps."}
    )
    log_seen_samples: str | None = field(
        default=None,
        metadata={
            "help": "Folder where each rank appends the key of every pair it trains on, in training order "
            "(seen_rank<r>.txt; read-ahead batches are not listed): an audit of data sharding and resume."
        },
    )
    skip_record_check: bool = field(
        default=False,
        metadata={
            "help": "Do not pre-scan map-style data for corrupt images / empty captions (the collator still "
            "skips them, but ranks may then see unequal batches)."
        },
    )


def build_datasets(
    data_args: DataArguments, stats: DataStats, training_args: MSClipTrainingArguments | None = None
) -> tuple[Any, Any]:
    """The map-style training pairs (``None`` with ``--streaming``) and the evaluation pairs (``None`` without
    ``--eval_data``), bad records dropped up front (see `load_image_text_pairs`)."""
    if not data_args.streaming and (SOURCE_SEPARATOR in data_args.train_data or data_args.train_data_weights):
        raise ValueError("mixing several --train_data sources ('a::b', --train_data_weights) needs --streaming")

    def load(source: str, split: str | None, data_format: str) -> Any:
        return load_image_text_pairs(
            source,
            split=split,
            format=data_format,
            image_column=data_args.image_column,
            text_column=data_args.text_column,
            stats=stats,
            check_records=not data_args.skip_record_check,
            num_proc=data_args.preprocessing_num_workers,
            training_args=training_args,
        )

    train = None
    if not data_args.streaming:
        train = load(data_args.train_data, data_args.train_split, data_args.train_format)
        if data_args.max_train_samples is not None:
            train = train.select(range(min(data_args.max_train_samples, len(train))))
    evaluation = load(data_args.eval_data, data_args.eval_split, data_args.eval_format) if data_args.eval_data else None
    return train, evaluation


def run_pretraining(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: MSClipTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> MSClipTrainer:
    """Assemble model, processor, data and `MSClipTrainer`, train (resuming if asked) and save.

    ``callbacks`` are added to the trainer (e.g. evaluation callbacks).
    """
    check_world_size(training_args)  # before anything is built: a launch on too few processes fails at once
    training_args.remove_unused_columns = False
    if training_args.ddp_find_unused_parameters is None:
        # Every parameter of every preset and objective gets a gradient each step (tests/test_trainer.py checks it),
        # so DDP's extra graph traversal to look for unused ones is pure cost.
        training_args.ddp_find_unused_parameters = False
    checkpoint = checkpoint_to_resume(training_args, overwrite=training_args.overwrite_output_dir)
    set_seed(training_args.seed)
    config = build_model_config(
        preset=model_args.model_preset,
        config_file=model_args.model_config,
        checkpoint=model_args.model_name_or_path,
        objective=model_args.objective,
        objective_settings=json.loads(model_args.objective_settings) if model_args.objective_settings else None,
        patch_dropout=model_args.patch_dropout,
    )
    processor = build_processor(config.vision_config.image_size, **model_args.processor_options())
    model = build_model(
        config,
        checkpoint=model_args.model_name_or_path,
        tokenizer=processor.tokenizer,
        attn_implementation=model_args.attn_implementation,
    )
    stats = DataStats()
    train_dataset, eval_dataset = build_datasets(data_args, stats, training_args)
    image_processor = processor.image_processor
    if data_args.no_augmentation:
        train_transform = ImageProcessorTransform(image_processor)
    else:
        train_transform = TrainImageTransform.from_image_processor(
            image_processor, scale=(data_args.crop_scale_min, 1.0)
        )
    streaming = data_args.streaming
    augmentation_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    image_text_collator = ImageTextCollator(
        processor.tokenizer,
        train_transform,
        padding=data_args.text_padding,
        stats=stats,
        augmentation_seed=None if streaming else augmentation_seed,  # a stream seeds each record itself
        sample_keys=bool(data_args.log_seen_samples),
    )
    seen_log = None
    if data_args.log_seen_samples:
        seen_log = Path(data_args.log_seen_samples) / f"seen_rank{training_args.process_index}.txt"
    monitor = None
    if streaming:
        train_dataset = build_train_stream(
            data_args.train_data,
            image_text_collator,
            training_args,
            weights=data_args.train_data_weights,
            format=data_args.train_format,
            split=data_args.train_split,
            image_column=data_args.image_column,
            text_column=data_args.text_column,
            num_samples=data_args.train_num_samples or data_args.max_train_samples,
            shuffle_buffer=data_args.shuffle_buffer_size,
            resampled=data_args.dataset_resampled,
        )
        monitor = StreamMonitor(train_dataset, stats)
        if checkpoint is not None:
            state = load_stream_state(checkpoint, training_args.process_index)
            if state is None:
                logger.warning("%s holds no stream position: the resumed epoch is re-read from its start", checkpoint)
            else:
                monitor.load_state_dict(state)
    else:
        # Records carry their index so that each sample's augmentation is a function of (seed, epoch, index):
        # identical whichever rank or worker collates it, and after a resume.
        train_dataset = IndexedDataset(train_dataset)
        image_text_collator.refill_from = train_dataset  # a bad record is replaced, so batches stay full
    trainer = MSClipTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=image_text_collator,
        processing_class=processor,
        callbacks=[
            DataStatsCallback(stats, monitor),
            AugmentationEpochCallback(image_text_collator),
            *(callbacks or []),
        ],
        stream_monitor=monitor,
        seen_samples_log=seen_log,
    )
    attach_checkpointing(trainer, checkpoint)
    if data_args.zeroshot_eval_data:
        build_zero_shot_callback(
            data_args.zeroshot_eval_data,
            processor,
            split=data_args.zeroshot_eval_split,
            format=data_args.zeroshot_eval_format,
            label_column=data_args.zeroshot_label_column,
            text_column=data_args.text_column,
            class_names=read_list(data_args.zeroshot_class_names) if data_args.zeroshot_class_names else None,
            templates=read_list(data_args.zeroshot_templates) if data_args.zeroshot_templates else None,
            eval_steps=data_args.zeroshot_eval_steps,
        ).attach(trainer)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # with the processor (the trainer's processing_class)
    trainer.save_state()
    if eval_dataset is not None and training_args.do_eval:
        trainer.evaluate()
    return trainer


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, MSClipTrainingArguments]:
    """Parse the command line (or a single ``.json`` file of arguments) for this machine."""
    parser = HfArgumentParser((ModelArguments, DataArguments, MSClipTrainingArguments))
    return parse_arguments_for_this_machine(parser, argv)


def main() -> None:
    run_pretraining(*parse_arguments())


if __name__ == "__main__":
    main()
