"""Single-process tests of modeling_msclip.loss_msclip against hand computations written out with Python floats."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, close_to_scale

from modeling_msclip.loss_msclip import (
    ClipLoss,
    NClipHead,
    NClipLoss,
    NClipPrototypes,
    SigLipLoss,
    all_reduce_sum_with_grad,
    check_finite_loss,
    clamp_logit_scale_,
    gather_features,
    get_rank_and_world_size,
    xclip_loss,
)


def _unit_rows(batch: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)


def _rows(tensor: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in tensor]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _entropy(p: list[float]) -> float:
    return -sum(v * math.log(v) for v in p if v > 0)


# ----------------------------------------------------------------------------------------------------------------
# Hand references
# ----------------------------------------------------------------------------------------------------------------


def hand_clip_loss(images: list[list[float]], texts: list[list[float]], scale: float) -> float:
    n = len(images)
    logits = [[scale * _dot(images[i], texts[j]) for j in range(n)] for i in range(n)]
    image_to_text = 0.0
    text_to_image = 0.0
    for i in range(n):
        row = logits[i]
        image_to_text += -math.log(math.exp(row[i]) / sum(math.exp(v) for v in row))
        column = [logits[j][i] for j in range(n)]
        text_to_image += -math.log(math.exp(column[i]) / sum(math.exp(v) for v in column))
    return (image_to_text / n + text_to_image / n) / 2


def hand_siglip_loss(images: list[list[float]], texts: list[list[float]], scale: float, bias: float) -> float:
    n = len(images)
    total = 0.0
    for i in range(n):
        for j in range(n):
            sign = 1.0 if i == j else -1.0
            z = sign * (scale * _dot(images[i], texts[j]) + bias)
            total += -math.log(1.0 / (1.0 + math.exp(-z)))
    return total / n


def hand_nclip(
    s_image: list[list[float]],
    s_text: list[list[float]],
    student_temp: float,
    teacher_temp: float,
    center: list[float],
    lambda_sharp: float,
    lambda_smooth: float,
    center_momentum: float | None = None,
    teacher_scores: tuple[list[list[float]], list[list[float]]] | None = None,
) -> dict[str, float | list[float]]:
    """objectives.md section 2, one formula at a time.

    ``teacher_scores`` (image, text) replaces the scores the targets q are computed from: finite differences of a
    stop-gradient objective perturb the student side only.
    """
    n, k = len(s_image), len(s_image[0])
    t_image, t_text = teacher_scores if teacher_scores is not None else (s_image, s_text)
    p_image = [_softmax([v / student_temp for v in row]) for row in s_image]
    p_text = [_softmax([v / student_temp for v in row]) for row in s_text]
    q_image = [_softmax([(row[j] - center[j]) / teacher_temp for j in range(k)]) for row in t_image]
    q_text = [_softmax([(row[j] - center[j]) / teacher_temp for j in range(k)]) for row in t_text]

    def cross_entropy(q: list[float], p: list[float]) -> float:
        return -sum(q[j] * math.log(p[j]) for j in range(k))

    pred = 0.5 * (
        sum(cross_entropy(q_text[i], p_image[i]) for i in range(n)) / n
        + sum(cross_entropy(q_image[i], p_text[i]) for i in range(n)) / n
    )
    sample_entropy_image = sum(_entropy(p) for p in p_image) / n
    sample_entropy_text = sum(_entropy(p) for p in p_text) / n
    sharp = 0.5 * (sample_entropy_image + sample_entropy_text)
    pbar_image = [sum(p[j] for p in p_image) / n for j in range(k)]
    pbar_text = [sum(p[j] for p in p_text) / n for j in range(k)]
    smooth = -0.5 * (_entropy(pbar_image) + _entropy(pbar_text))
    argmax_image = [max(range(k), key=lambda j, p=p: p[j]) for p in p_image]
    argmax_text = [max(range(k), key=lambda j, p=p: p[j]) for p in p_text]
    result: dict[str, float | list[float]] = {
        "total": pred + lambda_sharp * sharp + lambda_smooth * smooth,
        "pred": pred,
        "sharp": sharp,
        "smooth": smooth,
        "batch_entropy_image": _entropy(pbar_image),
        "batch_entropy_text": _entropy(pbar_text),
        "sample_entropy_image": sample_entropy_image,
        "sample_entropy_text": sample_entropy_text,
        "prototypes_used_image": float(len(set(argmax_image))),
        "prototypes_used_text": float(len(set(argmax_text))),
        "argmax_agreement": sum(a == b for a, b in zip(argmax_image, argmax_text, strict=True)) / n,
    }
    if center_momentum is not None:
        batch_mean = [(sum(r[j] for r in s_image) + sum(r[j] for r in s_text)) / (2 * n) for j in range(k)]
        result["new_center"] = [center_momentum * center[j] + (1 - center_momentum) * batch_mean[j] for j in range(k)]
    return result


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers without a process group
# ----------------------------------------------------------------------------------------------------------------


def test_helpers_are_identity_without_process_group():
    assert get_rank_and_world_size() == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_features(x, with_grad=True) is x
    assert gather_features(x, with_grad=False) is x
    assert all_reduce_sum_with_grad(x) is x


# ----------------------------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("local_loss", [True, False])
def test_clip_loss_matches_hand_computation(local_loss):
    images, texts = _unit_rows(5, 4, seed=0), _unit_rows(5, 4, seed=1)
    logit_scale = torch.tensor([math.log(1 / 0.07)], dtype=torch.float64)
    loss = ClipLoss(local_loss=local_loss)(images, texts, logit_scale)
    expected = hand_clip_loss(_rows(images), _rows(texts), 1 / 0.07)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_clip_loss_gradients_match_finite_differences():
    images = _unit_rows(4, 3, seed=2).requires_grad_()
    texts = _unit_rows(4, 3, seed=3).requires_grad_()
    logit_scale = torch.tensor([1.3], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ClipLoss(), (images, texts, logit_scale))


def test_clip_loss_low_precision_inputs_are_computed_in_fp32():
    images, texts = _unit_rows(4, 8, seed=4), _unit_rows(4, 8, seed=5)
    logit_scale = torch.tensor([2.0])
    loss_bf16 = ClipLoss()(images.bfloat16(), texts.bfloat16(), logit_scale)
    expected = hand_clip_loss(_rows(images.bfloat16().double()), _rows(texts.bfloat16().double()), math.exp(2.0))
    assert loss_bf16.dtype == torch.float32
    assert loss_bf16.item() == pytest.approx(expected, rel=1e-5)


def test_clip_loss_forward_clamp_caps_scale_and_zeroes_its_gradient():
    images, texts = _unit_rows(4, 3, seed=6), _unit_rows(4, 3, seed=7)
    above = torch.tensor([math.log(400.0)], dtype=torch.float64, requires_grad=True)
    loss = ClipLoss(logit_scale_max=100.0)(images, texts, above)
    assert loss.item() == pytest.approx(hand_clip_loss(_rows(images), _rows(texts), 100.0), rel=1e-12)
    loss.backward()
    assert above.grad.item() == 0.0

    below = torch.tensor([math.log(50.0)], dtype=torch.float64, requires_grad=True)
    ClipLoss(logit_scale_max=100.0)(images, texts, below).backward()
    step = 1e-6
    numeric = (
        hand_clip_loss(_rows(images), _rows(texts), math.exp(math.log(50.0) + step))
        - hand_clip_loss(_rows(images), _rows(texts), math.exp(math.log(50.0) - step))
    ) / (2 * step)
    assert below.grad.item() == pytest.approx(numeric, rel=1e-6)

    unclamped = ClipLoss(logit_scale_max=None)(images, texts, above.detach())
    assert unclamped.item() == pytest.approx(hand_clip_loss(_rows(images), _rows(texts), 400.0), rel=1e-12)


def test_clamp_logit_scale_in_place():
    param = torch.nn.Parameter(torch.tensor([math.log(500.0)]))
    returned = clamp_logit_scale_(param, max_value=100.0)
    assert returned is param
    assert param.item() == pytest.approx(math.log(100.0))
    param.data.fill_(-0.5)
    clamp_logit_scale_(param, max_value=100.0)
    assert param.item() == 0.0
    param.data.fill_(2.0)
    clamp_logit_scale_(param, max_value=100.0)
    assert param.item() == 2.0
    with pytest.raises(ValueError, match="min_value"):
        clamp_logit_scale_(param, max_value=0.5, min_value=1.0)


def test_clip_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="gather_with_grad=True"):
        ClipLoss(local_loss=True, gather_with_grad=False)
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(torch.randn(3, 4), torch.randn(2, 4), torch.zeros(1))
    with pytest.raises(ValueError, match="2-D"):
        ClipLoss()(torch.randn(3), torch.randn(3), torch.zeros(1))
    with pytest.raises(ValueError, match="logit_scale"):
        ClipLoss()(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(2))


# ----------------------------------------------------------------------------------------------------------------
# SigLIP
# ----------------------------------------------------------------------------------------------------------------


def test_siglip_loss_matches_hand_computation_and_finite_differences():
    images = _unit_rows(4, 3, seed=8).requires_grad_()
    texts = _unit_rows(4, 3, seed=9).requires_grad_()
    logit_scale = torch.tensor([math.log(10.0)], dtype=torch.float64, requires_grad=True)
    logit_bias = torch.tensor([-10.0 + 7.5], dtype=torch.float64, requires_grad=True)
    loss = SigLipLoss()(images, texts, logit_scale, logit_bias)
    expected = hand_siglip_loss(_rows(images.detach()), _rows(texts.detach()), 10.0, -2.5)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert torch.autograd.gradcheck(SigLipLoss(), (images, texts, logit_scale, logit_bias))
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(images, texts, logit_scale, torch.zeros(3))


# ----------------------------------------------------------------------------------------------------------------
# nCLIP
# ----------------------------------------------------------------------------------------------------------------

B, K = 3, 5
NCLIP_KNOBS = {"student_temp": 0.1, "teacher_temp": 0.04, "lambda_sharp": 0.3, "lambda_smooth": 1.0}


def _scores(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Cosine-like scores in [-1, 1], as NClipHead produces with fixed prototype norms.
    return torch.rand(B, K, generator=generator, dtype=torch.float64) * 2 - 1


def _assert_matches(output, expected: dict) -> None:
    for name, value in expected.items():
        if name == "new_center":
            continue
        assert getattr(output, name).item() == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_nclip_terms_match_hand_computation():
    s_image, s_text = _scores(10), _scores(11)
    loss_fn = NClipLoss(num_prototypes=K, **NCLIP_KNOBS)
    output = loss_fn(s_image, s_text)
    expected = hand_nclip(_rows(s_image), _rows(s_text), center=[0.0] * K, **NCLIP_KNOBS)
    _assert_matches(output, expected)


def test_nclip_centering_uses_then_updates_the_centre_in_training_only():
    s_image, s_text = _scores(12), _scores(13)
    loss_fn = NClipLoss(num_prototypes=K, center_momentum=0.9, **NCLIP_KNOBS)
    first = hand_nclip(_rows(s_image), _rows(s_text), center=[0.0] * K, center_momentum=0.9, **NCLIP_KNOBS)
    _assert_matches(loss_fn(s_image, s_text), first)
    assert loss_fn.center.tolist() == pytest.approx(first["new_center"], rel=1e-6)

    # The second step sees the (float32) centre left by the first.
    centre = loss_fn.center.double().tolist()
    second = hand_nclip(_rows(s_text), _rows(s_image), center=centre, center_momentum=0.9, **NCLIP_KNOBS)
    _assert_matches(loss_fn(s_text, s_image), second)
    assert loss_fn.center.tolist() == pytest.approx(second["new_center"], rel=1e-6)

    loss_fn.eval()
    before = loss_fn.center.clone()
    loss_fn(s_image, s_text)
    assert torch.equal(loss_fn.center, before)


def test_nclip_stop_grad_gradient_is_the_softmax_cross_entropy_gradient():
    s_image, s_text = _scores(14).requires_grad_(), _scores(15).requires_grad_()
    output = NClipLoss(num_prototypes=K, stop_grad_targets=True, lambda_sharp=0.0, lambda_smooth=0.0)(s_image, s_text)
    output.total.backward()
    # d/ds of (1/2) mean_i H(q_i^T, softmax(s_i^I / tau_s)) with q fixed is (p_i^I - q_i^T) / (2 B tau_s).
    for i in range(B):
        p = _softmax([v / 0.1 for v in s_image[i].tolist()])
        q = _softmax([v / 0.04 for v in s_text[i].tolist()])
        expected = [(p[j] - q[j]) / (2 * B * 0.1) for j in range(K)]
        assert s_image.grad[i].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("stop_grad_targets", [True, False])
def test_nclip_total_gradient_matches_finite_differences_of_hand_reference(stop_grad_targets):
    s_image, s_text = _scores(16).requires_grad_(), _scores(17).requires_grad_()
    loss_fn = NClipLoss(num_prototypes=K, stop_grad_targets=stop_grad_targets, **NCLIP_KNOBS)
    loss_fn(s_image, s_text).total.backward()

    img, txt = _rows(s_image.detach()), _rows(s_text.detach())
    frozen = (img, txt) if stop_grad_targets else None

    def total(perturbed_img: list[list[float]]) -> float:
        teacher = frozen if frozen is not None else (perturbed_img, txt)
        return hand_nclip(perturbed_img, txt, center=[0.0] * K, teacher_scores=teacher, **NCLIP_KNOBS)["total"]

    step = 1e-6
    for i in range(B):
        for j in range(K):
            plus = [row[:] for row in img]
            minus = [row[:] for row in img]
            plus[i][j] += step
            minus[i][j] -= step
            numeric = (total(plus) - total(minus)) / (2 * step)
            assert s_image.grad[i, j].item() == pytest.approx(numeric, rel=1e-5, abs=1e-7)


def test_nclip_rejects_mismatched_scores():
    loss_fn = NClipLoss(num_prototypes=K)
    with pytest.raises(ValueError, match="num_prototypes=5"):
        loss_fn(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(torch.randn(3, K), torch.randn(2, K))
    with pytest.raises(ValueError, match="center_momentum"):
        NClipLoss(center_momentum=1.0)


def test_nclip_head_structure_scores_and_prototype_sharing():
    torch.manual_seed(0)
    image_head = NClipHead(6, hidden_dim=7, bottleneck_dim=4, num_layers=3, num_prototypes=K)
    text_head = NClipHead(5, hidden_dim=7, bottleneck_dim=4, num_layers=2, prototypes=image_head.prototypes)
    linears = [m for m in image_head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 7), (7, 7), (7, 4)]
    assert sum(isinstance(m, torch.nn.GELU) for m in image_head.mlp) == 2
    assert text_head.prototypes is image_head.prototypes and text_head.num_prototypes == K

    features = torch.randn(B, 6)
    with torch.no_grad():
        scores = image_head(features)
        bottleneck = image_head.mlp(features)
    cosines = [
        [float(b @ w) / (float(b.norm()) * float(w.norm())) for w in image_head.prototypes.weight.detach()]
        for b in bottleneck
    ]
    assert_close_to_scale(scores, cosines, 1e-6, "scores as prototype cosines")

    # Both heads' gradients accumulate into the one prototype matrix.
    image_head(features).sum().backward()
    image_only = image_head.prototypes.weight.grad.clone()
    text_head(torch.randn(B, 5)).sum().backward()
    assert not close_to_scale(image_head.prototypes.weight.grad, image_only, 1e-5)

    with pytest.raises(ValueError, match="bottleneck_dim"):
        NClipHead(5, bottleneck_dim=3, prototypes=image_head.prototypes)
    with pytest.raises(ValueError, match="num_layers"):
        NClipHead(5, num_layers=0)


def test_nclip_prototypes_learnable_norm_scales_rows():
    prototypes = NClipPrototypes(3, 4, learnable_norm=True)
    with torch.no_grad():
        prototypes.norm.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    x = F.normalize(torch.randn(2, 3), dim=-1)
    expected = x @ F.normalize(prototypes.weight, dim=1).T * torch.tensor([1.0, 2.0, 0.5, 3.0])
    assert_close_to_scale(prototypes(x), expected, 1e-5, "scores with learnable norms")


def _toy_nclip_run(lambda_smooth: float, steps: int = 150, num_prototypes: int = 16, batch: int = 64):
    """A tiny paired 'image'/'text' model trained with nCLIP on random linearly related pairs."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(8, 8, generator=generator)
    image_encoder, text_encoder = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
    image_head = NClipHead(16, hidden_dim=32, bottleneck_dim=8, num_layers=2, num_prototypes=num_prototypes)
    text_head = NClipHead(16, hidden_dim=32, bottleneck_dim=8, num_layers=2, prototypes=image_head.prototypes)
    loss_fn = NClipLoss(num_prototypes=num_prototypes, lambda_sharp=0.0, lambda_smooth=lambda_smooth)
    modules = torch.nn.ModuleList([image_encoder, text_encoder, image_head, text_head])
    optimizer = torch.optim.Adam(modules.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(batch, 8, generator=generator)
        y = x @ mixing + 0.1 * torch.randn(batch, 8, generator=generator)
        output = loss_fn(image_head(image_encoder(x)), text_head(text_encoder(y)))
        optimizer.zero_grad()
        output.total.backward()
        optimizer.step()
    return output


@pytest.fixture
def single_thread():
    # Hundreds of tiny ops: thread hand-offs cost more than they save, worse on a shared machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_nclip_toy_run_collapses_without_smoothness_and_not_with_it(single_thread):
    max_entropy = math.log(16)
    collapsed = _toy_nclip_run(lambda_smooth=0.0)
    assert collapsed.batch_entropy_image.item() < 0.05 * max_entropy
    assert collapsed.batch_entropy_text.item() < 0.05 * max_entropy
    assert collapsed.prototypes_used_image.item() <= 2

    regularised = _toy_nclip_run(lambda_smooth=1.0)
    assert regularised.batch_entropy_image.item() > 0.85 * max_entropy
    assert regularised.batch_entropy_text.item() > 0.85 * max_entropy
    assert regularised.prototypes_used_image.item() >= 12
    # Not the uniform escape either: individual assignments stay confident and agree across modalities.
    assert regularised.sample_entropy_image.item() < 0.6 * max_entropy
    assert regularised.argmax_agreement.item() > 0.6


def test_xclip_loss_weights_terms():
    clip, nclip = torch.tensor(2.0), torch.tensor(-1.0)
    assert xclip_loss(clip, nclip, w_clip=0.3, w_nclip=0.7).item() == pytest.approx(0.3 * 2.0 - 0.7)
    assert xclip_loss(clip, nclip).item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ----------------------------------------------------------------------------------------------------------------


def test_check_finite_loss_policies():
    finite = {"clip": torch.tensor(1.0), "nclip_pred": torch.tensor(0.5)}
    assert check_finite_loss(finite, "raise") is True
    assert check_finite_loss(torch.tensor(3.0), "skip") is True

    broken = {"clip": torch.tensor(1.0), "nclip_pred": torch.tensor(float("nan")), "smooth": torch.tensor(math.inf)}
    with pytest.raises(FloatingPointError, match=r"\['nclip_pred', 'smooth'\]"):
        check_finite_loss(broken, "raise")
    assert check_finite_loss(broken, "skip") is False
    with pytest.raises(FloatingPointError, match="'loss'"):
        check_finite_loss(torch.tensor(float("-inf")))
    with pytest.raises(ValueError, match="policy"):
        check_finite_loss(finite, "ignore")
    with pytest.raises(ValueError, match="empty"):
        check_finite_loss({}, "skip")


def test_pretraining_model_keeps_the_nclip_head_initialisation():
    # The model initialises every Linear; the head's declared truncated normal must survive that, as standalone.
    from modeling_msclip import MSClipConfig, MSClipForPreTraining

    torch.manual_seed(0)
    model = MSClipForPreTraining(MSClipConfig.from_preset("msclip-tiny", objective={"loss": "xclip"}))
    standalone = NClipHead(64, hidden_dim=512, bottleneck_dim=64, num_layers=3, num_prototypes=K)
    for head in (model.image_head, model.text_head, standalone):
        for layer in head.mlp:
            if isinstance(layer, torch.nn.Linear):
                assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1), layer
                assert torch.count_nonzero(layer.bias) == 0


