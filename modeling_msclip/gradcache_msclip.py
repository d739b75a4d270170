"""Gradient caching for contrastive training: a batch k times larger than fits, with exactly its gradients.

Plain gradient accumulation sums k micro-batch losses, so each image only sees the texts of its own micro-batch as
negatives. Gradient caching (GradCache, Gao et al. 2021; open_clip's ``--accum-freq``) instead trains on the loss of
the *whole* accumulated batch:

1. embed every micro-batch without autograd and keep the embeddings (cheap: ``[N, D]`` floats);
2. compute the contrastive loss of all N pairs on those cached embeddings, as leaf tensors, and get
   ``dL/d image_embeds``, ``dL/d text_embeds`` and the gradients of the loss's own parameters (``logit_scale``, the
   SigLIP bias);
3. re-embed each micro-batch *with* autograd and back-propagate the slice of the cached embedding gradient that
   belongs to it (``sum(embeds * grad)`` as a surrogate, whose gradient with respect to every parameter is the chain
   rule term of that micro-batch).

Summed over the micro-batches, step 3 accumulates into ``.grad`` exactly dL/dθ of the full batch, while activation
memory is that of one micro-batch. The price is a second forward of every micro-batch (~1/3 more compute).

Exactness conditions, and what this module does about them:

* **Dropout / any randomness**: the re-forward must draw the same random numbers as the cached forward. The torch
  RNG state (CPU and every CUDA device) is saved before each micro-batch's first forward and restored before its
  re-forward; afterwards the RNG is left where the first pass left it.
* **BatchNorm in train mode** (MS-CLIP-S: conv stem, parallel branch, lateral adapters) normalises with the
  statistics of the batch it sees, i.e. of one micro-batch. The result is therefore the exact gradient of the full
  loss *with each micro-batch normalised by its own statistics* - the same model function as plain accumulation,
  not the one of a single N-sized forward. Running statistics are snapshotted before the first pass and restored
  after it, so each micro-batch updates them exactly once (as plain accumulation would). With BatchNorm in eval mode
  (or models without BatchNorm: the CLIP / MS-CLIP presets) the gradients equal the full-batch ones.
* **Distributed**: the loss may gather across ranks (``ClipLoss(local_loss=True, gather_with_grad=True)``); every
  rank runs step 2 together, and the autograd all-gather routes the negatives' gradients to their owners. Under
  `DistributedDataParallel` all re-forwards but the last run in ``no_sync()``, so gradients are reduced once.
* **Loss parameters** (``logit_scale``) are read from the model's forward output, never from the module outside its
  forward (ZeRO-3 only materialises them there). Their gradient is injected through the *last* re-forward, whose
  output carries the parameter, so it reaches ``.grad`` inside a synchronised backward (DDP's reducer sees it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "ContrastiveEmbeddings",
    "GradCacheOutput",
    "embed_with_model_forward",
    "gradcache_backward",
    "split_batch",
]


@dataclass
class ContrastiveEmbeddings:
    """What the loss needs from one micro-batch.

    Attributes:
        image_embeds: ``[b, D]`` L2-normalised image embeddings.
        text_embeds: ``[b, D]`` L2-normalised text embeddings, row i paired with image row i.
        loss_params: Tensors passed to the loss after the embeddings (``(logit_scale,)`` for `ClipLoss`,
            ``(logit_scale, logit_bias)`` for `SigLipLoss`), as returned by the model's forward.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    loss_params: tuple[torch.Tensor, ...]


@dataclass
class GradCacheOutput:
    """Result of `gradcache_backward` (all tensors detached).

    Attributes:
        loss: The loss of the full accumulated batch (this rank's share when the loss is distributed).
        image_embeds: ``[N, D]`` cached image embeddings of all micro-batches, in order.
        text_embeds: ``[N, D]`` cached text embeddings.
        loss_params: The loss parameters used (e.g. ``logit_scale``).
    """

    loss: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    loss_params: tuple[torch.Tensor, ...]


