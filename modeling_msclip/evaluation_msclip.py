# Copyright 2025 The modeling_msclip authors. Licensed under the Apache License, Version 2.0.
"""Evaluation of MS-CLIP models: zero-shot classification, image-text retrieval and linear probing.

The module has two layers:

1. Pure metric functions on tensors (`zero_shot_classifier`, `zero_shot_metrics`, `retrieval_metrics`,
   `linear_probe`). They know nothing about models and are what the tests check against hand-computed numbers.
2. Model-driven wrappers (`encode_texts`, `encode_images`, `evaluate_zero_shot`, `evaluate_retrieval`,
   `evaluate_linear_probe`, `ZeroShotEvalCallback`) that turn a model plus a dataset into the tensors above.
   They only need `model.get_text_features(...)` / `model.get_image_features(...)` returning an object with a
   `.pooler_output` (transformers v5 convention), so they also work with `transformers.CLIPModel`.

Conventions shared by every metric (see docs/evaluation.md for the exact definitions):

* Embeddings are L2-normalised inside the metric functions; pass the raw projected embeddings.
* Ranks are computed with *pessimistic* tie-breaking: a query's rank is the number of wrong candidates that score
  at least as high as the right one. A collapsed model (all scores equal) therefore scores 0, never 100 %.
* Every metric is a fraction in [0, 1].

The command line is ``training/run_evaluation.py`` in the repository (data in any format `load_eval_dataset`
reads, i.e. `data_msclip.load_dataset`: class folders, image folders with ``metadata.jsonl``, CSV/TSV/JSONL/Parquet,
webdataset shards, `Dataset.save_to_disk` folders, Hub datasets)::

    python training/run_evaluation.py --model DIR --zero-shot-data DIR --retrieval-data DIR \
        --linear-probe-train DIR --linear-probe-test DIR --output results.json
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import TrainerCallback
from transformers.image_processing_base import ImageProcessingMixin
from transformers.processing_utils import ProcessorMixin

from .data_msclip import decode_image

logger = logging.getLogger(__name__)

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

DEFAULT_RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10)
DEFAULT_L2_GRID: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

# Rows of the similarity matrix processed at once in the rank computations: bounds memory at
# _RANK_CHUNK x num_candidates floats for e.g. 25k-caption retrieval sets.
_RANK_CHUNK = 1024


# ----------------------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------------------


def _as_float_matrix(name: str, value: Any) -> torch.Tensor:
    """Return `value` as a finite float32 [N, E] CPU tensor, or raise a ValueError naming `name`."""
    tensor = torch.as_tensor(value)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [num_items, embed_dim] tensor, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.float()
    tensor = tensor.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _as_index_vector(name: str, value: Any, length: int, upper: int | None = None) -> torch.Tensor:
    """Return `value` as an int64 [length] CPU tensor with entries in [0, upper), or raise a ValueError."""
    tensor = torch.as_tensor(value).detach().cpu()
    if tensor.dim() != 1 or tensor.shape[0] != length:
        raise ValueError(f"{name} must be a 1-D tensor of length {length}, got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer indices, got dtype {tensor.dtype}")
    tensor = tensor.long()
    if length and tensor.min() < 0:
        raise ValueError(f"{name} contains negative indices")
    if upper is not None and length and tensor.max() >= upper:
        raise ValueError(f"{name} contains index {int(tensor.max())}, but only {upper} candidates exist")
    return tensor


# ----------------------------------------------------------------------------------------------------------------------
# (i) Pure metric functions
# ----------------------------------------------------------------------------------------------------------------------


def zero_shot_classifier(class_text_embeds_per_template: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Build the zero-shot classifier weights from per-template class text embeddings.

    For every class, each template embedding is L2-normalised, the normalised embeddings are averaged and the mean
    is L2-normalised again (the CLIP "prompt ensembling" recipe).

    Args:
        class_text_embeds_per_template: either a tensor `[num_classes, num_templates, embed_dim]`, or a sequence of
            `num_classes` tensors `[num_templates_c, embed_dim]` (classes may use different numbers of templates).

    Returns:
        `[num_classes, embed_dim]` float32 tensor with unit-norm rows.
    """
    if isinstance(class_text_embeds_per_template, torch.Tensor):
        if class_text_embeds_per_template.dim() != 3:
            raise ValueError(
                "class_text_embeds_per_template must be [num_classes, num_templates, embed_dim], got shape "
                f"{tuple(class_text_embeds_per_template.shape)}"
            )
        per_class = list(class_text_embeds_per_template.unbind(0))
    else:
        per_class = list(class_text_embeds_per_template)
    if not per_class:
        raise ValueError("class_text_embeds_per_template is empty: need at least one class")
    weights = []
    for class_index, embeds in enumerate(per_class):
        embeds = _as_float_matrix(f"class {class_index} template embeddings", embeds)
        if embeds.shape[0] == 0:
            raise ValueError(f"class {class_index} has no template embeddings")
        weights.append(F.normalize(F.normalize(embeds, dim=-1).mean(dim=0), dim=-1))
    embed_dims = {w.shape[0] for w in weights}
    if len(embed_dims) != 1:
        raise ValueError(f"all classes must share one embedding size, got sizes {sorted(embed_dims)}")
    return torch.stack(weights)


