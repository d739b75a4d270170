# Copyright 2025 The modeling_msclip authors. Licensed under the Apache License, Version 2.0.
"""Evaluation of MS-CLIP models: zero-shot classification, image-text retrieval and linear probing.

This module holds the dataset-level evaluations (`evaluate_zero_shot`, `evaluate_retrieval`,
`evaluate_linear_probe`), which turn a model plus a dataset into the tensors of the pure metric functions of
`metrics_msclip` (through the encoders of `encoding_msclip`), the evaluation-data loader `load_eval_dataset` and the
reporting of results (`to_jsonable`, `save_results_json`, `format_results_table`, `flatten_scalar_metrics`). The
training callback is `evaluation_callback_msclip.ZeroShotEvalCallback`.

The command line is ``training/run_evaluation.py`` in the repository (data in any format `load_eval_dataset`
reads, i.e. `data_msclip.load_dataset`: class folders, image folders with ``metadata.jsonl``, CSV/TSV/JSONL/Parquet,
webdataset shards, `Dataset.save_to_disk` folders, Hub datasets)::

    python training/run_evaluation.py --model DIR --zero_shot_data DIR --retrieval_data DIR \
        --linear_probe_train DIR --linear_probe_test DIR --output results.json
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .encoding_msclip import encode_dataset_images, encode_texts, split_processor
from .metrics_msclip import (
    DEFAULT_RETRIEVAL_KS,
    linear_probe,
    retrieval_metrics,
    zero_shot_classifier,
    zero_shot_metrics,
)

# A few generic prompts written for this project (not the 80 ImageNet prompts of the CLIP paper). Pass your own list
# to `evaluate_zero_shot(..., templates=...)` for a dataset with a known prompt set.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
    "a picture showing a {}.",
    "a close-up photo of a {}.",
    "a low-resolution photo of a {}.",
)
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluations of a model on a dataset
# ----------------------------------------------------------------------------------------------------------------------


def class_names_from_dataset(dataset: Any, label_column: str = "label") -> list[str] | None:
    """Class names of a `datasets.ClassLabel` column, with underscores turned into spaces (None if unavailable)."""
    features = getattr(dataset, "features", None)
    if features is None or label_column not in features:
        return None
    names = getattr(features[label_column], "names", None)
    return [name.replace("_", " ") for name in names] if names else None


def build_zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Any,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """Encode `template.format(class_name)` for every class and template and build the `[C, E]` classifier."""
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"every template needs exactly one '{{}}' placeholder, got {template!r}")
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = encode_texts(model, tokenizer, prompts, batch_size=batch_size)
    return zero_shot_classifier(embeds.view(len(class_names), len(templates), -1))


def evaluate_zero_shot(
    model: torch.nn.Module,
    processor: Any,
    dataset: Iterable[Mapping[str, Any]],
    class_names: Sequence[str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 64,
    logit_scale: float = 100.0,
    top_k: Sequence[int] = (1, 5),
) -> dict[str, Any]:
    """Zero-shot classification of a labelled image dataset.

    Args:
        model: MS-CLIP (or any model with `get_text_features` / `get_image_features`).
        processor: a processor with `.tokenizer` and `.image_processor`, or a `(tokenizer, image_transform)` pair.
        dataset: rows with an image (`image_column`: PIL image, path or `datasets` image) and an integer label
            (`label_column`), e.g. `load_dataset("imagefolder", data_dir=...)`.
        class_names: names in label order; default: the dataset's `ClassLabel` names.
        templates: prompt templates with one `{}` placeholder each.
        image_column / label_column: column names.
        batch_size: batch size of both encoders.
        logit_scale: fixed scale of the cosine logits (100 as in MS-CLIP's zero-shot script).
        top_k: k values to report.

    Returns:
        `zero_shot_metrics` output plus `num_skipped` (records whose image or label could not be used).
    """
    tokenizer, image_preprocess = split_processor(processor)
    if class_names is None:
        class_names = class_names_from_dataset(dataset, label_column)
        if class_names is None:
            raise ValueError("class_names is required: the dataset has no ClassLabel names to take them from")
    class_names = list(class_names)

    def extract_label(row: Mapping[str, Any]) -> int:
        label = int(row[label_column])
        if not 0 <= label < len(class_names):
            raise ValueError(f"label {label} outside [0, {len(class_names)})")
        return label

    image_embeds, labels, num_skipped = encode_dataset_images(
        model, image_preprocess, dataset, image_column, extract_label, batch_size
    )
    if image_embeds is None:
        raise ValueError(f"no usable records in the zero-shot dataset ({num_skipped} skipped)")
    classifier = build_zero_shot_classifier(model, tokenizer, class_names, templates, batch_size=batch_size)
    metrics = zero_shot_metrics(
        image_embeds, classifier, torch.tensor(labels), logit_scale=logit_scale, top_k=top_k, class_names=class_names
    )
    metrics["num_skipped"] = num_skipped
    return metrics


def _captions_of(value: Any) -> list[str]:
    """A caption field is a string or a list of strings; empty strings are dropped."""
    if isinstance(value, str):
        captions = [value]
    elif isinstance(value, Sequence):
        captions = list(value)
        if not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be strings")
    else:
        raise ValueError(f"captions must be a string or a list of strings, got {type(value).__name__}")
    return [c for c in captions if c.strip()]


def evaluate_retrieval(
    model: torch.nn.Module,
    processor: Any,
    dataset: Iterable[Mapping[str, Any]],
    *,
    image_column: str = "image",
    text_column: str = "text",
    batch_size: int = 64,
    ks: Sequence[int] = DEFAULT_RETRIEVAL_KS,
) -> dict[str, Any]:
    """Image-text retrieval Recall@k on a captioned image dataset.

    Args:
        model: MS-CLIP (or any model with `get_text_features` / `get_image_features`).
        processor: a processor, or a `(tokenizer, image_transform)` pair.
        dataset: one row per image: `image_column` (image) and `text_column` (a caption or a list of captions),
            e.g. an imagefolder with a `metadata.jsonl` holding `file_name` and `text`.
        image_column / text_column: column names.
        batch_size: batch size of both encoders.
        ks: k values to report.

    Returns:
        `retrieval_metrics` output plus `num_skipped` (records with an unreadable image or caption field).
    """
    tokenizer, image_preprocess = split_processor(processor)
    image_embeds, captions_per_image, num_skipped = encode_dataset_images(
        model, image_preprocess, dataset, image_column, lambda row: _captions_of(row[text_column]), batch_size
    )
    if image_embeds is None:
        raise ValueError(f"no usable records in the retrieval dataset ({num_skipped} skipped)")
    texts = [caption for captions in captions_per_image for caption in captions]
    owners = [index for index, captions in enumerate(captions_per_image) for _ in captions]
    if not texts:
        raise ValueError("the retrieval dataset has no non-empty captions")
    text_embeds = encode_texts(model, tokenizer, texts, batch_size=batch_size)
    metrics = retrieval_metrics(image_embeds, text_embeds, torch.tensor(owners), ks=ks)
    metrics["num_skipped"] = num_skipped
    return metrics


def evaluate_linear_probe(
    model: torch.nn.Module,
    processor: Any,
    train_dataset: Iterable[Mapping[str, Any]],
    test_dataset: Iterable[Mapping[str, Any]],
    *,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 64,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Linear probe on the model's image embeddings (`get_image_features(...).pooler_output`).

    `probe_kwargs` go to `linear_probe` (`l2_grid`, `validation_fraction`, `standardize`, `device`, ...).
    Returns `linear_probe` output plus `num_skipped` (train + test records that could not be used).
    """
    _, image_preprocess = split_processor(processor)

    def features_of(dataset: Iterable[Mapping[str, Any]], name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        features, labels, skipped = encode_dataset_images(
            model, image_preprocess, dataset, image_column, lambda row: int(row[label_column]), batch_size
        )
        if features is None:
            raise ValueError(f"no usable records in the linear-probe {name} dataset ({skipped} skipped)")
        return features, torch.tensor(labels), skipped

    train_features, train_labels, train_skipped = features_of(train_dataset, "train")
    test_features, test_labels, test_skipped = features_of(test_dataset, "test")
    metrics = linear_probe(train_features, train_labels, test_features, test_labels, **probe_kwargs)
    metrics["num_skipped"] = train_skipped + test_skipped
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Convert tensors, numpy values and non-finite floats (-> None) into plain JSON types, recursively."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_results_json(results: Mapping[str, Any], path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `results` as indented JSON; refuses to replace an existing file unless `overwrite=True`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(results), indent=2, sort_keys=True) + "\n")
    return path


def format_results_table(results: Mapping[str, Any]) -> str:
    """Render scalar metrics as an aligned text table.

    `results` is either `{task: {metric: value}}` or a flat `{metric: value}`. Nested non-scalar entries
    (per-class dicts, sweeps) are left out; fractions are printed with 4 decimals, counts as integers.
    """
    if results and all(isinstance(v, Mapping) for v in results.values()):
        sections = dict(results)
    else:
        sections = {"": results}
    rows = []
    for task, metrics in sections.items():
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                continue
            text = f"{int(value)}" if isinstance(value, (int, np.integer)) else f"{float(value):.4f}"
            rows.append((str(task), str(name), text))
    if not rows:
        return "(no scalar metrics)"
    header = ("task", "metric", "value")
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(3)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join((r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]))) for r in rows]
    return "\n".join(lines)