# ---------------------------------------------------------------------------------------------- the objective factory

# loss name -> (class, supports_gradient_caching, uses_logit_bias, uses_prototype_scores, trains_logit_scale)
OBJECTIVE_CLASSES = {
    "clip": ("ClipObjective", True, False, False, True),
    "siglip": ("SigLipObjective", True, True, False, True),
    "nclip": ("NClipObjective", False, False, True, False),
    "xclip": ("XClipObjective", False, False, True, True),
}
SMALL_NCLIP = {"nclip_num_prototypes": 32, "nclip_hidden_dim": 32, "nclip_bottleneck_dim": 16}


def _tiny_pretraining_batch(config) -> dict[str, torch.Tensor]:
    size = config.vision_config.image_size
    input_ids = torch.tensor([[1, 5, 7, 2], [1, 6, 2, 0], [1, 8, 9, 2]])
    input_ids[input_ids == 2] = config.text_config.eos_token_id
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]]),
        "pixel_values": torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1)),
    }


@pytest.mark.parametrize("loss", list(OBJECTIVE_CLASSES))
def test_build_objective_builds_the_configured_loss(loss):
    from modeling_msclip import MSClipConfig, MSClipForPreTraining
    from modeling_msclip.loss_msclip import build_objective

    config = MSClipConfig.from_preset("msclip-tiny", objective={"loss": loss, **SMALL_NCLIP})
    objective = build_objective(config)
    kind, caches, uses_bias, uses_scores, trains_scale = OBJECTIVE_CLASSES[loss]
    assert (type(objective).__name__, objective.name) == (kind, loss)
    assert objective.supports_gradient_caching is caches
    assert (objective.uses_logit_bias, objective.uses_prototype_scores) == (uses_bias, uses_scores)
    assert objective.trains_logit_scale is trains_scale
    if not caches:
        with pytest.raises(NotImplementedError, match=f"the {loss} objective needs more than the pair embeddings"):
            objective.pair_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(()))

    # The model holds exactly the parameters its objective reads.
    model = MSClipForPreTraining(config)
    assert type(model.objective) is type(objective)
    assert (model.logit_bias is not None, model.image_head is not None) == (uses_bias, uses_scores)
    assert model.msclip.logit_scale.requires_grad is trains_scale


