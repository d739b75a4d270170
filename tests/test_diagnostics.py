"""Tests of modeling_msclip.diagnostics_msclip against hand-computed values (see the comments)."""

import json
import math

import pytest
import torch
from conftest import assert_close_to_scale, build_tiny_transformers_clip
from PIL import Image

from modeling_msclip.diagnostics_msclip import (
    attention_head_profiles,
    attention_similarity,
    collect_diagnostics,
    kmeans,
    merge_attention_profiles,
    modality_gap,
    modality_nmi_per_layer,
    normalized_mutual_info,
    pearson_correlation,
    plot_diagnostics,
    pool_hidden_states,
)

E0, E1, E2 = torch.eye(3)

# ----------------------------------------------------------------------------------------------------------------------
# modality gap
# ----------------------------------------------------------------------------------------------------------------------


def test_modality_gap_two_pairs():
    # images e0, e1; texts e0, e2. mean image (.5,.5,0), mean text (.5,0,.5): gap |(0,.5,-.5)| = sqrt(.5).
    # matched cosines 1 and 0 -> .5; random pairs e0.e2 = 0 and e1.e0 = 0 -> 0.
    result = modality_gap(torch.stack([E0, 5 * E1]), torch.stack([2 * E0, E2]))  # norms must not matter
    assert result["gap_l2"] == pytest.approx(math.sqrt(0.5))
    assert result["matched_cosine"] == pytest.approx(0.5)
    assert result["random_cosine"] == pytest.approx(0.0)
    assert result["matched_minus_random"] == pytest.approx(0.5)


def test_modality_gap_three_pairs_averages_all_non_matched_pairs():
    # images e0, e0, e1; texts e0, e1, e1. matched: 1, 0, 1 -> 2/3.
    # i != j: (0,1) 0, (0,2) 0, (1,0) 1, (1,2) 0, (2,0) 0, (2,1) 1 -> 2/6.
    # means (2/3, 1/3, 0) and (1/3, 2/3, 0): gap sqrt(2)/3.
    result = modality_gap(torch.stack([E0, E0, E1]), torch.stack([E0, E1, E1]))
    assert result["matched_cosine"] == pytest.approx(2 / 3)
    assert result["random_cosine"] == pytest.approx(1 / 3)
    assert result["gap_l2"] == pytest.approx(math.sqrt(2) / 3)
    assert result["num_pairs"] == 3


def test_modality_gap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="equal shapes"):
        modality_gap(torch.ones(3, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        modality_gap(torch.ones(1, 2), torch.ones(1, 2))


# ----------------------------------------------------------------------------------------------------------------------
# NMI and k-means
# ----------------------------------------------------------------------------------------------------------------------


def test_nmi_perfect_independent_and_worked_example():
    assert normalized_mutual_info([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)  # relabelled, still perfect
    assert_close_to_scale(normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]), 0.0, 1e-12, "independent NMI")
    # a = [0,0,1,1], b = [0,0,0,1]: joint p(0,0)=1/2, p(1,0)=1/4, p(1,1)=1/4; p(a) = (1/2,1/2), p(b) = (3/4,1/4).
    # I = 1/2 ln((1/2)/(1/2*3/4)) + 1/4 ln((1/4)/(1/2*3/4)) + 1/4 ln((1/4)/(1/2*1/4))
    #   = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln(2)
    # H(a) = ln 2, H(b) = -(3/4 ln 3/4 + 1/4 ln 1/4); NMI = I / ((H(a) + H(b)) / 2)
    mutual_info = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    entropy_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mutual_info / ((math.log(2) + entropy_b) / 2)
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(expected, rel=1e-12)
    assert 0.2 < expected < 0.6  # genuinely intermediate


def test_nmi_single_cluster_conventions_and_sklearn_agreement():
    assert normalized_mutual_info([3, 3, 3], [1, 1, 1]) == 1.0
    assert normalized_mutual_info([0, 0, 0, 0], [0, 1, 0, 1]) == 0.0
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 3, (50,), generator=generator)
    b = (a + torch.randint(0, 2, (50,), generator=generator)) % 4
    assert normalized_mutual_info(a, b) == pytest.approx(metrics.normalized_mutual_info_score(a, b), rel=1e-10)


