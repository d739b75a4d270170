"""Pre-training building blocks: model config, model, processor, data and callbacks, each from typed arguments.

`training/run_pretrain.py` owns the command line (its argument dataclasses) and the run itself; it assembles these
pieces with `MSClipTrainer`. The library parses no command line.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    TrainerCallback,
    TrainingArguments,
)

from .collators_msclip import ImageTextCollator
from .configuration_msclip import MSClipConfig, MSClipObjectiveConfig
from .data_msclip import detect_format, load_dataset, prepare_labels
from .modeling_msclip import MSClipForPreTraining
from .records_msclip import DataStats, drop_bad_records, read_nonempty_lines
from .streaming_msclip import ImageTextStream, StreamMonitor, build_stream_sources

logger = logging.getLogger(__name__)


def build_model_config(
    *,
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    objective: str | None = None,
    objective_settings: Mapping[str, Any] | None = None,
    patch_dropout: float | None = None,
) -> MSClipConfig:
    """The config of exactly one of a checkpoint folder, a config file or a preset name, with the objective
    ``objective`` (a loss name; ``None`` keeps the config's), further `MSClipObjectiveConfig` fields and patch
    dropout (``None`` keeps the config's).

    Raises:
        ValueError: when not exactly one source is given, or a setting is invalid.
    """
    sources = [source for source in (preset, config_file, checkpoint) if source]
    if len(sources) != 1:
        raise ValueError("give exactly one of --model_preset, --model_config, --model_name_or_path")
    if checkpoint:
        config = MSClipConfig.from_pretrained(checkpoint)
    elif config_file:
        config = MSClipConfig.from_json_file(config_file)
    else:
        config = MSClipConfig.from_preset(preset)
    settings = dict(config.objective)
    if objective:
        settings["loss"] = objective
    settings.update(objective_settings or {})
    config.objective = vars(MSClipObjectiveConfig.from_dict(settings))
    apply_patch_dropout(config, patch_dropout)
    return config


def build_model(
    config: MSClipConfig,
    *,
    checkpoint: str | os.PathLike | None = None,
    tokenizer: Any | None = None,
    attn_implementation: str = "sdpa",
) -> MSClipForPreTraining:
    """A new model of ``config``, or the weights of ``checkpoint`` under ``config`` (see `build_model_config`).

    A new model gets the text vocabulary of ``tokenizer`` (its size and its start and end ids); a checkpoint must
    already cover it (see `align_text_config_with_tokenizer`).
    """
    if tokenizer is not None:
        align_text_config_with_tokenizer(config, tokenizer, resize=not checkpoint)
    if checkpoint:
        return MSClipForPreTraining.from_pretrained(checkpoint, config=config, attn_implementation=attn_implementation)
    with _without_zero3_init():
        return MSClipForPreTraining._from_config(config, attn_implementation=attn_implementation)


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


def build_processor(
    image_size: int,
    *,
    processor: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    image_preset: str = "msclip",
    require_tokenizer: bool = True,
) -> Any:
    """The processor saved in ``processor`` or in the ``checkpoint`` folder, else one built from the ``tokenizer``
    files (a saved MSClipTokenizer or CLIP tokenizer folder, or ``bpe_simple_vocab_16e6.txt.gz``) with the
    ``image_preset`` image statistics at ``image_size``.

    With ``require_tokenizer=False`` (image classification) a folder holding only an image processor, or finally an
    ``image_preset`` image processor at ``image_size``, is accepted too.

    Raises:
        ValueError: when no source gives a processor (naming the command-line options that would).
    """
    from .image_processing_msclip import MSClipImageProcessor

    for source in (processor, checkpoint):
        if not source or not Path(source).is_dir():
            continue
        if (Path(source) / "tokenizer_config.json").is_file():
            return AutoProcessor.from_pretrained(source)
        image_configs = ("processor_config.json", "preprocessor_config.json")
        if not require_tokenizer and any((Path(source) / name).is_file() for name in image_configs):
            return AutoImageProcessor.from_pretrained(source)
    if tokenizer:
        from .processing_msclip import build_msclip_processor

        return build_msclip_processor(tokenizer, preset=image_preset, image_size=image_size)
    if not require_tokenizer:
        return MSClipImageProcessor.from_preset(image_preset, image_size=image_size)
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


def read_list(value: str) -> list[str]:
    """The lines of a file (``value`` is a path), else the comma-separated items of ``value``."""
    if Path(value).is_file():
        return read_nonempty_lines(value)
    return [item.strip() for item in value.split(",") if item.strip()]


def build_zero_shot_callback(
    source: str,
    processor: Any,
    *,
    split: str | None = None,
    format: str = "auto",
    label_column: str = "label",
    text_column: str | None = None,
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    eval_steps: int | None = None,
) -> TrainerCallback:
    """A `ZeroShotEvalCallback` on the labelled images of ``source`` (any format of docs/data.md), with retrieval on
    its captions too unless it is a class-folder tree; ``templates`` default to the generic CLIP prompts."""
    from .evaluation_callback_msclip import ZeroShotEvalCallback
    from .evaluation_msclip import DEFAULT_TEMPLATES

    labelled = load_dataset(source, format=format, task="classification", split=split, label_column=label_column)
    labelled, class_names = prepare_labels(labelled, class_names=class_names, require_class_names=True)
    retrieval = None
    if (format if format != "auto" else detect_format(source, split=split)) != "classfolder":
        retrieval = load_dataset(source, format=format, task="image-text", split=split, text_column=text_column)
    return ZeroShotEvalCallback(
        processor,
        zero_shot_dataset=labelled,
        class_names=class_names,
        templates=list(templates) if templates is not None else DEFAULT_TEMPLATES,
        retrieval_dataset=retrieval,
        eval_steps=eval_steps,
        label_column="label",
    )


def load_image_text_pairs(
    source: str,
    *,
    split: str | None = None,
    format: str = "auto",
    image_column: str | None = None,
    text_column: str | None = None,
    stats: DataStats | None = None,
    check_records: bool = True,
    num_proc: int | None = None,
    training_args: TrainingArguments | None = None,
) -> Any:
    """Map-style image-text pairs of ``source``, with bad records (corrupt image, empty caption) dropped up front
    (``check_records``) so that ranks see full batches.

    The pre-scan runs on each machine's main process first (``training_args.main_process_first``) with ``num_proc``
    processes; the other ranks then read its result from the datasets cache. Only rank 0 counts it in ``stats``,
    which keeps the totals summed over ranks right. (A stream is built by `build_train_stream` instead.)
    """
    dataset = load_dataset(
        source, format=format, task="image-text", image_column=image_column, text_column=text_column, split=split
    )
    if not check_records:
        return dataset
    counted = int(os.environ.get("RANK", "0")) == 0
    first = training_args.main_process_first(desc="pre-scan") if training_args else contextlib.nullcontext()
    with first:
        return drop_bad_records(dataset, stats=stats if counted else None, num_proc=num_proc)


def build_train_stream(
    sources: str,
    collator: ImageTextCollator,
    training_args: TrainingArguments,
    *,
    weights: str | None = None,
    format: str = "auto",
    split: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    num_samples: int | None = None,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
) -> ImageTextStream:
    """An `ImageTextStream` of the ``::``-joined ``sources`` mixed by ``weights`` (e.g. ``"3::1"``; default equal),
    sharded over the run's ranks and ``dataloader_num_workers`` workers and seeded by ``data_seed`` (else ``seed``)
    of ``training_args``, with batches of ``per_device_train_batch_size``."""
    stream_sources = build_stream_sources(
        sources, weights, format=format, split=split, image_column=image_column, text_column=text_column
    )
    return ImageTextStream(
        stream_sources,
        collator,
        batch_size=training_args.per_device_train_batch_size,
        num_samples=num_samples,
        seed=training_args.data_seed if training_args.data_seed is not None else training_args.seed,
        shuffle_buffer=shuffle_buffer,
        resampled=resampled,
        rank=training_args.process_index,
        world_size=training_args.world_size,
        num_workers=training_args.dataloader_num_workers,
    )


__all__ = [
    "AugmentationEpochCallback",
    "DataStatsCallback",
    "align_text_config_with_tokenizer",
    "apply_patch_dropout",
    "build_model",
    "build_model_config",
    "build_processor",
    "build_train_stream",
    "build_zero_shot_callback",
    "load_image_text_pairs",
    "read_list",
]
