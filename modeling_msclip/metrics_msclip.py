# Copyright 2025 The modeling_msclip authors. Licensed under the Apache License, Version 2.0.
"""Pure metric functions of MS-CLIP evaluation, on tensors: `zero_shot_classifier`, `zero_shot_metrics`,
`retrieval_metrics` and `linear_probe`. They know nothing about models and are what the tests check against
hand-computed numbers; `evaluation_msclip` turns a model plus a dataset into their inputs.

Conventions shared by every metric (see docs/evaluation.md for the exact definitions):

* Embeddings are L2-normalised inside the metric functions; pass the raw projected embeddings.
* Ranks are computed with *pessimistic* tie-breaking: a query's rank is the number of wrong candidates that score
  at least as high as the right one. A collapsed model (all scores equal) therefore scores 0, never 100 %.
* Every metric is a fraction in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10)
DEFAULT_L2_GRID: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

# Rows of the similarity matrix processed at once in the rank computations: bounds memory at
# _RANK_CHUNK x num_candidates floats for e.g. 25k-caption retrieval sets.
_RANK_CHUNK = 1024


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA where it is available and else the CPU (the default of every ``device=`` here)."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
# Metrics
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
