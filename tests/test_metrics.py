"""Tests of modeling_msclip.metrics_msclip: the pure metric functions (zero-shot classifier and metrics, retrieval,
linear probe), checked against values worked out by hand in the comments.
"""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale

from modeling_msclip import metrics_msclip
from modeling_msclip.metrics_msclip import linear_probe, retrieval_metrics, zero_shot_classifier, zero_shot_metrics

# ----------------------------------------------------------------------------------------------------------------------
# zero-shot classifier and metrics
# ----------------------------------------------------------------------------------------------------------------------


def test_zero_shot_classifier_normalises_each_template_before_averaging():
    # Class 0 templates (4,0,0) and (0,1,0): normalised (1,0,0),(0,1,0) -> mean (.5,.5,0) -> (1/sqrt2, 1/sqrt2, 0).
    # Averaging the raw vectors would give (2, .5, 0)/|.| instead, so this pins the per-template normalisation.
    # Class 1 has one template (0,0,3) -> (0,0,1).
    per_class = [torch.tensor([[4.0, 0, 0], [0, 1.0, 0]]), torch.tensor([[0, 0, 3.0]])]
    weights = zero_shot_classifier(per_class)
    s = 1 / math.sqrt(2)
    assert_close_to_scale(weights, [[s, s, 0.0], [0.0, 0.0, 1.0]], 1e-6, "classifier weights")
    # The [C, T, E] tensor form gives the same result.
    stacked = torch.tensor([[[4.0, 0, 0], [0, 1.0, 0]], [[0, 0, 3.0], [0, 0, 1.0]]])
    assert_close_to_scale(zero_shot_classifier(stacked), weights, 1e-6, "classifier weights from [C, T, E]")


def test_zero_shot_metrics_hand_computed_ranks():
    # Identity classifier: the logit of class c is x_c / |x|, so the rank of the true class is read off directly.
    classifier = torch.eye(3)
    images = torch.tensor(
        [
            [3.0, 2.0, 1.0],  # label 0: class 0 is the largest          -> rank 0
            [1.0, 3.0, 2.0],  # label 2: class 1 beats it                -> rank 1
            [2.0, 1.0, 3.0],  # label 1: classes 2 and 0 beat it         -> rank 2
            [1.0, 2.0, 3.0],  # label 2: largest                         -> rank 0
        ]
    )
    labels = torch.tensor([0, 2, 1, 2])
    metrics = zero_shot_metrics(images, classifier, labels, top_k=(1, 2, 5), class_names=["cat", "dog", "car"])
    assert metrics["top1"] == pytest.approx(2 / 4)
    assert metrics["top2"] == pytest.approx(3 / 4)
    assert metrics["top5"] == pytest.approx(1.0)  # capped at 3 classes
    # per-class top-1 recall: cat {img0} 1/1, dog {img2} 0/1, car {img1, img3} 1/2
    assert metrics["per_class_accuracy"] == pytest.approx({"cat": 1.0, "dog": 0.0, "car": 0.5})
    assert metrics["mean_per_class_recall"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert metrics["num_samples"] == 4 and metrics["num_classes"] == 3


def test_zero_shot_cross_entropy_uses_logit_scale():
    # Two classes, one image (1, 1, 0) with label 0 and classifier rows e0, e1 + e2 direction.
    # cos(img, e0) = 1/sqrt2, cos(img, (0,1,1)/sqrt2) = 1/2. With scale 2: logits (sqrt2, 1).
    classifier = torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])
    image = torch.tensor([[1.0, 1.0, 0.0]])
    metrics = zero_shot_metrics(image, classifier, torch.tensor([0]), logit_scale=2.0)
    expected = -(math.sqrt(2) - math.log(math.exp(math.sqrt(2)) + math.exp(1.0)))
    assert metrics["cross_entropy"] == pytest.approx(expected, rel=1e-6)
    assert metrics["top1"] == 1.0


