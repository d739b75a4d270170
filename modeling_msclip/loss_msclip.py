# Copyright 2025 The modeling-msclip contributors.
# Licensed under the Apache License, Version 2.0.
"""Training objectives for MS-CLIP: symmetric InfoNCE (CLIP), sigmoid (SigLIP) and nCLIP/xCLIP.

The losses are plain modules (`ClipLoss`, `SigLipLoss`, `NClipLoss`, `xclip_loss`); `build_objective(config)` wraps
the configured one in an `MSClipObjective`, the one module `MSClipForPreTraining` and the trainer call
(``loss, terms = objective(features)``; ``objective.pair_loss`` for gradient caching).

Every loss here works in one process and across ranks of the default process group, and is written so that a
data-parallel run gives the *same loss and the same parameter gradients* as one process on the global batch,
assuming the gradient reduction averages over ranks (DDP, DeepSpeed and FSDP all do).

Why that holds (B = local batch, W = world size, N = B * W, L = the single-process loss on the N pairs):

* The autograd all-gather of :func:`gather_features` (a single-tensor all-gather whose backward is a sum
  reduce-scatter, as was the backward of the deprecated ``torch.distributed.nn.functional.all_gather``) sums the
  incoming gradients of all ranks in its backward. So if rank r computes a loss L_r on gathered features, the
  gradient reaching rank r's own features is sum_r' dL_r'/df_r, and after the ranks' parameter gradients are
  averaged the result is the gradient of mean_r L_r. Every rank therefore has to return a loss whose *mean over
  ranks* is L:
    - local rows (``ClipLoss(local_loss=True)``, ``SigLipLoss``, nCLIP's per-pair terms): L_r is the mean over the
      rank's own rows, and the mean of the L_r is the mean over all N rows = L. The per-rank values differ.
    - full N x N (``ClipLoss(local_loss=False, gather_with_grad=True)``): every rank returns L itself; the summed
      backward hands each rank W * dL/df_r and the averaging divides the W back out.
    - nCLIP smoothness: the batch-mean distribution is built with an autograd all_reduce
      (:func:`all_reduce_sum_with_grad`, whose backward is also a sum), every rank returns the same value, the same
      W cancels.
* A gather *without* grad (no autograd, local shard spliced back) only differentiates L with respect to the
  local shard: rank r gets exactly dL/df_r, so averaging would give dL/dtheta / W. ``ClipLoss`` multiplies the
  gradient of the local features by W in that mode so that it, too, matches one process (open_clip leaves the
  1/W in). Combined with local rows it would additionally drop the gradient of a rank's features acting as
  negatives in other ranks' rows, so that combination is refused.

Memory: full N x N logits cost O(N^2) per rank, local rows O(B * N) with identical numbers.

Collectives: only public, non-deprecated in-place ones of ``torch.distributed`` (``all_gather_single`` /
``reduce_scatter_single`` where torch has them, ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` on releases
that lack those names, and ``all_reduce``), inside two small ``torch.autograd.Function``s whose backwards are the
sums described above. torch 2.13 deprecates the autograd collectives of ``torch.distributed.nn.functional`` (they
warn, and torch.compile cannot trace them: it falls back to eager around them) and points to
``torch.distributed._functional_collectives``, a private module whose autograd entry points have changed between
releases (2.13 deprecates its ``all_gather_tensor_autograd``). The in-place collectives are implemented by NCCL and
by gloo (which builds the reduce-scatter from an all-reduce), and torch.compile traces them into the forward and
backward graphs (Dynamo rewrites them to functional collectives); the batch-size check reads a value on the host and
runs outside the graph. docs/losses.md has the details.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # the objective reads a config; the configuration module imports nothing from here
    from .configuration_msclip import MSClipConfig, MSClipObjectiveConfig

__all__ = [
    "ClipLoss",
    "ClipObjective",
    "MSClipObjective",
    "NClipObjective",
    "SigLipObjective",
    "XClipObjective",
    "build_objective",
    "all_reduce_sum_with_grad",
    "NClipHead",
    "NClipLoss",
    "NClipLossOutput",
    "NClipPrototypes",
    "SigLipLoss",
    "check_finite_loss",
    "clamp_logit_scale_",
    "gather_features",
    "get_rank_and_world_size",
    "xclip_loss",
]


# --------------------------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------------------------


def get_rank_and_world_size() -> tuple[int, int]:
    """Return ``(rank, world_size)`` of the default process group, or ``(0, 1)`` when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.compiler.disable
def _check_same_local_batch(tensor: torch.Tensor, world_size: int) -> None:
    # Collectives need equal shapes and the label offset rank * B assumes them; every rank sees the same list of
    # sizes, so every rank raises together instead of one of them hanging in the next collective.
    local = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes_list = _all_gather_dim0(local, world_size).tolist()  # one host sync
    if len(set(sizes_list)) != 1:
        raise ValueError(
            f"all ranks must pass the same local batch size to the loss, got {sizes_list} "
            "(use drop_last=True in the data loader)"
        )


# torch 2.13 renamed the single-tensor collectives (the old names still work there but warn); torch < 2.13 has only
# the old names. Resolved once; absent (None) on builds without distributed, where world size is always 1.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor", None)


