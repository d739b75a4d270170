# Copyright 2025 The modeling_msclip authors. Licensed under the Apache License, Version 2.0.
"""Diagnostics of how much the image and text passes of a (modality-shared) CLIP model have in common.

Three measurements (docs/evaluation.md gives the exact definitions):

* `modality_gap`: distance between the mean normalised image and text embeddings (Liang et al. 2022), plus the
  mean cosine of matched vs. non-matched pairs.
* `modality_nmi_per_layer`: per layer, k-means (k=2) on the pooled tokens of both modalities and the normalised
  mutual information between the clusters and the modality labels. 1 = the layer separates the modalities
  perfectly, 0 = the clusters carry no modality information.
* `attention_similarity`: per layer and head, attention entropy and mean attention distance of the image pass and
  the text pass, and how well these per-head profiles correlate between the modalities.

All of these are pure tensor functions. The model-driven part is `collect_diagnostics`; the command line is
``python training/run_diagnostics.py --model DIR --data DIR --output DIR``, which prints the numbers and writes
`diagnostics.json` and `diagnostics.png` (`plot_diagnostics`) into the (new or empty) output folder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PoolingName = str  # "mean" | "first" | "last"
POOLINGS = ("mean", "first", "last")
# A Pearson correlation of two points is always +-1: per-layer head correlations need at least 3 heads.
MIN_HEADS_FOR_CORRELATION = 3


# ----------------------------------------------------------------------------------------------------------------------
# Modality gap
# ----------------------------------------------------------------------------------------------------------------------


def _finite_matrix(name: str, value: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(value).detach().to("cpu", torch.float64)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_items, dim], got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def modality_gap(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> dict[str, float]:
    """Modality gap and matched/random pair cosines of paired embeddings (row i of both is one pair).

    With û_i, v̂_i the L2-normalised image / text embeddings of N pairs:

    * `gap_l2` = ‖mean_i û_i − mean_i v̂_i‖₂
    * `matched_cosine` = mean_i û_i·v̂_i
    * `random_cosine` = mean over all i ≠ j of û_i·v̂_j (every non-matched pair, computed exactly, no sampling)
    * `matched_minus_random` = the difference of the two.

    Returns:
        dict with the four values and `num_pairs`.
    """
    image = F.normalize(_finite_matrix("image_embeds", image_embeds), dim=-1)
    text = F.normalize(_finite_matrix("text_embeds", text_embeds), dim=-1)
    if image.shape != text.shape:
        raise ValueError(f"paired embeddings need equal shapes, got {tuple(image.shape)} and {tuple(text.shape)}")
    num_pairs = image.shape[0]
    if num_pairs < 2:
        raise ValueError("modality_gap needs at least 2 pairs (random pairs are i != j)")
    matched = (image * text).sum(dim=-1)
    # sum over all (i, j) of û_i·v̂_j = (Σ û_i)·(Σ v̂_j); removing the diagonal leaves the non-matched pairs.
    all_pairs_sum = image.sum(dim=0) @ text.sum(dim=0)
    random_cosine = (all_pairs_sum - matched.sum()) / (num_pairs * (num_pairs - 1))
    return {
        "gap_l2": torch.linalg.vector_norm(image.mean(dim=0) - text.mean(dim=0)).item(),
        "matched_cosine": matched.mean().item(),
        "random_cosine": random_cosine.item(),
        "matched_minus_random": (matched.mean() - random_cosine).item(),
        "num_pairs": num_pairs,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Clustering and NMI
# ----------------------------------------------------------------------------------------------------------------------


def _entropy(counts: torch.Tensor) -> float:
    probabilities = counts[counts > 0].double() / counts.sum()
    return float(-(probabilities * probabilities.log()).sum())


def normalized_mutual_info(labels_a: torch.Tensor | Sequence[int], labels_b: torch.Tensor | Sequence[int]) -> float:
    """NMI(a, b) = I(a; b) / ((H(a) + H(b)) / 2) with natural logs (scikit-learn's "arithmetic" normalisation).

    Conventions: if both labelings have a single cluster, NMI = 1 (they agree trivially); if only one does,
    I = 0 and NMI = 0.
    """
    a = torch.as_tensor(labels_a).long().flatten()
    b = torch.as_tensor(labels_b).long().flatten()
    if a.numel() != b.numel():
        raise ValueError(f"label vectors differ in length: {a.numel()} vs {b.numel()}")
    if a.numel() == 0:
        raise ValueError("normalized_mutual_info needs at least one sample")
    _, a = a.unique(return_inverse=True)
    _, b = b.unique(return_inverse=True)
    num_a, num_b = int(a.max()) + 1, int(b.max()) + 1
    contingency = torch.zeros(num_a, num_b, dtype=torch.float64)
    contingency.index_put_((a, b), torch.ones(a.numel(), dtype=torch.float64), accumulate=True)
    entropy_a, entropy_b = _entropy(contingency.sum(dim=1)), _entropy(contingency.sum(dim=0))
    if entropy_a == 0.0 and entropy_b == 0.0:
        return 1.0
    joint = contingency / contingency.sum()
    outer = joint.sum(dim=1, keepdim=True) * joint.sum(dim=0, keepdim=True)
    nonzero = joint > 0
    mutual_info = float((joint[nonzero] * (joint[nonzero] / outer[nonzero]).log()).sum())
    denominator = 0.5 * (entropy_a + entropy_b)
    # Rounding can leave I a hair above the bound or below 0.
    return float(min(max(mutual_info / denominator, 0.0), 1.0))


def kmeans(
    points: torch.Tensor, num_clusters: int = 2, *, num_init: int = 10, max_iter: int = 300, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's k-means with k-means++ seeding, `num_init` seeded restarts, lowest inertia wins (deterministic).

    Computed in float64 on CPU. An empty cluster is re-seeded with the point farthest from its centroid.

    Returns:
        `(labels [N], centroids [k, D], inertia)` where inertia is the sum of squared distances to the centroids.
    """
    x = _finite_matrix("points", points)
    num_points = x.shape[0]
    if not 1 <= num_clusters <= num_points:
        raise ValueError(f"num_clusters must be in [1, {num_points}], got {num_clusters}")
    generator = torch.Generator().manual_seed(seed)
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for _ in range(num_init):
        # k-means++: next centre drawn with probability proportional to the squared distance to the nearest one.
        centroids = x[torch.randint(num_points, (1,), generator=generator)]
        for _ in range(1, num_clusters):
            nearest = torch.cdist(x, centroids).min(dim=1).values.pow(2)
            if nearest.sum() <= 0:
                choice = torch.randint(num_points, (1,), generator=generator)
            else:
                choice = torch.multinomial(nearest / nearest.sum(), 1, generator=generator)
            centroids = torch.cat([centroids, x[choice]])
        labels = torch.full((num_points,), -1, dtype=torch.long)
        for _ in range(max_iter):
            new_labels = torch.cdist(x, centroids).argmin(dim=1)
            if torch.equal(new_labels, labels):
                break
            labels = new_labels
            for cluster in range(num_clusters):
                members = labels == cluster
                if members.any():
                    centroids[cluster] = x[members].mean(dim=0)
                else:
                    far = torch.cdist(x, centroids).min(dim=1).values.argmax()
                    centroids[cluster] = x[far]
        inertia = float((x - centroids[labels]).pow(2).sum())
        if best is None or inertia < best[2] - 1e-12:
            best = (labels.clone(), centroids.clone(), inertia)
    return best


def pool_hidden_states(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, pooling: PoolingName = "mean"
) -> torch.Tensor:
    """Pool one layer's `[B, L, D]` token states to `[B, D]`.

    `mean`: mean over tokens where `attention_mask` is 1 (all tokens if None); `first`: token 0 (CLS);
    `last`: the last token with mask 1 (the EOT token of right-padded text; the last token if no mask).
    A `[B, D]` input is returned unchanged (already pooled).
    """
    hidden_states = torch.as_tensor(hidden_states)
    if hidden_states.dim() == 2:
        return hidden_states
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden states must be [B, L, D] or pooled [B, D], got shape {tuple(hidden_states.shape)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    batch, length, _ = hidden_states.shape
    if attention_mask is None:
        mask = torch.ones(batch, length, dtype=hidden_states.dtype, device=hidden_states.device)
    else:
        mask = torch.as_tensor(attention_mask).to(hidden_states.device, hidden_states.dtype)
        if mask.shape != (batch, length):
            raise ValueError(f"attention_mask must be [{batch}, {length}], got {tuple(mask.shape)}")
        if (mask.sum(dim=1) == 0).any():
            raise ValueError("attention_mask has a row without any valid token")
    if pooling == "first":
        return hidden_states[:, 0]
    if pooling == "last":
        positions = torch.arange(length, device=hidden_states.device).expand(batch, length)
        last = torch.where(mask > 0, positions, torch.full_like(positions, -1)).max(dim=1).values
        return hidden_states[torch.arange(batch), last]
    return (hidden_states * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)


def _layer_pairs(num_image: int, num_text: int, layer_pairs: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """Default pairing aligns the two stacks from their last layer (MS-CLIP-S: vision 1..11 <-> text 1..11)."""
    if layer_pairs is not None:
        pairs = [(int(i), int(t)) for i, t in layer_pairs]
        for image_layer, text_layer in pairs:
            if not (-num_image <= image_layer < num_image and -num_text <= text_layer < num_text):
                raise ValueError(f"layer pair {(image_layer, text_layer)} out of range ({num_image}, {num_text})")
        return pairs
    shared = min(num_image, num_text)
    return [(num_image - shared + k, num_text - shared + k) for k in range(shared)]


def modality_nmi_per_layer(
    image_hidden_states: Sequence[torch.Tensor],
    text_hidden_states: Sequence[torch.Tensor],
    *,
    image_attention_mask: torch.Tensor | None = None,
    text_attention_mask: torch.Tensor | None = None,
    image_pooling: PoolingName = "mean",
    text_pooling: PoolingName = "mean",
    layer_pairs: Sequence[tuple[int, int]] | None = None,
    normalize: bool = False,
    num_init: int = 10,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Per-layer modality NMI: how well k-means (k=2) on pooled features recovers the modality.

    For each paired layer: pool each modality's tokens (`pool_hidden_states`), optionally L2-normalise
    (`normalize=True` removes the trivial cue of different feature norms), run `kmeans` with k=2 on the union of the
    B_img + B_txt points, and report `normalized_mutual_info(cluster ids, modality labels)`.

    Args:
        image_hidden_states / text_hidden_states: per-layer tensors `[B, L, D]` (e.g. `hidden_states` of the model
            outputs) or already pooled `[B, D]`. Both modalities must have the same width D at paired layers.
        image_attention_mask / text_attention_mask: `[B, L]` masks of valid tokens (text padding).
        image_pooling / text_pooling: "mean", "first" or "last" (see `pool_hidden_states`).
        layer_pairs: `(image_layer, text_layer)` index pairs; default: align both stacks from the last layer.
        normalize: L2-normalise pooled features before clustering.
        num_init / seed: k-means restarts and seed.

    Returns:
        list of `{"image_layer", "text_layer", "nmi"}`, one per pair.
    """
    image_hidden_states, text_hidden_states = list(image_hidden_states), list(text_hidden_states)
    if not image_hidden_states or not text_hidden_states:
        raise ValueError("need at least one layer of hidden states per modality")
    results = []
    for image_layer, text_layer in _layer_pairs(len(image_hidden_states), len(text_hidden_states), layer_pairs):
        image = pool_hidden_states(image_hidden_states[image_layer], image_attention_mask, image_pooling)
        text = pool_hidden_states(text_hidden_states[text_layer], text_attention_mask, text_pooling)
        if image.shape[1] != text.shape[1]:
            raise ValueError(
                f"image layer {image_layer} has width {image.shape[1]} but text layer {text_layer} has "
                f"{text.shape[1]}: NMI needs both modalities in one space"
            )
        points = torch.cat([image, text]).double()
        if normalize:
            points = F.normalize(points, dim=-1)
        modality = torch.cat([torch.zeros(image.shape[0]), torch.ones(text.shape[0])]).long()
        clusters, _, _ = kmeans(points, 2, num_init=num_init, seed=seed)
        results.append(
            {"image_layer": image_layer, "text_layer": text_layer, "nmi": normalized_mutual_info(clusters, modality)}
        )
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Attention patterns
# ----------------------------------------------------------------------------------------------------------------------


def attention_head_profiles(
    attentions: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None
) -> dict[str, Any]:
    """Per layer and head: mean attention entropy and mean normalised attention distance.

    For a query i of a sample with n valid tokens and attention row a_i (over keys j):

    * entropy H_i = −Σ_j a_ij ln a_ij (nats; 0·ln 0 = 0)
    * normalised distance D_i = Σ_j a_ij |i − j| / n (1-D token-index distance; 0 = attends to itself,
      up to (n−1)/n)

    Both are averaged over the valid queries of all samples.

    Args:
        attentions: per-layer post-softmax attention `[B, H, L, L]` (`output_attentions=True`).
        attention_mask: `[B, L]` valid tokens (padding queries are ignored and n counts valid tokens only).

    Returns:
        `{"entropy": [num_layers, H] float64, "distance": [num_layers, H] float64, "num_queries": int}`.
    """
    attentions = list(attentions)
    if not attentions:
        raise ValueError("attentions is empty")
    entropies, distances = [], []
    num_queries = None
    for layer_index, attention in enumerate(attentions):
        attention = torch.as_tensor(attention).detach().to("cpu", torch.float64)
        if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2]:
            raise ValueError(f"attention of layer {layer_index} must be [B, H, L, L], got {tuple(attention.shape)}")
        batch, _, length, _ = attention.shape
        if attention_mask is None:
            mask = torch.ones(batch, length, dtype=torch.float64)
        else:
            mask = torch.as_tensor(attention_mask).to("cpu", torch.float64)
            if mask.shape != (batch, length):
                raise ValueError(f"attention_mask must be [{batch}, {length}], got {tuple(mask.shape)}")
        valid_tokens = mask.sum(dim=1)  # [B]
        if (valid_tokens == 0).any():
            raise ValueError("attention_mask has a row without any valid token")
        positions = torch.arange(length, dtype=torch.float64)
        offsets = (positions[:, None] - positions[None, :]).abs()  # [L, L]
        entropy = -torch.xlogy(attention, attention).sum(dim=-1)  # [B, H, L]
        distance = (attention * offsets).sum(dim=-1) / valid_tokens[:, None, None]  # [B, H, L]
        query_mask = mask[:, None, :]  # [B, 1, L]
        count = mask.sum()
        entropies.append((entropy * query_mask).sum(dim=(0, 2)) / count)
        distances.append((distance * query_mask).sum(dim=(0, 2)) / count)
        num_queries = int(count)
    head_counts = {e.shape[0] for e in entropies}
    if len(head_counts) != 1:
        raise ValueError(f"all layers must have the same number of heads, got {sorted(head_counts)}")
    return {"entropy": torch.stack(entropies), "distance": torch.stack(distances), "num_queries": num_queries}


def merge_attention_profiles(profiles: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine `attention_head_profiles` of several batches into the profile of all their queries."""
    profiles = list(profiles)
    if not profiles:
        raise ValueError("no profiles to merge")
    total = sum(p["num_queries"] for p in profiles)
    return {key: sum(p[key] * p["num_queries"] for p in profiles) / total for key in ("entropy", "distance")} | {
        "num_queries": total
    }


def pearson_correlation(x: torch.Tensor | Sequence[float], y: torch.Tensor | Sequence[float]) -> float:
    """Pearson r of two equally long vectors; NaN if fewer than 2 entries or either is constant."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() != y.numel():
        raise ValueError(f"vectors differ in length: {x.numel()} vs {y.numel()}")
    if x.numel() < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    if denominator <= 1e-300:
        return math.nan
    return float((x * y).sum()) / denominator


def compare_attention_profiles(
    image_profiles: Mapping[str, Any],
    text_profiles: Mapping[str, Any],
    layer_pairs: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Compare image-pass and text-pass head profiles (`attention_head_profiles`) of paired layers.

    Per pair: the per-head entropy and distance of both passes, their Pearson correlation across heads
    (NaN with fewer than `MIN_HEADS_FOR_CORRELATION` heads, where r is always +-1, or a constant profile), and the
    mean absolute difference of normalised distances. Overall: the correlation across all (layer, head) entries
    of the paired layers.
    """
    image_entropy, text_entropy = image_profiles["entropy"], text_profiles["entropy"]
    if image_entropy.shape[1] != text_entropy.shape[1]:
        raise ValueError(
            f"image attention has {image_entropy.shape[1]} heads but text has {text_entropy.shape[1]}: heads must be "
            "shared to be compared"
        )
    pairs = _layer_pairs(image_entropy.shape[0], text_entropy.shape[0], layer_pairs)

    def layer_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
        return pearson_correlation(x, y) if x.numel() >= MIN_HEADS_FOR_CORRELATION else math.nan

    layers = []
    for image_layer, text_layer in pairs:
        image_e, text_e = image_entropy[image_layer], text_entropy[text_layer]
        image_d, text_d = image_profiles["distance"][image_layer], text_profiles["distance"][text_layer]
        layers.append(
            {
                "image_layer": image_layer,
                "text_layer": text_layer,
                "image_entropy": image_e.tolist(),
                "text_entropy": text_e.tolist(),
                "image_distance": image_d.tolist(),
                "text_distance": text_d.tolist(),
                "entropy_correlation": layer_correlation(image_e, text_e),
                "distance_correlation": layer_correlation(image_d, text_d),
                "distance_mean_abs_difference": float((image_d - text_d).abs().mean()),
            }
        )
    image_index = [i for i, _ in pairs]
    text_index = [t for _, t in pairs]
    return {
        "layers": layers,
        "entropy_correlation_all": pearson_correlation(image_entropy[image_index], text_entropy[text_index]),
        "distance_correlation_all": pearson_correlation(
            image_profiles["distance"][image_index], text_profiles["distance"][text_index]
        ),
    }


def attention_similarity(
    image_attentions: Sequence[torch.Tensor],
    text_attentions: Sequence[torch.Tensor],
    *,
    image_attention_mask: torch.Tensor | None = None,
    text_attention_mask: torch.Tensor | None = None,
    layer_pairs: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Attention-pattern similarity of the image and text passes through (shared) attention layers.

    `compare_attention_profiles(attention_head_profiles(image...), attention_head_profiles(text...))`; see both.
    Raw entropy grows with ln(sequence length), so compare absolute entropies across modalities with care; the
    correlations across heads are scale-free and are the headline numbers.
    """
    return compare_attention_profiles(
        attention_head_profiles(image_attentions, image_attention_mask),
        attention_head_profiles(text_attentions, text_attention_mask),
        layer_pairs,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Model-driven collection, plot and command line
# ----------------------------------------------------------------------------------------------------------------------


def collect_diagnostics(
    model: torch.nn.Module,
    processor: Any,
    dataset: Any,
    *,
    image_column: str = "image",
    text_column: str = "text",
    batch_size: int = 32,
    text_pooling: PoolingName = "mean",
    image_pooling: PoolingName = "mean",
    normalize_for_nmi: bool = False,
    layer_pairs: Sequence[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Run the model on paired (image, caption) records and compute all three diagnostics.

    Each record contributes its image and its first caption. The forward pass uses
    `output_hidden_states=True, output_attentions=True` (load the model with `attn_implementation="eager"` so that
    attention maps are returned). Records that cannot be read are skipped and counted.

    Returns:
        `{"modality_gap": ..., "nmi_per_layer": [...], "attention": {...} or None, "num_pairs", "num_skipped"}`.
    """
    from .encoding_msclip import (
        eval_mode,
        iter_rows,
        model_device_and_dtype,
        preprocess_images,
        split_processor,
    )
    from .records_msclip import decode_image

    tokenizer, image_processor = split_processor(processor)
    device, dtype = model_device_and_dtype(model)
    pooled_image: list[list[torch.Tensor]] = []
    pooled_text: list[list[torch.Tensor]] = []
    image_embeds, text_embeds, image_profiles, text_profiles = [], [], [], []
    num_skipped = 0

    def run_batch(images: list[Any], captions: list[str]) -> None:
        pixel_values = preprocess_images(image_processor, images).to(device, dtype)
        tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        text_mask = tokens.get("attention_mask")
        inputs = {"input_ids": tokens["input_ids"].to(device), "pixel_values": pixel_values}
        if text_mask is not None:
            inputs["attention_mask"] = text_mask.to(device)
        outputs = model(**inputs, output_hidden_states=True, output_attentions=True)
        vision, text = outputs.vision_model_output, outputs.text_model_output
        mask_cpu = text_mask.cpu() if text_mask is not None else None
        pooled_image.append([pool_hidden_states(h.float().cpu(), None, image_pooling) for h in vision.hidden_states])
        pooled_text.append([pool_hidden_states(h.float().cpu(), mask_cpu, text_pooling) for h in text.hidden_states])
        image_embeds.append(outputs.image_embeds.float().cpu())
        text_embeds.append(outputs.text_embeds.float().cpu())
        if vision.attentions and text.attentions:
            image_profiles.append(attention_head_profiles([a.cpu() for a in vision.attentions]))
            text_profiles.append(attention_head_profiles([a.cpu() for a in text.attentions], mask_cpu))

    images: list[Any] = []
    captions: list[str] = []
    with eval_mode(model):
        for index, row, error in iter_rows(dataset):
            try:
                if error is not None:
                    raise error
                caption = row[text_column]
                caption = caption if isinstance(caption, str) else list(caption)[0]
                if not isinstance(caption, str) or not caption.strip():
                    raise ValueError("empty caption")
                image = decode_image(row[image_column])
            except Exception as skip_error:  # noqa: BLE001 - bad records are skipped and counted, never fatal
                num_skipped += 1
                logger.warning("skipping record %d: %s", index, skip_error)
                continue
            images.append(image)
            captions.append(caption)
            if len(images) == batch_size:
                run_batch(images, captions)
                images, captions = [], []
        if images:
            run_batch(images, captions)
    if not image_embeds:
        raise ValueError(f"no usable (image, caption) records ({num_skipped} skipped)")

    image_layers = [torch.cat(layer) for layer in zip(*pooled_image)]
    text_layers = [torch.cat(layer) for layer in zip(*pooled_text)]
    # A CLIP baseline may have towers of different widths / head counts: report what is comparable, skip the rest.
    same_width = [
        (i, t)
        for i, t in _layer_pairs(len(image_layers), len(text_layers), layer_pairs)
        if image_layers[i].shape[1] == text_layers[t].shape[1]
    ]
    if not same_width:
        logger.warning("no layer pair has equal image and text widths: per-layer NMI skipped")
    attention = None
    if not image_profiles:
        logger.warning("the model returned no attention maps; load it with attn_implementation='eager'")
    elif image_profiles[0]["entropy"].shape[1] != text_profiles[0]["entropy"].shape[1]:
        logger.warning("image and text attention have different head counts: attention similarity skipped")
    else:
        attention = compare_attention_profiles(
            merge_attention_profiles(image_profiles), merge_attention_profiles(text_profiles), layer_pairs
        )
    nmi = []
    if same_width:
        nmi = modality_nmi_per_layer(image_layers, text_layers, layer_pairs=same_width, normalize=normalize_for_nmi)
    return {
        "modality_gap": modality_gap(torch.cat(image_embeds), torch.cat(text_embeds)),
        "nmi_per_layer": nmi,
        "attention": attention,
        "num_pairs": int(sum(e.shape[0] for e in image_embeds)),
        "num_skipped": num_skipped,
    }


def format_diagnostics(results: Mapping[str, Any]) -> str:
    """Human-readable summary of `collect_diagnostics` output."""
    gap = results["modality_gap"]
    lines = [
        f"pairs: {results['num_pairs']} (skipped {results['num_skipped']})",
        f"modality gap ||mean(img) - mean(txt)||: {gap['gap_l2']:.4f}",
        f"cosine matched / random pairs: {gap['matched_cosine']:.4f} / {gap['random_cosine']:.4f}",
        "NMI per layer (image layer, text layer): "
        + ", ".join(f"({r['image_layer']},{r['text_layer']}) {r['nmi']:.3f}" for r in results["nmi_per_layer"]),
    ]
    attention = results.get("attention")
    if attention:
        lines.append(
            f"attention profile correlation across all shared heads: entropy {attention['entropy_correlation_all']:.3f}"
            f", distance {attention['distance_correlation_all']:.3f}"
        )
        for layer in attention["layers"]:
            pair = f"({layer['image_layer']},{layer['text_layer']})"
            lines.append(
                f"  layer {pair}: entropy img {np.mean(layer['image_entropy']):.3f}"
                f" txt {np.mean(layer['text_entropy']):.3f}, distance img {np.mean(layer['image_distance']):.3f}"
                f" txt {np.mean(layer['text_distance']):.3f}, r_entropy {layer['entropy_correlation']:.3f}"
                f", r_distance {layer['distance_correlation']:.3f}"
            )
    return "\n".join(lines)


def _label_layer_pairs(axis: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    axis.set_xticks(range(len(rows)))
    axis.set_xticklabels([f"{r['image_layer']}/{r['text_layer']}" for r in rows], rotation=90, fontsize=7)
    axis.set_xlabel("layer pair (image/text hidden-state index)")


def plot_diagnostics(results: Mapping[str, Any], path: str | Path) -> Path:
    """Write a PNG with NMI per layer and per-layer mean attention entropy / distance of both passes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attention = results.get("attention")
    num_panels = 3 if attention else 1
    figure, axes = plt.subplots(1, num_panels, figsize=(5 * num_panels, 4), squeeze=False)
    nmi = results["nmi_per_layer"]
    axes[0, 0].plot(range(len(nmi)), [r["nmi"] for r in nmi], marker="o")
    axes[0, 0].set(title="modality NMI (k-means, k=2)", ylabel="NMI", ylim=(-0.05, 1.05))
    _label_layer_pairs(axes[0, 0], nmi)
    if attention:
        layers = attention["layers"]
        for axis, key, label in (
            (axes[0, 1], "entropy", "attention entropy (nats)"),
            (axes[0, 2], "distance", "mean attention distance / n"),
        ):
            for modality in ("image", "text"):
                axis.plot(
                    range(len(layers)),
                    [np.mean(layer[f"{modality}_{key}"]) for layer in layers],
                    marker="o",
                    label=modality,
                )
            axis.set(title=label)
            _label_layer_pairs(axis, layers)
            axis.legend()
    gap = results["modality_gap"]
    figure.suptitle(
        f"modality gap {gap['gap_l2']:.3f}, matched cos {gap['matched_cosine']:.3f}, "
        f"random cos {gap['random_cosine']:.3f}"
    )
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
