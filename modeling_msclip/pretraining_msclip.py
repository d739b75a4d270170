"""Pre-training entry point: arguments, model/processor/data assembly and the run itself.

`training/run_pretrain.py` parses the command line (into the argument dataclasses defined here) and calls
`run_pretraining`; the library itself parses no command line.
Runs the same under plain ``python``, ``torchrun`` and ``accelerate launch`` (DDP or DeepSpeed ZeRO).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from .checkpointing_msclip import attach_checkpointing, checkpoint_to_resume
from .configuration_msclip import MSClipConfig, MSClipObjectiveConfig
from .data_msclip import (
    DataStats,
    EvalImageTransform,
    ImageTextCollator,
    IndexedDataset,
    TrainImageTransform,
    detect_format,
    drop_bad_records,
    load_dataset,
    prepare_labels,
    read_nonempty_lines,
)
from .modeling_msclip import MSClipForPreTraining
from .streaming_msclip import (
    SOURCE_SEPARATOR,
    ImageTextStream,
    StreamMonitor,
    build_stream_sources,
    load_stream_state,
)
from .trainer_msclip import (
    MSClipTrainer,
    MSClipTrainingArguments,
    check_world_size,
)

logger = logging.getLogger(__name__)


@dataclass
class CheckpointArguments:
    """Where a model and its processor come from (shared by pre-training and fine-tuning)."""

    model_preset: str | None = field(
        default=None, metadata={"help": "Named architecture preset to start from scratch (e.g. msclip-s-b32)."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Saved MS-CLIP checkpoint to start from (inference or pre-training)."}
    )
    processor_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Saved MSClipProcessor (default: the model folder, else one from --tokenizer_name_or_path)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--vocab"],
            "help": "Tokenizer to build the processor from: a saved MSClipTokenizer folder (e.g. one trained with "
            "processing/build_tokenizer.py --train-from), a CLIP tokenizer folder (vocab.json + merges.txt) or "
            "bpe_simple_vocab_16e6.txt.gz. From a preset, the text tower's vocabulary follows it.",
        },
    )
    image_preset: str = field(default="msclip", metadata={"help": "Image statistics: 'msclip' (ImageNet) or 'clip'."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2."})
    patch_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Share of patch tokens each image drops while training (FLIP; default: the config's, usually 0). "
            "0.5 makes the vision tower about twice as cheap per pair; not with MS-CLIP-S's parallel branch."
        },
    )


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


def build_model_config(model_args: ModelArguments) -> MSClipConfig:
    """The config of a checkpoint, a config file or a preset, with the requested objective and patch dropout."""
    sources = [s for s in (model_args.model_preset, model_args.model_config, model_args.model_name_or_path) if s]
    if len(sources) != 1:
        raise ValueError("give exactly one of --model_preset, --model_config, --model_name_or_path")
    if model_args.model_name_or_path:
        config = MSClipConfig.from_pretrained(model_args.model_name_or_path)
    elif model_args.model_config:
        config = MSClipConfig.from_json_file(model_args.model_config)
    else:
        config = MSClipConfig.from_preset(model_args.model_preset)
    objective = dict(config.objective)
    if model_args.objective:
        objective["loss"] = model_args.objective
    if model_args.objective_settings:
        objective.update(json.loads(model_args.objective_settings))
    config.objective = vars(MSClipObjectiveConfig.from_dict(objective))
    apply_patch_dropout(config, model_args.patch_dropout)
    return config


def build_model(
    model_args: ModelArguments, tokenizer: Any | None = None, config: MSClipConfig | None = None
) -> MSClipForPreTraining:
    """Start from a checkpoint, a config file or a preset (``config``: `build_model_config`'s, built if None).

    A model started from a preset or a config file gets the text vocabulary of ``tokenizer`` (its size and its start
    and end ids); a checkpoint must already cover it (see `align_text_config_with_tokenizer`).
    """
    config = config if config is not None else build_model_config(model_args)
    if tokenizer is not None:
        align_text_config_with_tokenizer(config, tokenizer, resize=not model_args.model_name_or_path)
    kwargs = {"attn_implementation": model_args.attn_implementation}
    if model_args.model_name_or_path:
        return MSClipForPreTraining.from_pretrained(model_args.model_name_or_path, config=config, **kwargs)
    with _without_zero3_init():
        return MSClipForPreTraining._from_config(config, **kwargs)


@contextlib.contextmanager
def _without_zero3_init() -> Any:
    """Build a new model outside ``deepspeed.zero.Init``, with the initial weights of one process of the same seed.

    Under ZeRO-3, transformers constructs a model from a config inside ``zero.Init`` with the torch initialisers
    switched off, and then initialises it module by module on rank 0: the random draws come in another order, so
    96 of 433 tensors of msclip-s-tiny got other values than in one process with the same ``--seed``. Here the HF
    DeepSpeed config is unset while the model is built, so every rank builds the whole model the usual way (same
    seed, same weights) and the DeepSpeed engine partitions it when the Trainer starts. The cost: each rank holds the
    full fp32 model once at start (4 bytes per parameter, e.g. 0.6 GB for 150 M), before it is partitioned. A
    checkpoint (``--model_name_or_path``) is still loaded into ``zero.Init``: its weights are fixed anyway.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_config = reference() if reference is not None else None
    if hf_config is None or not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(hf_config)


def align_text_config_with_tokenizer(config: MSClipConfig, tokenizer: Any, resize: bool) -> None:
    """Give the text tower the vocabulary of ``tokenizer`` (``resize=True``) or check that it covers it.

    The text tower pools at ``argmax(input_ids)``, so the tokenizer's end token must be its largest id, and every id
    must index the embedding table.

    Raises:
        ValueError: naming both vocabularies, when the tokenizer's end token is not its largest id, or when
            ``resize`` is False and the tokenizer has ids past the model's embedding table.
    """
    text = config.text_config
    vocab_size, bos, eos = len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos != vocab_size - 1:
        raise ValueError(f"the tokenizer's end token has id {eos}, not its largest id {vocab_size - 1}")
    if resize:
        text.vocab_size, text.bos_token_id, text.eos_token_id = vocab_size, bos, eos
        return
    if vocab_size > text.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the checkpoint's text embedding only {text.vocab_size}: use "
            "the checkpoint's own processor (or the tokenizer it was trained with)"
        )
    if eos != text.eos_token_id:
        logger.warning(
            "the tokenizer's end id %d is not the checkpoint's %d: was the checkpoint trained with this tokenizer?",
            eos,
            text.eos_token_id,
        )