def test_zero_shot_ties_count_against_the_model():
    # (1, 1, 0) ties classes 0 and 1: pessimistic ranking gives rank 1 -> not a top-1 hit.
    # A zero embedding ties everything (a collapsed model) and must not score 100 %.
    images = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    metrics = zero_shot_metrics(images, torch.eye(3), torch.tensor([0, 2]), top_k=(1, 2))
    assert metrics["top1"] == 0.0
    assert metrics["top2"] == pytest.approx(1 / 2)  # first image: rank 1 < 2; zero image: rank 2


def test_zero_shot_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="labels contains index 3"):
        zero_shot_metrics(torch.ones(2, 3), torch.eye(3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="embed_dim"):
        zero_shot_metrics(torch.ones(2, 4), torch.eye(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        zero_shot_metrics(torch.tensor([[float("nan"), 0, 0]]), torch.eye(3), torch.tensor([0]))


# ----------------------------------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------------------------------


def test_retrieval_metrics_hand_computed_with_several_captions_per_image():
    images = torch.eye(3)  # image k = e_k, so sim(text t, image k) = t_k / |t|
    texts = torch.tensor(
        [
            [0.2, 1.0, 0.0],  # t0 -> image 0
            [1.0, 0.0, 0.5],  # t1 -> image 0
            [0.0, 0.3, 1.0],  # t2 -> image 1
            [0.5, 0.0, 0.4],  # t3 -> image 2
            [0.6, 0.5, 0.1],  # t4 -> image 2
        ]
    )
    owners = torch.tensor([0, 0, 1, 2, 2])
    # text->image ranks (largest component first): t0: image1 > image0 -> 1; t1: 0; t2: image2 > image1 -> 1;
    # t3: image0 > image2 -> 1; t4: image0 > image1 > image2 -> 2.  R@1 = 1/5, R@2 = 4/5, R@3 = 5/5.
    # image->text, normalised text components:
    #   t0 (.196, .981, 0), t1 (.894, 0, .447), t2 (0, .287, .958), t3 (.781, 0, .625), t4 (.762, .635, .127)
    # image0: best own caption t1 .894, no other caption >= it                  -> rank 0
    # image1: own t2 .287; t0 .981 and t4 .635 are higher                       -> rank 2
    # image2: own t3 .625 (t4 only .127, "any caption" uses the best); t2 .958 -> rank 1
    # R@1 = 1/3, R@2 = 2/3, R@3 = 3/3.
    metrics = retrieval_metrics(images, texts, owners, ks=(1, 2, 3))
    assert metrics["text_to_image_recall@1"] == pytest.approx(1 / 5)
    assert metrics["text_to_image_recall@2"] == pytest.approx(4 / 5)
    assert metrics["text_to_image_recall@3"] == pytest.approx(1.0)
    assert metrics["image_to_text_recall@1"] == pytest.approx(1 / 3)
    assert metrics["image_to_text_recall@2"] == pytest.approx(2 / 3)
    assert metrics["image_to_text_recall@3"] == pytest.approx(1.0)
    assert metrics["mean_recall"] == pytest.approx((1 / 5 + 4 / 5 + 1 + 1 / 3 + 2 / 3 + 1) / 6)
    assert (metrics["num_images"], metrics["num_texts"], metrics["num_images_without_captions"]) == (3, 5, 0)


def test_retrieval_image_without_caption_is_gallery_only():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # image 1 has no caption
    texts = torch.tensor([[0.4, 1.0]])  # belongs to image 0 but is closer to image 1
    metrics = retrieval_metrics(images, texts, torch.tensor([0]), ks=(1, 2))
    assert metrics["num_images_without_captions"] == 1
    assert metrics["text_to_image_recall@1"] == 0.0  # image 1 (a distractor) ranks first
    assert metrics["text_to_image_recall@2"] == 1.0
    assert metrics["image_to_text_recall@1"] == 1.0  # only image 0 is a query; its one caption is first


def _brute_force_recalls(images, texts, owners, ks):
    """Independent reference: sort every similarity row and look for the positives (captionless images skipped)."""
    sims = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T
    queries = [i for i in range(len(images)) if (owners == i).any()]
    out = {}
    for k in ks:
        hits = [
            bool(
                set(sims[i].argsort(descending=True)[:k].tolist()) & set(torch.nonzero(owners == i).flatten().tolist())
            )
            for i in queries
        ]
        out[f"image_to_text_recall@{k}"] = float(np.mean(hits))
        hits = [int(owners[t]) in sims[:, t].argsort(descending=True)[:k].tolist() for t in range(len(texts))]
        out[f"text_to_image_recall@{k}"] = float(np.mean(hits))
    return out


def test_retrieval_matches_brute_force_and_is_chunk_independent(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(40, 8, generator=generator)
    # 3 captions per image, image 36 only 2, images 37-39 none (gallery-only distractors)
    owners = torch.arange(40).repeat_interleave(3)[:110]
    texts = images[owners] + 1.5 * torch.randn(110, 8, generator=generator)
    ks = (1, 5, 10)
    full = retrieval_metrics(images, texts, owners, ks=ks)
    reference = _brute_force_recalls(images, texts, owners, ks)
    assert {k: full[k] for k in reference} == pytest.approx(reference)
    assert 0.0 < full["text_to_image_recall@1"] < 1.0  # a non-trivial case
    assert full["num_images_without_captions"] == 3
    monkeypatch.setattr(metrics_msclip, "_RANK_CHUNK", 7)
    assert retrieval_metrics(images, texts, owners, ks=ks) == full


def test_retrieval_rejects_bad_index():
    with pytest.raises(ValueError, match="only 2 candidates"):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))


# ----------------------------------------------------------------------------------------------------------------------
# linear probe
# ----------------------------------------------------------------------------------------------------------------------


def _blobs(num_per_class, centers, generator, spread=0.3):
    features = torch.cat(
        [torch.tensor(c) + spread * torch.randn(n, len(c), generator=generator) for c, n in zip(centers, num_per_class)]
    )
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(num_per_class)])
    return features, labels