def flatten_scalar_metrics(
    results: Mapping[str, Any], prefix: str = "", include_sizes: bool = True
) -> dict[str, float]:
    """`{task: {metric: v}}` -> `{f"{prefix}{task}_{metric}": float(v)}` keeping only finite scalars.

    With `include_sizes=False` the constant dataset sizes (`num_*` except `num_skipped`) are dropped.
    """
    flat: dict[str, float] = {}
    for task, metrics in results.items():
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                continue
            if not include_sizes and name.startswith("num_") and name != "num_skipped":
                continue
            if math.isfinite(float(value)):
                flat[f"{prefix}{task}_{name}"] = float(value)
    return flat


EVAL_PURPOSES = ("auto", "classification", "retrieval")


def load_eval_dataset(
    path: str | os.PathLike | Any,
    max_samples: int | None = None,
    *,
    split: str | None = None,
    purpose: str = "auto",
    format: str = "auto",
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    require_class_names: bool = False,
) -> Any:
    """Load an evaluation dataset through the project's one loader, `data_msclip.load_dataset` (images stay
    undecoded until used).

    Every format of docs/data.md is read, detected by the same rules as everywhere (``format="auto"``) or named
    with ``format``: class folders, image folders with ``metadata.jsonl`` (captions and/or label columns),
    CSV/TSV/JSONL/Parquet tables, webdataset shards (retrieval), ``save_to_disk`` folders, Hub datasets. A folder
    with a metadata file is an image folder: its classification needs a label column (``label`` or
    ``label_column``); for class sub-folders next to a metadata file (the Fashion-MNIST tree) pass
    ``format="classfolder"``.

    Args:
        path: folder, file, shard pattern, Hub id or `datasets` object.
        max_samples: keep N records drawn at random (seed 0) without replacement, so that a folder sorted by class
            still yields every class.
        split: split to use when the source has several (``path/split`` is read when that folder exists).
        purpose: ``"classification"`` (image + label: zero-shot, linear probe), ``"retrieval"`` (image + caption)
            or ``"auto"`` (class folders as classification data, anything else as image-text data).
        format: one of `data_msclip.FORMATS`.
        image_column / text_column: columns of a table or datasets source (detected when None).
        label_column: label column for classification data (renamed to ``label``; default ``label``).
        class_names: names of integer labels that carry none (classification only).
        require_class_names: raise when integer labels have no names (zero-shot prompts need them).

    Returns:
        A `datasets.Dataset` with ``image`` and ``label`` (a `ClassLabel`: classification) or ``text`` (image-text)
        columns.
    """
    from .data_msclip import detect_format, load_dataset, prepare_labels

    if purpose not in EVAL_PURPOSES:
        raise ValueError(f"purpose must be one of {EVAL_PURPOSES}, got {purpose!r}")
    if purpose == "auto":
        if isinstance(path, (str, os.PathLike)):
            format = detect_format(path, split=split) if format == "auto" else format  # detected once
            purpose = "classification" if format == "classfolder" else "retrieval"
        else:
            features = getattr(path, "features", None) or {}
            labelled = type(features.get(label_column or "label")).__name__ == "ClassLabel"
            purpose = "classification" if labelled and "text" not in features else "retrieval"
    task = "classification" if purpose == "classification" else "image-text"
    dataset = load_dataset(
        path,
        format=format,
        task=task,
        split=split,
        image_column=image_column,
        text_column=text_column,
        label_column=label_column,
    )
    if task == "classification":
        dataset, _ = prepare_labels(dataset, class_names=class_names, require_class_names=require_class_names)
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=0).select(range(max_samples))
    return dataset