def _all_gather_dim0(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """``[W * B, ...]``: the ranks' contiguous ``[B, ...]`` tensors concatenated in rank order (no autograd)."""
    out = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    _ALL_GATHER_SINGLE(out, tensor)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient of this rank's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, world_size: int) -> torch.Tensor:  # type: ignore[override]
        ctx.world_size = world_size
        return _all_gather_dim0(tensor.contiguous(), world_size)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad_output = grad_output.contiguous()
        grad_input = grad_output.new_empty((grad_output.shape[0] // ctx.world_size, *grad_output.shape[1:]))
        _REDUCE_SCATTER_SINGLE(grad_input, grad_output, op=dist.ReduceOp.SUM)
        return grad_input, None


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks (out of place); the backward sums the ranks' gradients too (the output is shared by all)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad_input = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad_input, op=dist.ReduceOp.SUM)
        return grad_input


def gather_features(tensor: torch.Tensor, with_grad: bool, check_batch: bool = True) -> torch.Tensor:
    """All-gather ``tensor`` along dim 0 across the default process group (rank order).

    Args:
        tensor: local ``[B, ...]`` tensor; every rank must pass the same shape (checked).
        with_grad: ``True`` gathers with an autograd all-gather whose backward sums the gradients of all ranks and
            routes them to the owner rank (a reduce-scatter). ``False`` gathers without autograd and splices the
            local tensor back into its slot, so only the local shard carries gradient (it receives this rank's
            gradient only).
        check_batch: compare the local batch sizes across ranks first (one extra collective). A caller gathering a
            second tensor of the batch it has just checked passes ``False``.

    Returns:
        ``[W * B, ...]`` tensor; ``tensor`` itself when not distributed or with world size 1.
    """
    rank, world_size = get_rank_and_world_size()
    if world_size == 1:
        return tensor
    if check_batch:
        _check_same_local_batch(tensor, world_size)
    if with_grad:
        return _AllGatherWithGrad.apply(tensor, world_size)
    shards = list(_all_gather_dim0(tensor.detach().contiguous(), world_size).chunk(world_size))
    shards[rank] = tensor
    return torch.cat(shards, dim=0)


def all_reduce_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks; the backward also sums (see the module docstring for why that is what we want)."""
    _, world_size = get_rank_and_world_size()
    if world_size == 1:
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)


def _all_reduce_sum_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a detached copy of ``tensor`` over ranks (for buffers and diagnostics)."""
    out = tensor.detach().clone()
    if get_rank_and_world_size()[1] > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class _ScaleGradient(torch.autograd.Function):
    """Identity in the forward; multiplies the incoming gradient by ``factor`` in the backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad_output * ctx.factor, None


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # At least fp32 (bf16/fp16 logits over a large batch lose the softmax tail); float64 stays float64.
    return torch.promote_types(tensor.dtype, torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Temperature handling
# --------------------------------------------------------------------------------------------------------------------


def _check_scalar_param(value: torch.Tensor, name: str) -> None:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor with exactly one element (shape [1]), got {shape}")


def logit_scale_exp(logit_scale: torch.Tensor, logit_scale_max: float | None, dtype: torch.dtype) -> torch.Tensor:
    """``exp(logit_scale)`` capped at ``logit_scale_max``; the cap passes no gradient to the parameter while active."""
    _check_scalar_param(logit_scale, "logit_scale")
    scale = logit_scale.to(dtype).reshape(()).exp()
    if logit_scale_max is not None:
        scale = scale.clamp(max=logit_scale_max)
    return scale


@torch.no_grad()
def clamp_logit_scale_(param: torch.Tensor, max_value: float = 100.0, min_value: float = 1.0) -> torch.Tensor:
    """Clamp a log-space ``logit_scale`` parameter in place so that ``min_value <= exp(param) <= max_value``.

    Call it after each optimizer step (open_clip's recipe: ``[0, ln 100]`` in log space). Unlike the forward-side
    cap of :class:`ClipLoss`, this keeps the parameter itself in range, so its gradient is never silenced for long.
    Under DeepSpeed ZeRO-3 call it on the gathered parameter (``deepspeed.zero.GatheredParameters``).

    Args:
        param: the log-space temperature parameter (any shape, usually ``[1]``).
        max_value: upper bound of ``exp(param)``.
        min_value: lower bound of ``exp(param)``; the default 1.0 is open_clip's lower bound of 0 in log space.

    Returns:
        ``param`` (modified in place).
    """
    if not 0 < min_value <= max_value:
        raise ValueError(f"need 0 < min_value <= max_value, got min_value={min_value}, max_value={max_value}")
    param.clamp_(math.log(min_value), math.log(max_value))
    return param


# --------------------------------------------------------------------------------------------------------------------
# CLIP (symmetric InfoNCE)
# --------------------------------------------------------------------------------------------------------------------


def _check_pair_embeds(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> None:
    if image_embeds.dim() != 2 or text_embeds.dim() != 2:
        raise ValueError(
            f"image_embeds and text_embeds must be 2-D [batch, dim], got {tuple(image_embeds.shape)} and "
            f"{tuple(text_embeds.shape)}"
        )
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds and text_embeds must have the same shape (one text per image), got "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}"
        )


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over image/text pairs, optionally with negatives from all ranks.

    ``loss = (CE(logits_per_image, labels) + CE(logits_per_text, labels)) / 2`` with
    ``logits_per_image = exp(logit_scale) * image_embeds @ text_embeds.T``, computed in (at least) fp32.

    Distributed modes (all give the single-process loss and gradients on the global batch after the ranks'
    gradients are averaged; see the module docstring):

    * ``local_loss=True`` (requires ``gather_with_grad=True``): each rank scores its own B images against all N
      texts and its own B texts against all N images, labels ``arange(B) + rank * B``. Logits O(B * N) per rank.
      The returned value is this rank's share; the mean over ranks is the global loss.
    * ``local_loss=False``: each rank builds the full N x N logits (O(N^2)) and returns the global loss itself.
      With ``gather_with_grad=False`` the gathered copies carry no gradient and the local shard's gradient is
      multiplied by the world size to compensate for the averaging.

    Args:
        local_loss: score local rows against the gathered batch instead of the full N x N matrix.
        gather_with_grad: gather features with an autograd all-gather.
        logit_scale_max: cap on ``exp(logit_scale)`` applied in the forward; ``None`` disables it. While the cap is
            active the temperature receives zero gradient, so prefer :func:`clamp_logit_scale_` after each optimizer
            step and keep this cap as a guard.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, logit_scale_max: float | None = 100.0):
        super().__init__()
        if local_loss and not gather_with_grad:
            raise ValueError(
                "ClipLoss(local_loss=True) requires gather_with_grad=True: without it a rank's features get no "
                "gradient as negatives in the other ranks' rows, so the gradient is not the global-batch gradient"
            )
        if logit_scale_max is not None and logit_scale_max <= 0:
            raise ValueError(f"logit_scale_max must be positive or None, got {logit_scale_max}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.logit_scale_max = logit_scale_max

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
            f"logit_scale_max={self.logit_scale_max}"
        )

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            image_embeds: ``[B, D]`` L2-normalised image embeddings of this rank.
            text_embeds: ``[B, D]`` L2-normalised text embeddings; row i is paired with image row i.
            logit_scale: the raw log-space temperature parameter (one element, shape ``[1]``).

        Returns:
            Scalar loss (this rank's share in ``local_loss`` mode).
        """
        _check_pair_embeds(image_embeds, text_embeds)
        dtype = _compute_dtype(image_embeds)
        scale = logit_scale_exp(logit_scale, self.logit_scale_max, dtype)
        image_embeds = image_embeds.to(dtype)
        text_embeds = text_embeds.to(dtype)
        rank, world_size = get_rank_and_world_size()
        batch_size = image_embeds.shape[0]

        if world_size == 1:
            logits_per_image = scale * image_embeds @ text_embeds.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(batch_size, device=image_embeds.device)
        elif self.local_loss:
            all_image_embeds = gather_features(image_embeds, with_grad=True)
            all_text_embeds = gather_features(text_embeds, with_grad=True, check_batch=False)
            logits_per_image = scale * image_embeds @ all_text_embeds.T
            logits_per_text = scale * text_embeds @ all_image_embeds.T
            labels = torch.arange(batch_size, device=image_embeds.device) + rank * batch_size
        else:
            if not self.gather_with_grad:
                image_embeds = _ScaleGradient.apply(image_embeds, float(world_size))
                text_embeds = _ScaleGradient.apply(text_embeds, float(world_size))
            all_image_embeds = gather_features(image_embeds, with_grad=self.gather_with_grad)
            all_text_embeds = gather_features(text_embeds, with_grad=self.gather_with_grad, check_batch=False)
            logits_per_image = scale * all_image_embeds @ all_text_embeds.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(batch_size * world_size, device=image_embeds.device)

        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


# --------------------------------------------------------------------------------------------------------------------
# SigLIP
# --------------------------------------------------------------------------------------------------------------------


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP): every image/text pair is an independent binary classification.

    ``loss = -(1/N) * sum_{i,j} log sigmoid(z_ij * (exp(logit_scale) * <u_i, v_j> + logit_bias))`` with
    ``z_ij = +1`` for matched pairs and ``-1`` otherwise; the sum runs over all N^2 pairs of the global batch and is
    normalised by the number of images N, computed in (at least) fp32.

    Across ranks the texts are gathered with an autograd all-gather and each rank scores its own B images against
    all N texts (logits O(B * N)), dividing by B: the returned value is this rank's share and the mean over ranks is
    the global loss; averaged gradients equal the single-process gradients.

    Args:
        logit_scale_max: optional cap on ``exp(logit_scale)`` in the forward (zero gradient while active);
            ``None`` (default) applies none, as SigLIP does.
    """

    def __init__(self, logit_scale_max: float | None = None):
        super().__init__()
        if logit_scale_max is not None and logit_scale_max <= 0:
            raise ValueError(f"logit_scale_max must be positive or None, got {logit_scale_max}")
        self.logit_scale_max = logit_scale_max

    def extra_repr(self) -> str:
        return f"logit_scale_max={self.logit_scale_max}"

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            image_embeds: ``[B, D]`` L2-normalised image embeddings of this rank.
            text_embeds: ``[B, D]`` L2-normalised text embeddings, paired row by row.
            logit_scale: raw log-space temperature (one element; SigLIP initialises it to ln 10).
            logit_bias: additive logit bias (one element; SigLIP initialises it to -10).

        Returns:
            Scalar loss (this rank's share when distributed).
        """
        _check_pair_embeds(image_embeds, text_embeds)
        _check_scalar_param(logit_bias, "logit_bias")
        dtype = _compute_dtype(image_embeds)
        scale = logit_scale_exp(logit_scale, self.logit_scale_max, dtype)
        bias = logit_bias.to(dtype).reshape(())
        image_embeds = image_embeds.to(dtype)
        text_embeds = text_embeds.to(dtype)
        rank, _ = get_rank_and_world_size()
        batch_size = image_embeds.shape[0]

        all_text_embeds = gather_features(text_embeds, with_grad=True)
        logits = scale * image_embeds @ all_text_embeds.T + bias
        signs = -torch.ones_like(logits)
        local_rows = torch.arange(batch_size, device=logits.device)
        signs[local_rows, local_rows + rank * batch_size] = 1.0
        return -F.logsigmoid(signs * logits).sum() / batch_size


# --------------------------------------------------------------------------------------------------------------------
# nCLIP / xCLIP
# --------------------------------------------------------------------------------------------------------------------


class NClipPrototypes(nn.Module):
    """Weight-normalised linear map to ``num_prototypes`` scores, without bias: ``s = (g * V / ||V||_row) x``.

    With ``learnable_norm=False`` (default) g is fixed to 1, so each score is the cosine between the (L2-normalised)
    head output and a prototype direction, bounded to [-1, 1] before the temperature.

    Args:
        dim: input (bottleneck) dimension.
        num_prototypes: number of prototypes K.
        learnable_norm: learn the per-prototype norm g instead of fixing it to 1.
    """

    def __init__(self, dim: int, num_prototypes: int, learnable_norm: bool = False):
        super().__init__()
        if dim <= 0 or num_prototypes <= 0:
            raise ValueError(f"dim and num_prototypes must be positive, got {dim} and {num_prototypes}")
        self.dim = dim
        self.num_prototypes = num_prototypes
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        self.norm = nn.Parameter(torch.ones(num_prototypes)) if learnable_norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform directions (the scale of V is irrelevant to the output but sets the step size of its updates)."""
        bound = 1.0 / math.sqrt(self.dim)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.norm is not None:
            nn.init.ones_(self.norm)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_prototypes={self.num_prototypes}, learnable_norm={self.norm is not None}"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``[..., dim]`` features to ``[..., num_prototypes]`` scores."""
        weight = F.normalize(self.weight, dim=1)
        if self.norm is not None:
            weight = weight * self.norm[:, None]
        return F.linear(features, weight)


class NClipHead(nn.Module):
    """nCLIP projection head: MLP -> L2 norm -> weight-normalised prototypes (DINO-style head).

    MLP: ``num_layers`` linear layers ``in_dim -> hidden_dim -> ... -> bottleneck_dim`` with GELU between them
    (``num_layers=1`` is a single ``in_dim -> bottleneck_dim`` linear).

    Args:
        in_dim: dimension of the input features (pooled tower output or projected embedding).
        hidden_dim: width of the hidden layers.
        bottleneck_dim: output dimension of the MLP, L2-normalised before the prototypes.
        num_layers: number of linear layers in the MLP (>= 1).
        num_prototypes: number of prototypes K (ignored when ``prototypes`` is given).
        prototypes: an existing :class:`NClipPrototypes` to share (e.g. the image head's, for the text head); it is
            registered as a submodule of both heads and called by both, so the sharing survives wrappers that hook
            module calls.
        learnable_prototype_norm: passed to a newly built :class:`NClipPrototypes`.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        num_prototypes: int = 65536,
        prototypes: NClipPrototypes | None = None,
        learnable_prototype_norm: bool = False,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if min(in_dim, hidden_dim, bottleneck_dim) <= 0:
            raise ValueError(
                f"in_dim, hidden_dim and bottleneck_dim must be positive, got {in_dim}, {hidden_dim}, {bottleneck_dim}"
            )
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            # Read by reset_parameters and by MSClipPreTrainedModel._init_weights (which initialises every Linear).
            layers[-1].trunc_normal_std = 0.02
        self.mlp = nn.Sequential(*layers)
        if prototypes is None:
            prototypes = NClipPrototypes(bottleneck_dim, num_prototypes, learnable_norm=learnable_prototype_norm)
        elif not isinstance(prototypes, NClipPrototypes):
            raise TypeError(f"prototypes must be an NClipPrototypes module, got {type(prototypes).__name__}")
        elif prototypes.dim != bottleneck_dim:
            raise ValueError(
                f"shared prototypes expect dim {prototypes.dim}, but this head's bottleneck_dim is {bottleneck_dim}"
            )
        self.prototypes = prototypes
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal(0.02) MLP weights and zero biases (the prototypes keep their own init)."""
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=module.trunc_normal_std)
                nn.init.zeros_(module.bias)

    @property
    def num_prototypes(self) -> int:
        """Number of prototypes K (the width of the returned scores)."""
        return self.prototypes.num_prototypes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Map ``[B, in_dim]`` features to prototype scores ``s = W norm(g(z))`` of shape ``[B, num_prototypes]``."""
        return self.prototypes(F.normalize(self.mlp(features), dim=-1))


@dataclass
class NClipLossOutput:
    """Terms and diagnostics of :class:`NClipLoss` (diagnostics are detached and computed over the global batch).

    Attributes:
        total: ``pred + lambda_sharp * sharp + lambda_smooth * smooth`` (this rank's share, differentiable).
        pred: cross-modal prediction term L_pred.
        sharp: mean per-sample entropy term L_sharp.
        smooth: negative entropy of the global batch-mean distributions, L_smooth.
        batch_entropy_image / batch_entropy_text: H(mean_i p_i) per modality; falling towards 0 means collapse onto
            one prototype (at most ln K).
        sample_entropy_image / sample_entropy_text: mean_i H(p_i) per modality; stuck near ln K means uniform,
            uninformative outputs.
        prototypes_used_image / prototypes_used_text: number of distinct argmax prototypes over the global batch.
        argmax_agreement: fraction of pairs whose image and text argmax prototypes agree.
    """

    total: torch.Tensor
    pred: torch.Tensor
    sharp: torch.Tensor
    smooth: torch.Tensor
    batch_entropy_image: torch.Tensor
    batch_entropy_text: torch.Tensor
    sample_entropy_image: torch.Tensor
    sample_entropy_text: torch.Tensor
    prototypes_used_image: torch.Tensor
    prototypes_used_text: torch.Tensor
    argmax_agreement: torch.Tensor


def _entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Row entropies ``-sum_k p_k log p_k`` from log-probabilities (exact zeros contribute 0)."""
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def _entropy_of_probs(probs: torch.Tensor) -> torch.Tensor:
    # The clamp keeps log finite for underflowed entries; its zero gradient there avoids 0 * inf.
    return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)


class NClipLoss(nn.Module):
    """Non-contrastive nCLIP objective on prototype scores (spec: docs/losses.md; all defaults are project defaults).

    With ``p_i^m = softmax(s_i^m / student_temp)`` and ``q_i^m = softmax((s_i^m - c) / teacher_temp)`` (detached when
    ``stop_grad_targets``), ``H(q, p) = -sum_k q_k log p_k`` and ``H(p) = H(p, p)``:

    * ``pred = (mean_i H(q_i^T, p_i^I) + mean_i H(q_i^I, p_i^T)) / 2``: each modality predicts the other's targets;
    * ``sharp = (mean_i H(p_i^I) + mean_i H(p_i^T)) / 2`` (minimised when ``lambda_sharp > 0``);
    * ``smooth = -(H(pbar^I) + H(pbar^T)) / 2`` with ``pbar^m`` the mean of ``p_i^m`` over the *global* batch,
      built from an autograd all-reduce of the local sums (K floats per modality, no N x K gather);
    * ``total = pred + lambda_sharp * sharp + lambda_smooth * smooth``.

    Centering (``center_momentum`` not None): a buffer c, subtracted from the teacher scores, updated in training
    mode after the loss as ``c <- m c + (1 - m) * mean(s)`` over both modalities and the global batch, without grad.

    Args:
        num_prototypes: K, the width of the scores (checked; sizes the centre buffer).
        student_temp: tau_s.
        teacher_temp: tau_t (below tau_s to sharpen the targets).
        stop_grad_targets: detach the targets q.
        center_momentum: momentum m of the centre, or None to disable centering.
        lambda_sharp: weight of the sharpness term.
        lambda_smooth: weight of the smoothness term (0 lets the objective collapse onto one prototype).
    """

    def __init__(
        self,
        num_prototypes: int = 65536,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        stop_grad_targets: bool = True,
        center_momentum: float | None = None,
        lambda_sharp: float = 0.0,
        lambda_smooth: float = 1.0,
    ):
        super().__init__()
        if num_prototypes <= 0:
            raise ValueError(f"num_prototypes must be positive, got {num_prototypes}")
        if student_temp <= 0 or teacher_temp <= 0:
            raise ValueError(f"temperatures must be positive, got student {student_temp}, teacher {teacher_temp}")
        if center_momentum is not None and not 0.0 <= center_momentum < 1.0:
            raise ValueError(f"center_momentum must be in [0, 1) or None, got {center_momentum}")
        self.num_prototypes = num_prototypes
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.stop_grad_targets = stop_grad_targets
        self.center_momentum = center_momentum
        self.lambda_sharp = lambda_sharp
        self.lambda_smooth = lambda_smooth
        # Kept even when centering is off so checkpoints have the same keys whatever the setting.
        self.register_buffer("center", torch.zeros(num_prototypes, dtype=torch.float32))

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, student_temp={self.student_temp}, "
            f"teacher_temp={self.teacher_temp}, stop_grad_targets={self.stop_grad_targets}, "
            f"center_momentum={self.center_momentum}, lambda_sharp={self.lambda_sharp}, "
            f"lambda_smooth={self.lambda_smooth}"
        )

    def _teacher_probs(self, scores: torch.Tensor) -> torch.Tensor:
        if self.center_momentum is not None:
            scores = scores - self.center.to(scores.dtype)
        targets = torch.softmax(scores / self.teacher_temp, dim=-1)
        return targets.detach() if self.stop_grad_targets else targets

    @torch.no_grad()
    def _update_center(self, image_scores: torch.Tensor, text_scores: torch.Tensor) -> None:
        _, world_size = get_rank_and_world_size()
        count = (image_scores.shape[0] + text_scores.shape[0]) * world_size
        batch_sum = _all_reduce_sum_no_grad(image_scores.sum(0) + text_scores.sum(0))
        self.center.mul_(self.center_momentum).add_(batch_sum.float() / count, alpha=1.0 - self.center_momentum)

    @torch.no_grad()
    def _diagnostics(
        self, log_p_image: torch.Tensor, log_p_text: torch.Tensor, pbar_image: torch.Tensor, pbar_text: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        _, world_size = get_rank_and_world_size()
        global_batch = log_p_image.shape[0] * world_size
        argmax_image = log_p_image.argmax(dim=-1)
        argmax_text = log_p_text.argmax(dim=-1)
        local_sums = torch.stack(
            [
                _entropy_from_log_probs(log_p_image).sum(),
                _entropy_from_log_probs(log_p_text).sum(),
                (argmax_image == argmax_text).to(log_p_image.dtype).sum(),
            ]
        )
        sums = _all_reduce_sum_no_grad(local_sums) / global_batch
        # One K-sized histogram per modality: "prototypes used" needs the global set of argmaxes.
        counts = torch.stack(
            [torch.bincount(a, minlength=self.num_prototypes) for a in (argmax_image, argmax_text)]
        ).float()
        used = (_all_reduce_sum_no_grad(counts) > 0).sum(dim=-1)
        return {
            "batch_entropy_image": _entropy_of_probs(pbar_image.detach()),
            "batch_entropy_text": _entropy_of_probs(pbar_text.detach()),
            "sample_entropy_image": sums[0],
            "sample_entropy_text": sums[1],
            "prototypes_used_image": used[0],
            "prototypes_used_text": used[1],
            "argmax_agreement": sums[2],
        }

    def forward(self, image_scores: torch.Tensor, text_scores: torch.Tensor) -> NClipLossOutput:
        """Compute the nCLIP terms.

        Args:
            image_scores: ``[B, K]`` prototype scores of the images (output of :class:`NClipHead`).
            text_scores: ``[B, K]`` prototype scores of the paired texts.

        Returns:
            :class:`NClipLossOutput`; back-propagate ``.total``.
        """
        if image_scores.dim() != 2 or image_scores.shape != text_scores.shape:
            raise ValueError(
                f"image_scores and text_scores must both be [batch, num_prototypes] with the same shape, got "
                f"{tuple(image_scores.shape)} and {tuple(text_scores.shape)}"
            )
        if image_scores.shape[1] != self.num_prototypes:
            raise ValueError(
                f"scores have {image_scores.shape[1]} prototypes but NClipLoss(num_prototypes={self.num_prototypes})"
            )
        dtype = _compute_dtype(image_scores)
        image_scores = image_scores.to(dtype)
        text_scores = text_scores.to(dtype)
        _, world_size = get_rank_and_world_size()
        if world_size > 1:
            # The global mean p-bar and the rank-averaged per-pair means both assume equal local batches.
            _check_same_local_batch(image_scores, world_size)
        global_batch = image_scores.shape[0] * world_size

        log_p_image = F.log_softmax(image_scores / self.student_temp, dim=-1)
        log_p_text = F.log_softmax(text_scores / self.student_temp, dim=-1)
        q_image = self._teacher_probs(image_scores)
        q_text = self._teacher_probs(text_scores)

        pred = (-(q_text * log_p_image).sum(-1).mean() - (q_image * log_p_text).sum(-1).mean()) / 2
        sharp = (_entropy_from_log_probs(log_p_image).mean() + _entropy_from_log_probs(log_p_text).mean()) / 2
        pbar_image = all_reduce_sum_with_grad(log_p_image.exp().sum(0)) / global_batch
        pbar_text = all_reduce_sum_with_grad(log_p_text.exp().sum(0)) / global_batch
        smooth = -(_entropy_of_probs(pbar_image) + _entropy_of_probs(pbar_text)) / 2
        total = pred + self.lambda_sharp * sharp + self.lambda_smooth * smooth

        diagnostics = self._diagnostics(log_p_image, log_p_text, pbar_image, pbar_text)
        if self.center_momentum is not None and self.training:
            self._update_center(image_scores.detach(), text_scores.detach())
        return NClipLossOutput(total=total, pred=pred, sharp=sharp, smooth=smooth, **diagnostics)


def xclip_loss(
    clip_loss: torch.Tensor, nclip_total: torch.Tensor, w_clip: float = 1.0, w_nclip: float = 1.0
) -> torch.Tensor:
    """xCLIP objective ``w_clip * clip_loss + w_nclip * nclip_total`` (project defaults 1 / 1)."""
    return w_clip * clip_loss + w_nclip * nclip_total


# --------------------------------------------------------------------------------------------------------------------
# The objective of a configuration: one module, one call
# --------------------------------------------------------------------------------------------------------------------


class MSClipObjective(nn.Module):
    """The pre-training objective: called on the model's features, returns the loss and its named terms.

    One subclass per loss (`ClipObjective`, `SigLipObjective`, `NClipObjective`, `XClipObjective`), chosen from the
    config by `build_objective`. The class attributes say what the objective reads besides the pair embeddings, so
    that the model builds the matching parameters without comparing loss names. Those parameters (the SigLIP bias,
    the nCLIP heads) stay the model's: checkpoints keep their keys and optimizer states their order.

    ``features`` is anything with the fields of `MSClipPreTrainingOutput` the objective reads: ``image_embeds``,
    ``text_embeds``, ``logit_scale`` always, ``logit_bias`` if `uses_logit_bias`, ``image_prototype_scores`` and
    ``text_prototype_scores`` if `uses_prototype_scores`.

    Attributes:
        name: The config's loss name; also the key of the loss's main term.
        uses_logit_bias: The loss takes a SigLIP logit bias (the model holds ``logit_bias``).
        uses_prototype_scores: The loss takes the prototype scores of the two nCLIP heads (the model holds them).
        trains_logit_scale: The loss depends on ``logit_scale``. Where it does not, the model freezes the parameter:
            DDP, which runs without searching for unused parameters, must not wait for its gradient.
        logit_scale_max: The cap on ``exp(logit_scale)`` of the contrastive terms, also applied to the logged
            temperature.
    """

    name: ClassVar[str] = ""
    uses_logit_bias: ClassVar[bool] = False
    uses_prototype_scores: ClassVar[bool] = False
    trains_logit_scale: ClassVar[bool] = True

    def __init__(self, logit_scale_max: float | None) -> None:
        super().__init__()
        self.logit_scale_max = logit_scale_max

    @property
    def supports_gradient_caching(self) -> bool:
        """Whether the whole loss is `pair_loss`, a function of the pair embeddings and the loss parameters alone,
        which gradient caching needs: it recomputes the embeddings micro-batch by micro-batch."""
        return False

    def pair_loss(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, *loss_params: torch.Tensor
    ) -> torch.Tensor:
        """The loss of ``[N, D]`` pair embeddings and the loss parameters (``logit_scale`` [, ``logit_bias``]), as
        `gradcache_msclip.gradcache_backward` calls its ``loss_fn``.

        Raises:
            NotImplementedError: for an objective that needs more than the embeddings (see
                `supports_gradient_caching`).
        """
        raise NotImplementedError(f"the {self.name} objective needs more than the pair embeddings")

    def pair_terms(
        self, loss: torch.Tensor, logit_scale: torch.Tensor, *loss_params: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The terms `forward` reports, for a `pair_loss` computed elsewhere (by gradient caching) with these loss
        parameters: ``{name: loss, "logit_scale_exp": temperature}``."""
        return {self.name: loss, "logit_scale_exp": self.temperature(logit_scale)}

    def temperature(self, logit_scale: torch.Tensor) -> torch.Tensor:
        """``exp(logit_scale)`` capped at `logit_scale_max` (what the contrastive terms use), in fp32."""
        return logit_scale_exp(logit_scale, self.logit_scale_max, torch.float32)

    def loss_and_terms(self, features: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its named terms (what subclasses implement; `forward` adds the temperature)."""
        raise NotImplementedError

    def forward(self, features: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the objective.

        Args:
            features: the model's features (see the class docstring).

        Returns:
            ``(loss, terms)``: the loss to back-propagate (this rank's share under data parallelism) and the named
            terms to log, ``logit_scale_exp`` (the temperature used) last.
        """
        loss, terms = self.loss_and_terms(features)
        terms["logit_scale_exp"] = self.temperature(features.logit_scale)
        return loss, terms


class ClipObjective(MSClipObjective):
    """CLIP: symmetric InfoNCE over the pairs (`ClipLoss`); term ``clip``."""

    name = "clip"

    def __init__(self, clip: ClipLoss) -> None:
        super().__init__(clip.logit_scale_max)
        self.clip = clip

    @property
    def supports_gradient_caching(self) -> bool:
        return True

    def pair_loss(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        return self.clip(image_embeds, text_embeds, logit_scale)

    def loss_and_terms(self, features: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.pair_loss(features.image_embeds, features.text_embeds, features.logit_scale)
        return loss, {self.name: loss}


class SigLipObjective(MSClipObjective):
    """SigLIP: the pairwise sigmoid loss (`SigLipLoss`) with the model's ``logit_bias``; term ``siglip``."""

    name = "siglip"
    uses_logit_bias = True

    def __init__(self, siglip: SigLipLoss) -> None:
        super().__init__(siglip.logit_scale_max)
        self.siglip = siglip

    @property
    def supports_gradient_caching(self) -> bool:
        return True

    def pair_loss(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
    ) -> torch.Tensor:
        return self.siglip(image_embeds, text_embeds, logit_scale, logit_bias)

    def loss_and_terms(self, features: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = self.pair_loss(features.image_embeds, features.text_embeds, features.logit_scale, features.logit_bias)
        return loss, {self.name: loss}


class NClipObjective(MSClipObjective):
    """nCLIP on the prototype scores of the two heads (`NClipLoss`); terms ``nclip`` and its parts and diagnostics
    (`NClipLossOutput`). It holds the loss's centre buffer (``nclip.center``)."""

    name = "nclip"
    uses_prototype_scores = True
    trains_logit_scale = False

    def __init__(self, nclip: NClipLoss, logit_scale_max: float | None = 100.0) -> None:
        super().__init__(logit_scale_max)
        self.nclip = nclip

    def nclip_terms(self, features: Any, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add the nCLIP terms of ``features`` to ``terms`` and return the nCLIP total."""
        output = self.nclip(features.image_prototype_scores, features.text_prototype_scores)
        terms.update({key: value for key, value in vars(output).items() if key != "total"})
        terms["nclip"] = output.total
        return output.total

    def loss_and_terms(self, features: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms: dict[str, torch.Tensor] = {}
        return self.nclip_terms(features, terms), terms


class XClipObjective(NClipObjective):
    """xCLIP: ``clip_weight * clip + nclip_weight * nclip`` (`xclip_loss`); the terms of CLIP and of nCLIP."""

    name = "xclip"
    trains_logit_scale = True

    def __init__(self, clip: ClipLoss, nclip: NClipLoss, clip_weight: float = 1.0, nclip_weight: float = 1.0) -> None:
        super().__init__(nclip, clip.logit_scale_max)
        self.clip = clip
        self.clip_weight = clip_weight
        self.nclip_weight = nclip_weight

    def extra_repr(self) -> str:
        return f"clip_weight={self.clip_weight}, nclip_weight={self.nclip_weight}"

    def loss_and_terms(self, features: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        clip = self.clip(features.image_embeds, features.text_embeds, features.logit_scale)
        terms = {"clip": clip}
        nclip = self.nclip_terms(features, terms)
        return xclip_loss(clip, nclip, self.clip_weight, self.nclip_weight), terms


def build_objective(config: MSClipConfig) -> MSClipObjective:
    """The objective of ``config.objective`` (its ``loss``: clip, siglip, nclip or xclip, and their settings), with
    the cap ``config.logit_scale_max`` on the temperature.

    Raises:
        ValueError: naming an unknown loss.
    """
    objective, scale_max = config.objective_config, config.logit_scale_max
    if objective.loss == "clip":
        return ClipObjective(ClipLoss(objective.local_loss, objective.gather_with_grad, scale_max))
    if objective.loss == "siglip":
        return SigLipObjective(SigLipLoss(scale_max))
    if objective.loss == "nclip":
        return NClipObjective(_nclip_loss(objective), scale_max)
    if objective.loss == "xclip":
        return XClipObjective(
            ClipLoss(objective.local_loss, objective.gather_with_grad, scale_max),
            _nclip_loss(objective),
            objective.clip_weight,
            objective.nclip_weight,
        )
    raise ValueError(f"unknown objective loss {objective.loss!r}; expected clip, siglip, nclip or xclip")


def _nclip_loss(objective: MSClipObjectiveConfig) -> NClipLoss:
    return NClipLoss(
        num_prototypes=objective.nclip_num_prototypes,
        student_temp=objective.nclip_student_temperature,
        teacher_temp=objective.nclip_teacher_temperature,
        stop_grad_targets=objective.nclip_stop_grad_targets,
        center_momentum=objective.nclip_center_momentum,
        lambda_sharp=objective.nclip_lambda_sharp,
        lambda_smooth=objective.nclip_lambda_smooth,
    )


# --------------------------------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------------------------------

FINITE_LOSS_POLICIES = ("raise", "skip")


def check_finite_loss(loss: torch.Tensor | Mapping[str, torch.Tensor], policy: str = "raise") -> bool:
    """Check that a loss (or every term of a dict of loss terms) is finite, with the same verdict on every rank.

    The verdict is all-reduced so that all ranks raise or skip together: a rank that skips ``backward`` while the
    others run it would hang DDP's gradient all-reduce. This synchronises with the device once per call.

    Args:
        loss: a scalar tensor, or a mapping ``name -> tensor`` (e.g. ``{"clip": ..., "nclip_pred": ...}``).
        policy: ``"raise"`` raises ``FloatingPointError`` naming the non-finite terms; ``"skip"`` returns ``False``
            so that the caller skips ``backward`` and the optimizer step on every rank (never zero a NaN loss by
            multiplying it: ``nan * 0`` is still nan).

    Returns:
        ``True`` when every term is finite on every rank; ``False`` (only with ``policy="skip"``) otherwise.
    """
    if policy not in FINITE_LOSS_POLICIES:
        raise ValueError(f"unknown non-finite loss policy {policy!r}; expected one of {FINITE_LOSS_POLICIES}")
    terms = dict(loss) if isinstance(loss, Mapping) else {"loss": loss}
    if not terms:
        raise ValueError("check_finite_loss got an empty mapping of loss terms")
    bad = [name for name, value in terms.items() if not bool(torch.isfinite(value.detach()).all())]
    device = next(iter(terms.values())).device
    bad_ranks = _all_reduce_sum_no_grad(torch.tensor([float(bool(bad))], device=device))
    if bad_ranks.item() == 0:
        return True
    if policy == "skip":
        return False
    where = f"non-finite loss term(s) {bad} on this rank" if bad else "a non-finite loss term on another rank"
    raise FloatingPointError(f"{where} ({int(bad_ranks.item())} rank(s) affected)")