def apply_patch_dropout(config: MSClipConfig, patch_dropout: float | None) -> None:
    """Set ``vision_config.patch_dropout`` (``None`` keeps the config's value) and check that it is allowed."""
    if patch_dropout is None:
        return
    config.vision_config.patch_dropout = patch_dropout
    config.vision_config.validate()


def build_processor(model_args: CheckpointArguments, image_size: int, require_tokenizer: bool = True) -> Any:
    """The processor of ``--processor_name_or_path`` or of the checkpoint folder, else one built from
    ``--tokenizer_name_or_path``.

    With ``require_tokenizer=False`` (image classification) a folder holding only an image processor, or finally an
    ``--image_preset`` image processor at ``image_size``, is accepted too.
    """
    from .image_processing_msclip import MSClipImageProcessor

    for source in (model_args.processor_name_or_path, model_args.model_name_or_path):
        if not source or not Path(source).is_dir():
            continue
        if (Path(source) / "tokenizer_config.json").is_file():
            return AutoProcessor.from_pretrained(source)
        image_configs = ("processor_config.json", "preprocessor_config.json")
        if not require_tokenizer and any((Path(source) / name).is_file() for name in image_configs):
            return AutoImageProcessor.from_pretrained(source)
    if model_args.tokenizer_name_or_path:
        from .processing_msclip import build_msclip_processor

        return build_msclip_processor(
            model_args.tokenizer_name_or_path, preset=model_args.image_preset, image_size=image_size
        )
    if not require_tokenizer:
        return MSClipImageProcessor.from_preset(model_args.image_preset, image_size=image_size)
    raise ValueError(
        "no processor: pass --processor_name_or_path, a --model_name_or_path holding one, or --tokenizer_name_or_path"
    )