def test_kmeans_recovers_two_blobs_with_known_inertia():
    points = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    labels, centroids, inertia = kmeans(points, 2, seed=3)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert sorted(centroids.tolist()) == [[0.0, 0.5], [10.0, 0.5]]
    assert inertia == pytest.approx(4 * 0.25)  # every point 0.5 away from its centroid
    again = kmeans(points, 2, seed=3)
    assert torch.equal(again[0], labels)  # deterministic


def test_modality_nmi_per_layer_hand_built_layers():
    image_points = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    # layer 0: the modalities sit in different places -> clusters = modalities -> NMI 1
    # layer 1: text points equal the image points -> each cluster holds 2 image + 2 text -> NMI 0
    # layer 2: 4 image + 2 text points at x=0, 2 text points at x=10 -> contingency [[4, 2], [0, 2]]
    image_layers = [image_points, image_points, torch.zeros(4, 2)]
    text_layers = [
        image_points + torch.tensor([100.0, 0.0]),
        image_points.clone(),
        torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [10.0, 0.0]]),
    ]
    result = modality_nmi_per_layer(image_layers, text_layers)
    assert_close_to_scale([r["nmi"] for r in result[:2]], [1.0, 0.0], 1e-12, "NMI of layers 0 and 1")
    # worked example of layer 2: n = 8. p(cluster) = (6/8, 2/8), p(modality) = (1/2, 1/2).
    # I = 4/8 ln((4/8)/(6/8*1/2)) + 2/8 ln((2/8)/(6/8*1/2)) + 2/8 ln((2/8)/(2/8*1/2))
    mutual_info = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    entropy_clusters = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert result[2]["nmi"] == pytest.approx(mutual_info / ((entropy_clusters + math.log(2)) / 2), rel=1e-10)
    assert [(r["image_layer"], r["text_layer"]) for r in result] == [(0, 0), (1, 1), (2, 2)]


def test_modality_nmi_pools_tokens_with_the_text_mask_and_aligns_from_the_end():
    # Text tokens: valid tokens sit at x = 10, padding tokens hold x = -1000. Masked mean pooling gives 10 (far from
    # the images at 0, NMI 1); pooling the padding in would drag two texts onto the image side.
    image = torch.zeros(4, 3, 2)
    image[:, :, 1] = torch.arange(4.0)[:, None]
    text = torch.full((4, 3, 2), 10.0)
    text[:2, 2] = -1000.0
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    # 2 image layers vs 3 text layers: default pairs (0, 1) and (1, 2).
    result = modality_nmi_per_layer([image, image], [text, text, text], text_attention_mask=mask)
    assert [(r["image_layer"], r["text_layer"]) for r in result] == [(0, 1), (1, 2)]
    assert [r["nmi"] for r in result] == pytest.approx([1.0, 1.0])
    unmasked = modality_nmi_per_layer([image], [text])
    assert unmasked[0]["nmi"] < 0.5