def test_build_objective_names_an_unknown_loss():
    from types import SimpleNamespace

    from modeling_msclip.loss_msclip import build_objective

    # The config refuses the name already; the factory still names it should a config bypass validation.
    config = SimpleNamespace(objective_config=SimpleNamespace(loss="infonce"), logit_scale_max=100.0)
    with pytest.raises(ValueError, match="unknown objective loss 'infonce'"):
        build_objective(config)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_the_pair_loss_is_the_loss_of_the_forward_and_its_terms_have_the_forward_names(loss):
    # What gradient caching computes (pair_loss on the features, terms by pair_terms) is what the forward reports.
    from modeling_msclip import MSClipConfig, MSClipForPreTraining

    torch.manual_seed(0)
    model = MSClipForPreTraining(MSClipConfig.from_preset("msclip-tiny", objective={"loss": loss})).eval()
    out = model(**_tiny_pretraining_batch(model.config))
    params = (out.logit_scale, out.logit_bias) if model.objective.uses_logit_bias else (out.logit_scale,)
    pair_loss = model.objective.pair_loss(out.image_embeds, out.text_embeds, *params)
    assert torch.equal(pair_loss, out.loss)
    terms = model.objective.pair_terms(pair_loss.detach(), *params)
    assert list(terms) == list(out.loss_terms)
    for name, value in terms.items():
        assert torch.equal(value.float().reshape(()), out.loss_terms[name]), name