def _pessimistic_rank(scores: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """Number of entries per row that score >= the row's target, minus the target itself (ties count against)."""
    return (scores >= target_scores.unsqueeze(1)).sum(dim=1) - 1


def zero_shot_metrics(
    image_embeds: torch.Tensor,
    classifier: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float = 100.0,
    top_k: Sequence[int] = (1, 5),
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Zero-shot classification metrics from image embeddings and a classifier built by `zero_shot_classifier`.

    `logits = logit_scale * normalize(image_embeds) @ classifier.T`. A sample counts as correct at k if fewer than k
    *other* classes have a logit >= that of its true class (ties count against the model). k is capped at the
    number of classes, so with 3 classes "top5" is top-3 (always 1.0).

    Args:
        image_embeds: `[num_images, embed_dim]` raw image embeddings (normalised here).
        classifier: `[num_classes, embed_dim]` class weights (normalised here again, a no-op for
            `zero_shot_classifier` output).
        labels: `[num_images]` integer class ids in `[0, num_classes)`.
        logit_scale: multiplier of the cosine similarities (MS-CLIP / CLIP zero-shot use a fixed 100). It does not
            change any accuracy, only `cross_entropy`.
        top_k: the k values to report as `top{k}`.
        class_names: optional names used as keys of `per_class_accuracy` (default: the class index as a string).

    Returns:
        dict with `top{k}` for each k, `mean_per_class_recall` (mean over classes present in `labels` of the
        fraction of their images predicted correctly at top-1), `per_class_accuracy` ({class: top-1 recall}, only
        classes present in `labels`), `cross_entropy` (mean negative log-softmax of the true class),
        `num_samples`, `num_classes`.
    """
    image_embeds = _as_float_matrix("image_embeds", image_embeds)
    classifier = _as_float_matrix("classifier", classifier)
    if image_embeds.shape[1] != classifier.shape[1]:
        raise ValueError(f"image_embeds has embed_dim {image_embeds.shape[1]} but classifier has {classifier.shape[1]}")
    num_images, num_classes = image_embeds.shape[0], classifier.shape[0]
    if num_images == 0:
        raise ValueError("zero_shot_metrics needs at least one image")
    labels = _as_index_vector("labels", labels, num_images, upper=num_classes)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries but the classifier has {num_classes} classes")
    if any(k < 1 for k in top_k):
        raise ValueError(f"top_k values must be >= 1, got {list(top_k)}")

    logits = logit_scale * F.normalize(image_embeds, dim=-1) @ F.normalize(classifier, dim=-1).T
    ranks = _pessimistic_rank(logits, logits.gather(1, labels[:, None]).squeeze(1))

    metrics: dict[str, Any] = {}
    for k in top_k:
        metrics[f"top{k}"] = (ranks < min(k, num_classes)).double().mean().item()
    correct_top1 = ranks == 0
    per_class: dict[str, float] = {}
    for class_index in labels.unique().tolist():
        in_class = labels == class_index
        name = class_names[class_index] if class_names is not None else str(class_index)
        per_class[name] = correct_top1[in_class].double().mean().item()
    metrics["mean_per_class_recall"] = float(np.mean(list(per_class.values())))
    metrics["per_class_accuracy"] = per_class
    metrics["cross_entropy"] = F.cross_entropy(logits.double(), labels).item()
    metrics["num_samples"] = num_images
    metrics["num_classes"] = num_classes
    return metrics


def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_to_image_index: torch.Tensor,
    ks: Sequence[int] = DEFAULT_RETRIEVAL_KS,
) -> dict[str, Any]:
    """Image-to-text and text-to-image Recall@k with any number of captions per image.

    Similarity is the cosine of the normalised embeddings.

    * text->image: for caption t with image i = `text_to_image_index[t]`, rank = number of other images whose
      similarity to t is >= sim(t, i). Hit at k if rank < k.
    * image->text: for image i with captions C_i, rank = number of captions *not* in C_i whose similarity to i is
      >= the best similarity among C_i. Hit at k if rank < k, i.e. at least one of its captions is in the top k.
      Images without any caption are excluded from the image->text queries (counted in
      `num_images_without_captions`) but stay in the gallery for text->image.

    Args:
        image_embeds: `[num_images, embed_dim]`.
        text_embeds: `[num_texts, embed_dim]`.
        text_to_image_index: `[num_texts]` index of the image each caption belongs to.
        ks: the k values to report.

    Returns:
        dict with `image_to_text_recall@k` and `text_to_image_recall@k` for each k, `mean_recall` (mean of all of
        them), `num_images`, `num_texts`, `num_images_without_captions`.
    """
    image_embeds = F.normalize(_as_float_matrix("image_embeds", image_embeds), dim=-1)
    text_embeds = F.normalize(_as_float_matrix("text_embeds", text_embeds), dim=-1)
    if image_embeds.shape[1] != text_embeds.shape[1]:
        raise ValueError(
            f"image_embeds has embed_dim {image_embeds.shape[1]} but text_embeds has {text_embeds.shape[1]}"
        )
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval needs at least one image and one text, got {num_images} and {num_texts}")
    owner = _as_index_vector("text_to_image_index", text_to_image_index, num_texts, upper=num_images)
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {list(ks)}")

    text_ranks = torch.empty(num_texts, dtype=torch.long)
    for start in range(0, num_texts, _RANK_CHUNK):
        scores = text_embeds[start : start + _RANK_CHUNK] @ image_embeds.T
        own = owner[start : start + _RANK_CHUNK]
        text_ranks[start : start + _RANK_CHUNK] = _pessimistic_rank(scores, scores.gather(1, own[:, None]).squeeze(1))

    has_caption = torch.bincount(owner, minlength=num_images) > 0
    image_ranks = []
    for start in range(0, num_images, _RANK_CHUNK):
        scores = image_embeds[start : start + _RANK_CHUNK] @ text_embeds.T
        rows = torch.arange(start, start + scores.shape[0])
        is_own = owner[None, :] == rows[:, None]
        best_own = scores.masked_fill(~is_own, -math.inf).max(dim=1).values
        ranks = ((scores >= best_own[:, None]) & ~is_own).sum(dim=1)
        image_ranks.append(ranks[has_caption[rows]])
    image_ranks = torch.cat(image_ranks)

    metrics: dict[str, Any] = {}
    for k in ks:
        metrics[f"image_to_text_recall@{k}"] = (image_ranks < k).double().mean().item()
    for k in ks:
        metrics[f"text_to_image_recall@{k}"] = (text_ranks < k).double().mean().item()
    metrics["mean_recall"] = float(
        np.mean([metrics[f"{d}_recall@{k}"] for d in ("image_to_text", "text_to_image") for k in ks])
    )
    metrics["num_images"] = num_images
    metrics["num_texts"] = num_texts
    metrics["num_images_without_captions"] = int((~has_caption).sum())
    return metrics


def _stratified_validation_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (fit, validation), taking floor(fraction * n_c) (at least 1 if n_c >= 2) per class."""
    generator = torch.Generator().manual_seed(seed)
    fit, validation = [], []
    for class_index in labels.unique().tolist():
        members = torch.nonzero(labels == class_index).squeeze(1)
        members = members[torch.randperm(members.numel(), generator=generator)]
        num_val = int(math.floor(fraction * members.numel()))
        if members.numel() >= 2:
            num_val = max(num_val, 1)
        num_val = min(num_val, members.numel() - 1)
        validation.append(members[:num_val])
        fit.append(members[num_val:])
    return torch.cat(fit).sort().values, torch.cat(validation).sort().values


def _fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int,
    tolerance: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS.

    Minimises `mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||_F^2` (bias not penalised), i.e. scikit-learn's
    `LogisticRegression(C=1 / (l2 * n))` objective divided by n. Full batch + a fixed start point make it
    deterministic.
    """
    num_features = features.shape[1]
    if init is None:
        weight = torch.zeros(num_classes, num_features, dtype=features.dtype, device=features.device)
        bias = torch.zeros(num_classes, dtype=features.dtype, device=features.device)
    else:
        weight, bias = init[0].clone(), init[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        tolerance_change=tolerance * 1e-3,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _standardize(fit_features: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero-mean / unit-variance scaling with statistics of `fit_features` (constant features are left unscaled)."""
    mean = fit_features.mean(dim=0)
    std = fit_features.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return [(x - mean) / std for x in (fit_features, *others)]


def _accuracy_and_mean_per_class(correct: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Overall accuracy and the mean over the classes present in `labels` of their accuracy."""
    per_class = [correct[labels == c].double().mean().item() for c in labels.unique().tolist()]
    return correct.double().mean().item(), float(np.mean(per_class))


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    validation_fraction: float = 0.2,
    standardize: bool = True,
    max_iter: int = 1000,
    tolerance: float = 1e-6,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Linear-probe accuracy of frozen features with a multinomial logistic regression.

    Implementation: full-batch L-BFGS in torch (`_fit_logistic_regression`), chosen over scikit-learn so that the
    library needs no extra dependency and large feature sets (ImageNet: 1.28M x 512) can be fitted on a GPU via
    `device=`. Full batch, zero initialisation and a seeded split make it deterministic. The objective equals
    scikit-learn's `LogisticRegression(C=1/(l2*n))` (the tests compare both).

    Protocol: a stratified `validation_fraction` of the training set is held out (seeded); for each `l2` in
    `l2_grid` (fitted from the largest to the smallest value, each warm-started from the previous solution) the
    model is fitted on the rest and scored on the held-out part; the `l2` with the best held-out accuracy wins
    (ties go to the larger `l2`); the model is refitted on the whole training set with it and scored on the test
    set. With a single `l2` value no split is made.

    Args:
        train_features / test_features: `[n, d]` features (e.g. image embeddings).
        train_labels / test_labels: `[n]` integer labels. Test labels never seen in training count as errors.
        l2_grid: penalties `l2` of the objective `mean CE + l2/2 * ||W||^2`.
        validation_fraction: fraction of each training class held out for the sweep.
        standardize: scale features to zero mean / unit variance with the fitting set's statistics.
        max_iter / tolerance: L-BFGS limits.
        seed: seed of the validation split.
        device / dtype: where and in which precision to fit (default: CUDA where available, else the CPU;
            float32). The fit is deterministic on one device; CPU and GPU agree to float32 rounding.

    Returns:
        dict with `accuracy`, `mean_per_class_recall` (test set), `best_l2`, `sweep` (list of
        `{"l2", "validation_accuracy"}`, largest `l2` first; empty without a sweep), `num_train` (all training
        samples, used by the final fit), `num_validation` (held out during the sweep), `num_test`, `num_classes`.
    """
    train_features = _as_float_matrix("train_features", train_features)
    test_features = _as_float_matrix("test_features", test_features)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features has {train_features.shape[1]} dims but test_features has {test_features.shape[1]}"
        )
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("linear_probe needs at least one training and one test sample")
    train_labels = _as_index_vector("train_labels", train_labels, train_features.shape[0])
    test_labels = _as_index_vector("test_labels", test_labels, test_features.shape[0])
    l2_grid = sorted({float(v) for v in l2_grid}, reverse=True)
    if not l2_grid or any(v < 0 for v in l2_grid):
        raise ValueError(f"l2_grid must hold non-negative values, got {l2_grid}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")

    # Contiguous class ids 0..K-1 for the classes seen in training; unseen test classes map to -1 (always wrong).
    classes = train_labels.unique()
    num_classes = classes.numel()
    to_contiguous = {c: i for i, c in enumerate(classes.tolist())}
    y_train = torch.tensor([to_contiguous[c] for c in train_labels.tolist()], dtype=torch.long)
    y_test = torch.tensor([to_contiguous.get(c, -1) for c in test_labels.tolist()], dtype=torch.long)
    device = default_device(device)

    def predict(fit_idx: torch.Tensor, eval_features: torch.Tensor, params) -> torch.Tensor:
        fit_features = train_features[fit_idx]
        if standardize:
            _, eval_features = _standardize(fit_features, eval_features)
        eval_features = eval_features.to(device=device, dtype=dtype)
        return (eval_features @ params[0].T + params[1]).argmax(dim=1).cpu()

    def standardized_train(fit_idx: torch.Tensor) -> torch.Tensor:
        return _standardize(train_features[fit_idx])[0] if standardize else train_features[fit_idx]

    all_idx = torch.arange(train_features.shape[0])
    sweep: list[dict[str, float]] = []
    num_validation = 0
    if len(l2_grid) > 1:
        fit_idx, val_idx = _stratified_validation_split(y_train, validation_fraction, seed)
        if val_idx.numel() == 0:
            raise ValueError(
                "the l2 sweep needs a validation split, but no class has 2 or more training samples; "
                "pass a single value in l2_grid"
            )
        num_validation = val_idx.numel()
        fit_features = standardized_train(fit_idx)
        params = None
        best_l2, best_accuracy = l2_grid[0], -1.0
        for l2 in l2_grid:
            params = _fit_logistic_regression(
                fit_features.to(device=device, dtype=dtype),
                y_train[fit_idx].to(device),
                num_classes,
                l2,
                max_iter,
                tolerance,
                params,
            )
            accuracy = (predict(fit_idx, train_features[val_idx], params) == y_train[val_idx]).double().mean().item()
            sweep.append({"l2": l2, "validation_accuracy": accuracy})
            if accuracy > best_accuracy:
                best_l2, best_accuracy = l2, accuracy
    else:
        best_l2 = l2_grid[0]

    params = _fit_logistic_regression(
        standardized_train(all_idx).to(device=device, dtype=dtype),
        y_train.to(device),
        num_classes,
        best_l2,
        max_iter,
        tolerance,
    )
    predictions = predict(all_idx, test_features, params)
    # Group by the original test labels so that each unseen class stays its own (zero-recall) class.
    accuracy, mean_per_class = _accuracy_and_mean_per_class(predictions == y_test, test_labels)
    return {
        "accuracy": accuracy,
        "mean_per_class_recall": mean_per_class,
        "best_l2": best_l2,
        "sweep": sweep,
        "num_train": int(train_features.shape[0]),
        "num_validation": int(num_validation),
        "num_test": int(test_features.shape[0]),
        "num_classes": int(num_classes),
    }


# ----------------------------------------------------------------------------------------------------------------------
# (ii) Model-driven wrappers
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch to eval() (BatchNorm and dropout matter in MS-CLIP) and no_grad, restoring the training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
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


def _pixel_values(preprocess: Any, images: Sequence[Image.Image]) -> torch.Tensor:
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
    device, dtype = _model_device_and_dtype(model)
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
    device, _ = _model_device_and_dtype(model)
    outputs = []
    with _eval_mode(model):
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
    with _eval_mode(model):
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
                pixel_values = _pixel_values(preprocess, pil_images)
            outputs.append(_embed_pixel_batch(model, pixel_values))
    return torch.cat(outputs)


def _iter_rows(dataset: Iterable[Any]) -> Iterator[tuple[int, Any | None, Exception | None]]:
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


def _encode_dataset_images(
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
    with _eval_mode(model):
        for index, row, error in _iter_rows(dataset):
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
                embeds.append(_embed_pixel_batch(model, _pixel_values(preprocess, pending)))
                pending = []
        if pending:
            embeds.append(_embed_pixel_batch(model, _pixel_values(preprocess, pending)))
    if num_skipped:
        logger.warning("%d record(s) skipped", num_skipped)
    return (torch.cat(embeds) if embeds else None), extras, num_skipped


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

    image_embeds, labels, num_skipped = _encode_dataset_images(
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
    image_embeds, captions_per_image, num_skipped = _encode_dataset_images(
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
        features, labels, skipped = _encode_dataset_images(
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


# ----------------------------------------------------------------------------------------------------------------------
# Trainer callback
# ----------------------------------------------------------------------------------------------------------------------


def _needs_all_ranks(args: Any) -> bool:
    """ZeRO-3 / FSDP shard parameters: every rank must join the forward passes, not just the main one."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return True
    except ImportError:  # pragma: no cover - deepspeed integration always ships with transformers
        pass
    return bool(getattr(args, "fsdp", None))


def _broadcast_from_main(results: dict[str, float] | None) -> dict[str, float] | None:
    """Share the main process's metrics with every rank (needed for `metric_for_best_model`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return results
    if torch.distributed.get_world_size() == 1:
        return results
    payload = [results]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


class ZeroShotEvalCallback(TrainerCallback):
    """Run zero-shot classification and/or retrieval on a small held-out set during `Trainer` training.

    It runs at every trainer evaluation (`on_evaluate`, its metrics are also merged into the evaluation metrics so
    that `metric_for_best_model="eval_zeroshot_top1"` works) and, with `eval_steps=N`, every N optimizer steps.
    Metrics are named `{metric_prefix}_zeroshot_{metric}` and `{metric_prefix}_retrieval_{metric}`.

    Only the main process computes (all ranks under DeepSpeed ZeRO-3 / FSDP, whose sharded forward needs every
    rank) and logs. Logging goes through `trainer.log` (so `state.log_history` *and* reporting integrations see the
    metrics) when the trainer is attached with `callback.attach(trainer)`; otherwise the entry is appended to
    `state.log_history` directly, in the same `{..., "epoch", "step"}` format.

    Example::

        callback = ZeroShotEvalCallback(processor, zero_shot_dataset=val_images, class_names=names, eval_steps=500)
        trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
        callback.attach(trainer)
    """

    def __init__(
        self,
        processor: Any = None,
        *,
        zero_shot_dataset: Sequence[Mapping[str, Any]] | None = None,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        retrieval_dataset: Sequence[Mapping[str, Any]] | None = None,
        eval_steps: int | None = None,
        run_on_evaluate: bool = True,
        batch_size: int = 64,
        metric_prefix: str = "eval",
        image_column: str = "image",
        label_column: str = "label",
        text_column: str = "text",
    ) -> None:
        if zero_shot_dataset is None and retrieval_dataset is None:
            raise ValueError("ZeroShotEvalCallback needs a zero_shot_dataset and/or a retrieval_dataset")
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1 or None, got {eval_steps}")
        if zero_shot_dataset is not None and class_names is None:
            class_names = class_names_from_dataset(zero_shot_dataset, label_column)
            if class_names is None:
                raise ValueError("class_names is required for the zero-shot dataset (it has no ClassLabel names)")
        self.processor = processor
        self.zero_shot_dataset = zero_shot_dataset
        self.class_names = list(class_names) if class_names is not None else None
        self.templates = tuple(templates)
        self.retrieval_dataset = retrieval_dataset
        self.eval_steps = eval_steps
        self.run_on_evaluate = run_on_evaluate
        self.batch_size = batch_size
        self.metric_prefix = metric_prefix
        self.image_column = image_column
        self.label_column = label_column
        self.text_column = text_column
        self.trainer = None
        self._last_step: int | None = None
        self._last_results: dict[str, float] | None = None

    def attach(self, trainer: Any) -> ZeroShotEvalCallback:
        """Log through `trainer.log` from now on and register this callback with the trainer if it is not yet."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def compute_metrics(self, model: torch.nn.Module, processor: Any = None) -> dict[str, float]:
        """Run the configured evaluations now and return flat, prefixed scalar metrics."""
        processor = self.processor if self.processor is not None else processor
        if processor is None:
            raise ValueError("ZeroShotEvalCallback has no processor: pass one or give the Trainer a processing_class")
        results: dict[str, dict[str, Any]] = {}
        if self.zero_shot_dataset is not None:
            results["zeroshot"] = evaluate_zero_shot(
                model,
                processor,
                self.zero_shot_dataset,
                self.class_names,
                self.templates,
                image_column=self.image_column,
                label_column=self.label_column,
                batch_size=self.batch_size,
            )
        if self.retrieval_dataset is not None:
            results["retrieval"] = evaluate_retrieval(
                model,
                processor,
                self.retrieval_dataset,
                image_column=self.image_column,
                text_column=self.text_column,
                batch_size=self.batch_size,
            )
        prefix = f"{self.metric_prefix}_" if self.metric_prefix else ""
        return flatten_scalar_metrics(results, prefix=prefix, include_sizes=False)

    def _run(self, args: Any, state: Any, model: torch.nn.Module | None, processor: Any) -> dict[str, float] | None:
        """Compute (or reuse, same step) the metrics on the ranks that must and share them; log on the main one."""
        if self._last_step == state.global_step and self._last_results is not None:
            return self._last_results
        if model is None:
            raise ValueError("ZeroShotEvalCallback received no model from the Trainer")
        results = None
        if state.is_world_process_zero or _needs_all_ranks(args):
            results = self.compute_metrics(model, processor)
        results = _broadcast_from_main(results if state.is_world_process_zero else None)
        if results is None:  # single process that is not "world process zero" cannot happen; be defensive
            return None
        if state.is_world_process_zero:
            if self.trainer is not None:
                self.trainer.log(dict(results))
            else:
                state.log_history.append({**results, "epoch": state.epoch, "step": state.global_step})
        self._last_step, self._last_results = state.global_step, results
        return results

    def on_train_begin(self, args, state, control, processing_class=None, **kwargs):
        # Fail before the first step, not after N steps of training, when no processor is available.
        if self.processor is None and processing_class is None:
            raise ValueError("ZeroShotEvalCallback has no processor: pass one or give the Trainer a processing_class")
        return control

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.eval_steps is not None and state.global_step % self.eval_steps == 0:
            # `trainer.log` clears `should_log` (transformers' CallbackHandler.on_log), which would drop this step's
            # training loss when it is also a logging step: keep the flag as the flow callback set it.
            should_log = control.should_log
            self._run(args, state, model, processing_class)
            control.should_log = should_log
        return control

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        if self.run_on_evaluate:
            results = self._run(args, state, model, processing_class)
            if results is not None and metrics is not None:
                metrics.update(results)
        return control


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA where it is available and else the CPU (the default of every ``device=`` here)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        "--linear-probe-train/--linear-probe-test fit a linear probe on its vision features."
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