class DataStatsCallback(TrainerCallback):
    """Logs how many records were skipped (corrupt image, empty caption) at the end of training, summed over ranks,
    and for a mixed stream the share of each source among the trained pairs against the share asked for."""

    def __init__(self, stats: DataStats, monitor: StreamMonitor | None = None) -> None:
        self.stats = stats
        self.monitor = monitor

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        counts = self.stats.as_dict(all_ranks=True)
        entry: dict[str, Any] = {"data_" + key: value for key, value in counts.items()}
        mixed = self.monitor is not None and len(self.monitor.stream.sources) > 1
        if mixed:
            shares = source_shares(self.monitor)
            entry["data_source_shares"] = shares
        if state.is_world_process_zero:
            logger.warning(self.stats.summary(counts=counts))
            if mixed:
                weights = [source.weight for source in self.monitor.stream.sources]
                asked = [weight / sum(weights) for weight in weights]
                logger.warning(
                    "data mix (achieved / asked): %s",
                    ", ".join(f"{name} {share:.3f} / {want:.3f}" for (name, share), want in zip(shares.items(), asked)),
                )
            state.log_history.append(entry)


def source_shares(monitor: StreamMonitor) -> dict[str, float]:
    """Share of each source among the pairs trained on all ranks (a collective call under torch.distributed)."""
    counts = torch.tensor(monitor.source_counts, dtype=torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    total = max(1, int(counts.sum()))
    return {name: int(count) / total for name, count in zip(monitor.stream.source_names, counts.tolist())}


class AugmentationEpochCallback(TrainerCallback):
    """Tells the collator which epoch starts, so per-sample augmentation differs between epochs."""

    def __init__(self, collator: ImageTextCollator) -> None:
        self.collator = collator

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.collator.epoch = int(state.epoch + 1e-6)


def _read_list(value: str) -> list[str]:
    if Path(value).is_file():
        return read_nonempty_lines(value)
    return [item.strip() for item in value.split(",") if item.strip()]


def build_zero_shot_callback(data_args: DataArguments, processor: Any) -> TrainerCallback | None:
    """A `ZeroShotEvalCallback` on ``--zeroshot_eval_data`` (``None`` when not asked for)."""
    if not data_args.zeroshot_eval_data:
        return None
    from .evaluation_msclip import DEFAULT_TEMPLATES, ZeroShotEvalCallback

    source, split, data_format = (
        data_args.zeroshot_eval_data,
        data_args.zeroshot_eval_split,
        data_args.zeroshot_eval_format,
    )
    labelled = load_dataset(
        source, format=data_format, task="classification", split=split, label_column=data_args.zeroshot_label_column
    )
    class_names = _read_list(data_args.zeroshot_class_names) if data_args.zeroshot_class_names else None
    labelled, class_names = prepare_labels(labelled, class_names=class_names, require_class_names=True)
    retrieval = None
    if (data_format if data_format != "auto" else detect_format(source, split=split)) != "classfolder":
        retrieval = load_dataset(
            source, format=data_format, task="image-text", split=split, text_column=data_args.text_column
        )
    templates = _read_list(data_args.zeroshot_templates) if data_args.zeroshot_templates else DEFAULT_TEMPLATES
    return ZeroShotEvalCallback(
        processor,
        zero_shot_dataset=labelled,
        class_names=class_names,
        templates=templates,
        retrieval_dataset=retrieval,
        eval_steps=data_args.zeroshot_eval_steps,
        label_column="label",
    )


def build_datasets(
    data_args: DataArguments, stats: DataStats, training_args: TrainingArguments | None = None
) -> tuple[Any, Any]:
    """Load map-style train (and eval) pairs, dropping bad records up front so ranks see full batches.

    The pre-scan runs on each machine's main process first, with ``--preprocessing_num_workers`` processes; the other
    ranks then read its result from the datasets cache. Counting it on rank 0 only keeps the summed totals right.
    (With ``--streaming`` the training data is an `ImageTextStream` instead, see `build_train_stream`.)
    """

    def load(source: str, split: str | None, data_format: str) -> Any:
        dataset = load_dataset(
            source,
            format=data_format,
            task="image-text",
            image_column=data_args.image_column,
            text_column=data_args.text_column,
            split=split,
        )
        if not data_args.skip_record_check:
            counted = int(os.environ.get("RANK", "0")) == 0
            first = training_args.main_process_first(desc="pre-scan") if training_args else contextlib.nullcontext()
            with first:
                dataset = drop_bad_records(
                    dataset, stats=stats if counted else None, num_proc=data_args.preprocessing_num_workers
                )
        return dataset

    train = None
    if not data_args.streaming and (SOURCE_SEPARATOR in data_args.train_data or data_args.train_data_weights):
        raise ValueError("mixing several --train_data sources ('a::b', --train_data_weights) needs --streaming")
    if not data_args.streaming:
        train = load(data_args.train_data, data_args.train_split, data_args.train_format)
        if data_args.max_train_samples is not None:
            train = train.select(range(min(data_args.max_train_samples, len(train))))
    evaluation = load(data_args.eval_data, data_args.eval_split, data_args.eval_format) if data_args.eval_data else None
    return train, evaluation


def build_train_stream(
    data_args: DataArguments, training_args: TrainingArguments, collator: ImageTextCollator
) -> ImageTextStream:
    """The `ImageTextStream` of ``--streaming``: the ``::``-joined sources mixed by ``--train_data_weights``, sharded
    over this run's ranks and ``--dataloader_num_workers`` workers, seeded by ``--data_seed`` (else ``--seed``)."""
    sources = build_stream_sources(
        data_args.train_data,
        data_args.train_data_weights,
        format=data_args.train_format,
        split=data_args.train_split,
        image_column=data_args.image_column,
        text_column=data_args.text_column,
    )
    num_samples = data_args.train_num_samples or data_args.max_train_samples
    return ImageTextStream(
        sources,
        collator,
        batch_size=training_args.per_device_train_batch_size,
        num_samples=num_samples,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        shuffle_buffer=data_args.shuffle_buffer_size,
        resampled=data_args.dataset_resampled,
        rank=training_args.process_index,
        world_size=training_args.world_size,
        num_workers=training_args.dataloader_num_workers,
    )


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
    config = build_model_config(model_args)
    processor = build_processor(model_args, config.vision_config.image_size)
    model = build_model(model_args, processor.tokenizer, config)
    stats = DataStats()
    train_dataset, eval_dataset = build_datasets(data_args, stats, training_args)
    image_processor = processor.image_processor
    if data_args.no_augmentation:
        train_transform = EvalImageTransform(image_processor)
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
        train_dataset = build_train_stream(data_args, training_args, image_text_collator)
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
    zero_shot_callback = build_zero_shot_callback(data_args, processor)
    if zero_shot_callback is not None:
        zero_shot_callback.attach(trainer)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # with the processor (the trainer's processing_class)
    trainer.save_state()
    if eval_dataset is not None and training_args.do_eval:
        trainer.evaluate()
    return trainer


__all__ = [
    "CheckpointArguments",
    "DataArguments",
    "ModelArguments",
    "align_text_config_with_tokenizer",
    "build_model",
    "build_model_config",
    "build_processor",
    "run_pretraining",
]