def test_linear_probe_separable_data_is_perfect():
    generator = torch.Generator().manual_seed(1)
    centers = [(4.0, 0.0), (-4.0, 0.0), (0.0, 4.0)]
    train = _blobs([20, 20, 20], centers, generator)
    test = _blobs([10, 10, 10], centers, generator)
    result = linear_probe(*train, *test)
    assert result["accuracy"] == 1.0
    assert result["mean_per_class_recall"] == 1.0
    assert result["num_classes"] == 3
    # 20 % of each 20-sample class held out for the sweep: 4 x 3; the final fit uses all 60
    assert (result["num_train"], result["num_validation"], result["num_test"]) == (60, 12, 30)


def test_device_defaults_to_what_exists_and_the_documented_snippet_names_none():
    # device=None means CUDA where it is available, else the CPU, for the probe as for the model loader.
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert metrics_msclip.default_device().type == expected and metrics_msclip.default_device("cpu").type == "cpu"
    generator = torch.Generator().manual_seed(4)
    centers = [(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0)]
    train, test = _blobs([12, 12, 12], centers, generator), _blobs([6, 6, 6], centers, generator)
    by_default = linear_probe(*train, *test, l2_grid=(1e-2, 1e-4))
    assert by_default == linear_probe(*train, *test, l2_grid=(1e-2, 1e-4), device=expected)
    # The Python API snippet of docs/evaluation.md runs where there is no GPU: it names no device.
    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    python_blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert python_blocks and not any('device="cuda"' in block for block in python_blocks)