def test_the_pretraining_model_computes_xclip_through_its_objective_as_the_sum_of_its_parts():
    from modeling_msclip import MSClipConfig, MSClipForPreTraining

    torch.manual_seed(0)
    config = MSClipConfig.from_preset("msclip-tiny", objective={"loss": "xclip", "clip_weight": 0.5})
    model = MSClipForPreTraining(config).eval()
    out = model(**_tiny_pretraining_batch(config))
    clip = ClipLoss()(out.image_embeds, out.text_embeds, out.logit_scale)
    nclip = model.objective.nclip(out.image_prototype_scores, out.text_prototype_scores).total
    assert_close_to_scale(out.loss, 0.5 * clip + nclip, 1e-6, "xclip")
    assert_close_to_scale(out.loss_terms["clip"], clip.detach(), 1e-6, "clip term")
    assert list(out.loss_terms)[-1] == "logit_scale_exp"


def test_a_checkpoint_with_the_old_nclip_centre_key_loads_with_the_same_loss(tmp_path):
    # Before the objective was one module the centre was `nclip_loss.center`; with centring on, it shapes the loss.
    from safetensors.torch import load_file, save_file

    from modeling_msclip import MSClipConfig, MSClipForPreTraining

    torch.manual_seed(0)
    objective = {"loss": "xclip", "nclip_center_momentum": 0.9, **SMALL_NCLIP}
    model = MSClipForPreTraining(MSClipConfig.from_preset("msclip-tiny", objective=objective)).eval()
    centre = torch.linspace(-0.5, 0.5, model.objective.nclip.center.numel())
    model.objective.nclip.center.copy_(centre)
    batch = _tiny_pretraining_batch(model.config)
    expected = model(**batch)
    uncentred = MSClipForPreTraining(model.config).eval()
    uncentred.load_state_dict(model.state_dict())
    uncentred.objective.nclip.center.zero_()
    assert not torch.equal(uncentred(**batch).loss, expected.loss)  # so equal losses below test the centre too

    old = {
        ("nclip_loss.center" if key == "objective.nclip.center" else key): value
        for key, value in model.state_dict().items()
    }
    assert "nclip_loss.center" in old and "objective.nclip.center" not in old
    fresh = MSClipForPreTraining(model.config).eval()
    fresh.load_state_dict(old)
    assert torch.equal(fresh.objective.nclip.center, centre)
    assert torch.equal(fresh(**batch).loss, expected.loss)

    model.save_pretrained(tmp_path / "old")
    weights = load_file(tmp_path / "old" / "model.safetensors")
    weights["nclip_loss.center"] = weights.pop("objective.nclip.center")
    save_file(weights, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    loaded = MSClipForPreTraining.from_pretrained(tmp_path / "old").eval()
    assert torch.equal(loaded.objective.nclip.center, centre)
    loaded_out = loaded(**batch)
    assert torch.equal(loaded_out.loss, expected.loss)
    for name, value in expected.loss_terms.items():
        assert torch.equal(loaded_out.loss_terms[name], value), name
    # Re-saved, it has the current name.
    loaded.save_pretrained(tmp_path / "resaved")
    resaved = load_file(tmp_path / "resaved" / "model.safetensors")
    assert "objective.nclip.center" in resaved and "nclip_loss.center" not in resaved