def embed_with_model_forward(model: nn.Module, micro_batch: Mapping[str, Any]) -> ContrastiveEmbeddings:
    """Default embedding function: ``model(**micro_batch, return_loss=False)``.

    Works with `MSClipModel`, `MSClipForPreTraining` (whose output also carries the SigLIP ``logit_bias``) and either
    wrapped in `DistributedDataParallel`: going through the module's ``forward`` keeps DDP's and ZeRO-3's hooks
    working. The output must have ``image_embeds``, ``text_embeds`` and ``logit_scale``.
    """
    output = model(**micro_batch, return_loss=False)
    missing = [name for name in ("image_embeds", "text_embeds", "logit_scale") if getattr(output, name, None) is None]
    if missing:
        raise ValueError(
            f"the model output has no {missing}; pass embed_fn= returning ContrastiveEmbeddings for this model"
        )
    loss_params = (output.logit_scale,)
    logit_bias = getattr(output, "logit_bias", None)
    if logit_bias is not None:
        loss_params += (logit_bias,)
    return ContrastiveEmbeddings(output.image_embeds, output.text_embeds, loss_params)


def split_batch(batch: Mapping[str, torch.Tensor], num_micro_batches: int) -> list[dict[str, torch.Tensor]]:
    """Split every tensor of ``batch`` along dim 0 into ``num_micro_batches`` equal micro-batches.

    Raises:
        ValueError: when the tensors disagree on the batch size or it is not a multiple of ``num_micro_batches``.
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be at least 1, got {num_micro_batches}")
    sizes = {key: value.shape[0] for key, value in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all tensors of the batch need the same first dimension, got {sizes}")
    batch_size = next(iter(sizes.values()))
    if batch_size % num_micro_batches:
        raise ValueError(f"batch size {batch_size} is not divisible into {num_micro_batches} equal micro-batches")
    chunk = batch_size // num_micro_batches
    return [
        {key: value[start : start + chunk] for key, value in batch.items()} for start in range(0, batch_size, chunk)
    ]


# --------------------------------------------------------------------------------------------------------------------
# State that the re-forward must reproduce or must not repeat
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _RngState:
    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None


def _capture_rng() -> _RngState:
    # Only touch CUDA when it is already in use: initialising it here would be a side effect on CPU runs.
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return _RngState(torch.get_rng_state(), cuda)


def _restore_rng(state: _RngState) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state_all(state.cuda)


def _batch_norm_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [
        buffer
        for module in model.modules()
        if isinstance(module, _BatchNorm) and module.training and module.track_running_stats
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]


@contextlib.contextmanager
def _running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Undo the running-statistics updates of train-mode BatchNorms made inside the block."""
    buffers = _batch_norm_buffers(model)
    saved = [buffer.detach().clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def _sync_context(model: nn.Module, is_last: bool) -> contextlib.AbstractContextManager:
    # DDP reduces gradients in every backward unless told otherwise; reduce once, after the last micro-batch.
    if isinstance(model, DistributedDataParallel) and not is_last:
        return model.no_sync()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------------


def gradcache_backward(
    model: nn.Module,
    micro_batches: Sequence[Mapping[str, Any]],
    loss_fn: Callable[..., torch.Tensor],
    embed_fn: Callable[[nn.Module, Mapping[str, Any]], ContrastiveEmbeddings] = embed_with_model_forward,
    backward_fn: Callable[[torch.Tensor], None] | None = None,
) -> GradCacheOutput:
    """Accumulate into ``.grad`` the gradient of the contrastive loss of all micro-batches taken together.

    After the call, every parameter's ``.grad`` has been increased by exactly what ``loss_fn`` on the concatenated
    batch followed by ``backward()`` would add (BatchNorm in train mode aside: see the module docstring), while only
    one micro-batch's activations were alive at a time. Call ``optimizer.step()`` afterwards as usual.

    Args:
        model: The model (possibly `DistributedDataParallel`-wrapped) that ``embed_fn`` runs.
        micro_batches: The k micro-batches, e.g. ``split_batch(batch, k)``; each is passed to ``embed_fn``.
        loss_fn: Called as ``loss_fn(image_embeds, text_embeds, *loss_params)`` on the ``[N, D]`` concatenation:
            the ``pair_loss`` of an objective whose ``supports_gradient_caching`` is true (``model.objective`` of an
            `MSClipForPreTraining`, what the trainer passes), or a `ClipLoss` or `SigLipLoss` (distributed modes
            included: all ranks call this together).
        embed_fn: ``embed_fn(model, micro_batch) -> ContrastiveEmbeddings``; the default calls the model's forward.
        backward_fn: Runs the backward of a scalar surrogate (default ``tensor.backward()``); pass e.g.
            ``lambda t: scaler.scale(t).backward()`` for fp16 loss scaling or ``accelerator.backward``.

    Returns:
        `GradCacheOutput` with the (detached) full-batch loss and the cached embeddings.
    """
    if len(micro_batches) == 0:
        raise ValueError("gradcache_backward needs at least one micro-batch")
    backward_fn = backward_fn if backward_fn is not None else torch.Tensor.backward

    # Pass 1: embeddings of every micro-batch, no activations kept.
    rng_states: list[_RngState] = []
    cached: list[ContrastiveEmbeddings] = []
    with _running_stats_frozen(model), torch.no_grad():
        for micro_batch in micro_batches:
            rng_states.append(_capture_rng())
            cached.append(embed_fn(model, micro_batch))
    rng_after_first_pass = _capture_rng()
    _check_consistent(cached)

    # The full-batch loss on cached leaves: its gradients with respect to the embeddings and the loss parameters.
    image_embeds = torch.cat([c.image_embeds for c in cached]).detach().requires_grad_(True)
    text_embeds = torch.cat([c.text_embeds for c in cached]).detach().requires_grad_(True)
    # Under no_grad a forward that derives its loss parameters (instead of returning the Parameter) hands back
    # tensors without requires_grad, so every loss parameter becomes a leaf that does.
    loss_params = tuple(p.detach().clone().requires_grad_(True) for p in cached[-1].loss_params)
    with torch.enable_grad():
        loss = loss_fn(image_embeds, text_embeds, *loss_params)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    grads = torch.autograd.grad(loss, [image_embeds, text_embeds, *loss_params], allow_unused=True)
    image_grad = grads[0] if grads[0] is not None else torch.zeros_like(image_embeds)
    text_grad = grads[1] if grads[1] is not None else torch.zeros_like(text_embeds)
    loss_param_grads = grads[2:]

    # Pass 2: re-embed each micro-batch with autograd and push its slice of the cached gradient through it.
    offsets = [0]
    for c in cached:
        offsets.append(offsets[-1] + c.image_embeds.shape[0])
    try:
        for index, micro_batch in enumerate(micro_batches):
            is_last = index == len(micro_batches) - 1
            rows = slice(offsets[index], offsets[index + 1])
            _restore_rng(rng_states[index])
            with _sync_context(model, is_last), torch.enable_grad():
                embeds = embed_fn(model, micro_batch)
                surrogate = _dot(embeds.image_embeds, image_grad[rows]) + _dot(embeds.text_embeds, text_grad[rows])
                if is_last:
                    for param, grad in zip(embeds.loss_params, loss_param_grads, strict=True):
                        if grad is not None and param.requires_grad:
                            surrogate = surrogate + _dot(param, grad)
                backward_fn(surrogate)
    finally:
        _restore_rng(rng_after_first_pass)

    return GradCacheOutput(
        loss=loss.detach(),
        image_embeds=image_embeds.detach(),
        text_embeds=text_embeds.detach(),
        loss_params=tuple(p.detach() for p in loss_params),
    )


def _dot(tensor: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``sum(tensor * grad)`` in at least fp32: its gradient with respect to ``tensor`` is exactly ``grad``."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    return (tensor.to(dtype) * grad.to(device=tensor.device, dtype=dtype)).sum()


def _check_consistent(cached: list[ContrastiveEmbeddings]) -> None:
    for index, c in enumerate(cached):
        if c.image_embeds.dim() != 2 or c.image_embeds.shape != c.text_embeds.shape:
            raise ValueError(
                f"micro-batch {index}: image and text embeddings must both be [batch, dim] with the same shape, got "
                f"{tuple(c.image_embeds.shape)} and {tuple(c.text_embeds.shape)}"
            )
        if len(c.loss_params) != len(cached[0].loss_params):
            raise ValueError(f"micro-batch {index} returned a different number of loss parameters")