def test_linear_probe_non_separable_reaches_bayes_bound():
    # One feature with two values. At x = -1 three of four samples are class 0, at x = +1 three of four are class 1.
    # Any classifier assigns one label per x value, so accuracy <= 6/8; the Bayes rule (sign of x) reaches it.
    x = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0])[:, None]
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    result = linear_probe(x.repeat(5, 1), y.repeat(5), x, y)
    assert result["accuracy"] == pytest.approx(0.75)
    assert result["mean_per_class_recall"] == pytest.approx(0.75)


def test_linear_probe_sweep_selects_by_validation_accuracy():
    # 30 + 10 training samples, validation fraction 0.2 -> 6 + 2 held out, fit on 24 + 8.
    # l2 = 1e4 shrinks W to ~0, so it predicts the majority class (the bias): held-out accuracy 6/8.
    # l2 = 1e-3 separates the blobs: held-out accuracy 1. The sweep must pick 1e-3.
    generator = torch.Generator().manual_seed(2)
    centers = [(3.0, 0.0), (-3.0, 0.0)]
    train = _blobs([30, 10], centers, generator)
    test = _blobs([5, 5], centers, generator)
    result = linear_probe(*train, *test, l2_grid=(1e-3, 1e4))
    assert result["sweep"] == [{"l2": 1e4, "validation_accuracy": 0.75}, {"l2": 1e-3, "validation_accuracy": 1.0}]
    assert result["best_l2"] == 1e-3 and result["num_validation"] == 8
    assert result["accuracy"] == 1.0
    # Equal held-out accuracy: the larger penalty (the simpler model) wins.
    tie = linear_probe(*train, *test, l2_grid=(1e-3, 1e-2))
    assert [row["validation_accuracy"] for row in tie["sweep"]] == [1.0, 1.0] and tie["best_l2"] == 1e-2
    # Deterministic: a second run gives the very same numbers.
    assert linear_probe(*train, *test, l2_grid=(1e-3, 1e4)) == result


def test_logistic_regression_matches_scikit_learn():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(60, 5, generator=generator, dtype=torch.float64)
    labels = (features[:, 0] + 0.5 * torch.randn(60, generator=generator, dtype=torch.float64) > 0).long()
    labels[features[:, 1] > 0.8] = 2
    l2 = 0.1
    weight, bias = metrics_msclip._fit_logistic_regression(features, labels, 3, l2, max_iter=500, tolerance=1e-10)
    ours = torch.softmax(features @ weight.T + bias, dim=1).numpy()
    # Our objective is sklearn's divided by n: C = 1 / (l2 * n).
    reference = sklearn_linear.LogisticRegression(C=1 / (l2 * 60), tol=1e-10, max_iter=10_000).fit(
        features.numpy(), labels.numpy()
    )
    assert_close_to_scale(ours, reference.predict_proba(features.numpy()), 1e-5, "probabilities vs scikit-learn")


def test_linear_probe_rejects_bad_input():
    with pytest.raises(ValueError, match="dims"):
        linear_probe(torch.ones(4, 2), torch.tensor([0, 1, 0, 1]), torch.ones(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="no class has 2"):
        linear_probe(torch.eye(2), torch.tensor([0, 1]), torch.eye(2), torch.tensor([0, 1]))


def test_linear_probe_unseen_test_classes_count_as_errors():
    # Classes 0 and 1 are separable; test classes 5 and 6 never occur in training, so they are always wrong.
    # accuracy = 4 / 8; per-class recall 1, 1, 0, 0 -> mean 0.5 (each unseen class counts on its own).
    train = torch.tensor([[-2.0], [-1.0], [-1.5], [1.0], [2.0], [1.5]]), torch.tensor([0, 0, 0, 1, 1, 1])
    test = (
        torch.tensor([[-2.0], [-1.0], [1.0], [2.0], [0.0], [3.0], [-3.0], [0.5]]),
        torch.tensor([0, 0, 1, 1, 5, 5, 6, 6]),
    )
    result = linear_probe(*train, *test, l2_grid=(1e-3,))
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["mean_per_class_recall"] == pytest.approx(0.5)
    assert result["sweep"] == [] and result["num_validation"] == 0