def test_pool_hidden_states_modes():
    hidden = torch.tensor([[[1.0], [2.0], [3.0]], [[4.0], [5.0], [60.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert pool_hidden_states(hidden, mask, "mean").flatten().tolist() == [2.0, 4.5]
    assert pool_hidden_states(hidden, mask, "first").flatten().tolist() == [1.0, 4.0]
    assert pool_hidden_states(hidden, mask, "last").flatten().tolist() == [3.0, 5.0]
    assert pool_hidden_states(hidden, None, "last").flatten().tolist() == [3.0, 60.0]
    with pytest.raises(ValueError, match="width"):
        modality_nmi_per_layer([torch.zeros(2, 3)], [torch.zeros(2, 4)])


# ----------------------------------------------------------------------------------------------------------------------
# attention entropy / distance / similarity
# ----------------------------------------------------------------------------------------------------------------------


def _maps(length=4):
    uniform = torch.full((length, length), 1.0 / length)
    identity = torch.eye(length)
    previous = torch.zeros(length, length)
    previous[0, 0] = 1.0
    previous[torch.arange(1, length), torch.arange(length - 1)] = 1.0
    causal = torch.tril(torch.ones(length, length))
    causal = causal / causal.sum(dim=1, keepdim=True)
    return uniform, identity, previous, causal


def test_attention_entropy_and_distance_of_hand_made_maps():
    uniform, identity, previous, causal = _maps()
    profile = attention_head_profiles([torch.stack([uniform, identity, previous, causal])[None]])
    # uniform over 4: entropy ln 4; distance rows (1.5, 1, 1, 1.5)/4 -> mean 0.3125
    # identity: entropy 0, distance 0
    # previous token: entropy 0; distances (0, 1, 1, 1)/4 -> mean 3/16
    # causal uniform: row i uniform over i+1 keys: entropy mean (0 + ln2 + ln3 + ln4)/4; distance i/2/4 -> 0.1875
    expected_entropy = [math.log(4), 0.0, 0.0, (math.log(2) + math.log(3) + math.log(4)) / 4]
    assert profile["entropy"].dtype == profile["distance"].dtype == torch.float64
    assert_close_to_scale(profile["entropy"][0], expected_entropy, 1e-7, "entropy")
    assert_close_to_scale(profile["distance"][0], [0.3125, 0.0, 3 / 16, 0.1875], 1e-7, "distance")
    assert profile["num_queries"] == 4


def test_attention_profile_ignores_padding_queries_and_uses_valid_length():
    # Sample 2 has 2 valid tokens of 4, attends uniformly over them; padding rows hold garbage.
    # Its valid rows: entropy ln 2, distance (1/2)/2 = 0.25 each. Sample 1: uniform over 4 (ln 4, 0.3125 mean).
    uniform = _maps()[0]
    padded = torch.zeros(4, 4)
    padded[:2, :2] = 0.5
    padded[2:] = torch.tensor([0.97, 0.01, 0.01, 0.01])
    attention = torch.stack([uniform, padded])[:, None]  # [B=2, H=1, 4, 4]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    profile = attention_head_profiles([attention], mask)
    # 6 valid queries: 4 with ln 4 / mean distance 0.3125 and 2 with ln 2 / 0.25.
    assert profile["num_queries"] == 6
    assert profile["entropy"].item() == pytest.approx((4 * math.log(4) + 2 * math.log(2)) / 6)
    assert profile["distance"].item() == pytest.approx((4 * 0.3125 + 2 * 0.25) / 6)
    # Merging per-batch profiles equals the profile of the whole batch.
    merged = merge_attention_profiles(
        [attention_head_profiles([attention[:1]], mask[:1]), attention_head_profiles([attention[1:]], mask[1:])]
    )
    assert_close_to_scale(merged["entropy"], profile["entropy"], 1e-7, "merged entropy")
    assert_close_to_scale(merged["distance"], profile["distance"], 1e-7, "merged distance")


def test_attention_similarity_correlations():
    uniform, identity, previous, _ = _maps()
    image = [torch.stack([uniform, identity, previous])[None]]  # entropy profile (ln4, 0, 0)
    same = attention_similarity(image, [torch.stack([uniform, identity, previous])[None]])
    assert same["layers"][0]["entropy_correlation"] == pytest.approx(1.0)
    assert same["distance_correlation_all"] == pytest.approx(1.0)
    # text heads reversed: entropy (0, 0, ln4). x=(a,0,0), y=(0,0,a): centred dot -a^2/3, norms^2 6a^2/9 -> r = -1/2
    reversed_heads = attention_similarity(image, [torch.stack([previous, identity, uniform])[None]])
    assert reversed_heads["layers"][0]["entropy_correlation"] == pytest.approx(-0.5)
    # distances image (.3125, 0, .1875) vs text (.1875, 0, .3125): mean |diff| = (.125 + 0 + .125) / 3
    assert reversed_heads["layers"][0]["distance_mean_abs_difference"] == pytest.approx(0.25 / 3)
    assert math.isnan(pearson_correlation([1.0, 1.0], [0.0, 2.0]))  # constant profile: undefined
    # Two heads: r would always be +-1, so the per-layer value is reported as undefined.
    two_heads = attention_similarity([torch.stack([uniform, identity])[None]], [torch.stack([identity, uniform])[None]])
    assert math.isnan(two_heads["layers"][0]["entropy_correlation"])
    assert two_heads["entropy_correlation_all"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="heads"):
        attention_similarity(image, [torch.stack([uniform, identity])[None]])


# ----------------------------------------------------------------------------------------------------------------------
# model-driven collection and plot (real tiny CLIPModel as a stand-in with the same output structure)
# ----------------------------------------------------------------------------------------------------------------------


def test_collect_diagnostics_on_a_tiny_model_and_plot(tmp_path):
    model, tokenizer, image_processor = build_tiny_transformers_clip(
        ["a", "the", "red", "green", "blue", "square", "thing", "."]
    )
    images = [
        Image.new("RGB", (40, 48), colour)
        for colour in [(200, 20, 20), (20, 200, 20), (20, 20, 200), (220, 60, 60), (60, 220, 60), (60, 60, 220)]
    ]
    rows = [
        {"image": img, "text": cap}
        for img, cap in zip(
            images, ["red square", ["green thing", "x"], "blue", "a red thing", "the green square .", "blue"]
        )
    ]
    rows.append({"image": "/nonexistent.png", "text": "red"})
    results = collect_diagnostics(model, (tokenizer, image_processor), rows, batch_size=4)
    assert results["num_pairs"] == 6 and results["num_skipped"] == 1
    assert len(results["nmi_per_layer"]) == 3  # embeddings + 2 layers per tower
    assert all(0.0 <= r["nmi"] <= 1.0 for r in results["nmi_per_layer"])
    assert len(results["attention"]["layers"]) == 2
    assert len(results["attention"]["layers"][0]["image_entropy"]) == 2  # heads
    # The gap uses the model's normalised embeddings: cross-check with the model forward directly.
    with torch.no_grad():
        out = model(
            **tokenizer(
                ["red square", "green thing", "blue", "a red thing", "the green square .", "blue"],
                padding=True,
                return_tensors="pt",
            ),
            **image_processor(images=images, return_tensors="pt"),
        )
    assert results["modality_gap"]["gap_l2"] == pytest.approx(
        modality_gap(out.image_embeds, out.text_embeds)["gap_l2"], rel=1e-5
    )
    png = plot_diagnostics(results, tmp_path / "diagnostics.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from modeling_msclip.evaluation_msclip import to_jsonable

    json.dumps(to_jsonable(results))  # JSON-able


def test_cli_on_saved_msclip_writes_json_and_png(tmp_path, msclip_tokenizer_dir):
    from modeling_msclip import MSClipConfig, MSClipModel
    from modeling_msclip.image_processing_msclip import MSClipImageProcessor
    from modeling_msclip.processing_msclip import MSClipProcessor
    from modeling_msclip.tokenization_msclip import MSClipTokenizer
    from training.run_diagnostics import main

    torch.manual_seed(0)
    config = MSClipConfig.from_preset("msclip-s-tiny")
    size = config.vision_config.image_size
    model_dir = tmp_path / "model"
    MSClipModel(config).save_pretrained(model_dir)
    MSClipProcessor(
        image_processor=MSClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=MSClipTokenizer.from_pretrained(msclip_tokenizer_dir),
    ).save_pretrained(model_dir)
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "metadata.jsonl", "w") as handle:
        for index, (name, colour) in enumerate(
            [("red", (200, 0, 0)), ("green", (0, 200, 0)), ("blue", (0, 0, 200)), ("grey", (90, 90, 90))]
        ):
            Image.new("RGB", (70, 80), colour).save(data / f"{index}.png")
            handle.write(json.dumps({"file_name": f"{index}.png", "text": f"a {name} square"}) + "\n")
    output = tmp_path / "out"
    results = main(["--model", str(model_dir), "--data", str(data), "--output", str(output)])
    assert results["num_pairs"] == 4
    assert results["nmi_per_layer"] and results["attention"]["layers"]
    written = json.loads((output / "diagnostics.json").read_text())
    assert written["modality_gap"]["gap_l2"] == pytest.approx(results["modality_gap"]["gap_l2"])
    assert (output / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):  # refuses to write into a non-empty output directory
        main(["--model", str(model_dir), "--data", str(data), "--output", str(output)])
