"""Gradient caching must reproduce the loss and every parameter gradient of one full-batch step.

References are computed here the plain way (one forward of the concatenated batch, the same loss, ``backward``) on an
identical copy of the model; gradcache runs on k micro-batches of the same pairs.
"""

import copy
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close_to_scale, free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modeling_msclip import MSClipConfig, MSClipForPreTraining, MSClipModel
from modeling_msclip.gradcache_msclip import gradcache_backward, split_batch
from modeling_msclip.loss_msclip import ClipLoss

TOLERANCE = 1e-5
BATCH = 8
START_ID, END_ID = 49406, 49407
SPAWN_TIMEOUT_S = 180


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine threads that spin-wait for a busy neighbour's
    core slow each step several-fold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_model(preset: str, seed: int = 0, **overrides) -> MSClipModel:
    torch.manual_seed(seed)
    config = MSClipConfig.from_preset(preset, **overrides)
    return MSClipModel._from_config(config, attn_implementation="sdpa").train()


def make_batch(config: MSClipConfig, batch_size: int = BATCH, seed: int = 1) -> dict[str, torch.Tensor]:
    """Captions of different lengths, right-padded with 0 (as the MS-CLIP tokenizer pads), and random images."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (batch_size,), generator=generator)
    input_ids = torch.zeros(batch_size, int(lengths.max()), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths.tolist()):
        body = torch.randint(1, START_ID, (length - 2,), generator=generator)
        input_ids[row, :length] = torch.cat([torch.tensor([START_ID]), body, torch.tensor([END_ID])])
        attention_mask[row, :length] = 1
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def full_batch_step(model: nn.Module, batch: dict, loss_fn: nn.Module) -> torch.Tensor:
    output = model(**batch)
    loss = loss_fn(output.image_embeds, output.text_embeds, output.logit_scale)
    loss.backward()
    return loss.detach()


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(actual: nn.Module, expected: nn.Module, what: str) -> None:
    actual_grads, expected_grads = gradients(actual), gradients(expected)
    assert actual_grads.keys() == expected_grads.keys() == {n for n, p in expected.named_parameters()}
    for name, grad in actual_grads.items():
        assert_close_to_scale(grad, expected_grads[name], TOLERANCE, f"{what} {name}")


def set_batch_norm_eval(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
            count += 1
    return count


@pytest.mark.parametrize("num_micro_batches", [2, 4])
@pytest.mark.parametrize("preset", ["clip-tiny", "msclip-tiny", "msclip-s-tiny"])
def test_gradcache_equals_full_batch(preset, num_micro_batches):
    reference = build_model(preset)
    if preset == "msclip-s-tiny":
        # Train-mode BatchNorm normalises per micro-batch; with frozen statistics the function is batch-independent.
        assert set_batch_norm_eval(reference) > 0
    model = copy.deepcopy(reference)
    batch = make_batch(reference.config)
    loss_fn = ClipLoss()

    expected_loss = full_batch_step(reference, batch, loss_fn)
    result = gradcache_backward(model, split_batch(batch, num_micro_batches), loss_fn)

    assert_close_to_scale(result.loss, expected_loss, TOLERANCE, "loss")
    assert result.image_embeds.shape == (BATCH, reference.config.projection_dim)
    assert_same_gradients(model, reference, f"{preset} k={num_micro_batches}")
    assert reference.logit_scale.grad.abs().item() > 0


def test_gradcache_accumulates_onto_existing_gradients():
    reference = build_model("clip-tiny")
    model = copy.deepcopy(reference)
    batch = make_batch(reference.config)
    full_batch_step(reference, batch, ClipLoss())
    full_batch_step(reference, batch, ClipLoss())
    for _ in range(2):
        gradcache_backward(model, split_batch(batch, 2), ClipLoss())
    assert_same_gradients(model, reference, "two accumulated steps")


DROPOUTS = {
    "attention": {"text_config": {"attention_dropout": 0.3}, "vision_config": {"attention_dropout": 0.3}},
    # 64 px / 16 px patches: 16 patches, of which each image keeps 8.
    "patch": {"vision_config": {"image_size": 64, "patch_size": 16, "patch_dropout": 0.5}},
}


@pytest.mark.parametrize("dropout", sorted(DROPOUTS))
def test_dropout_masks_are_replayed_in_the_second_pass(dropout):
    # Reference: the micro-batches embedded one after the other with autograd (the same random draws as gradcache's
    # first pass), the full loss on the concatenation, one backward.
    reference = build_model("msclip-tiny", **DROPOUTS[dropout])
    model = copy.deepcopy(reference)
    micro_batches = split_batch(make_batch(reference.config), 4)
    torch.manual_seed(123)
    outputs = [reference(**micro_batch) for micro_batch in micro_batches]
    expected_loss = ClipLoss()(
        torch.cat([o.image_embeds for o in outputs]), torch.cat([o.text_embeds for o in outputs]), reference.logit_scale
    )
    expected_loss.backward()
    rng_after_reference = torch.get_rng_state()

    torch.manual_seed(123)
    result = gradcache_backward(model, micro_batches, ClipLoss())

    assert_close_to_scale(result.loss, expected_loss, TOLERANCE, "loss")
    assert_same_gradients(model, reference, f"{dropout} dropout")
    # The RNG ends where the single forward pass left it, whatever the replay did.
    assert torch.equal(torch.get_rng_state(), rng_after_reference)
    # The dropout is real: a different seed changes the embeddings.
    embeds = "image_embeds" if dropout == "patch" else "text_embeds"
    with torch.no_grad():
        torch.manual_seed(7)
        other = getattr(model(**micro_batches[0]), embeds)
    assert (other - getattr(result, embeds)[: other.shape[0]]).abs().max() > 1e-3


def test_train_mode_batch_norm_uses_micro_batch_statistics_and_updates_them_once():
    reference = build_model("msclip-s-tiny")
    model = copy.deepcopy(reference)
    full_batch_model = copy.deepcopy(reference)
    batch = make_batch(reference.config)
    micro_batches = split_batch(batch, 2)

    outputs = [reference(**micro_batch) for micro_batch in micro_batches]
    expected_loss = ClipLoss()(
        torch.cat([o.image_embeds for o in outputs]), torch.cat([o.text_embeds for o in outputs]), reference.logit_scale
    )
    expected_loss.backward()
    result = gradcache_backward(model, micro_batches, ClipLoss())

    assert_close_to_scale(result.loss, expected_loss, TOLERANCE, "loss")
    assert_same_gradients(model, reference, "train-mode BN")
    reference_buffers = dict(reference.named_buffers())
    for name, buffer in model.named_buffers():
        if "running" in name or "num_batches_tracked" in name:
            assert_close_to_scale(buffer, reference_buffers[name], 1e-7, name)
    stem_bn = model.vision_model.embeddings.patch_embedding.first_conv[1]
    assert stem_bn.num_batches_tracked.item() == len(micro_batches)
    # ... which is not the full-batch function: one forward over all 8 images normalises with other statistics.
    full_batch_step(full_batch_model, batch, ClipLoss())
    difference = (full_batch_model.logit_scale.grad - model.logit_scale.grad).abs().item()
    assert difference > 1e-6


def test_pretraining_model_with_siglip_bias_gets_every_gradient():
    torch.manual_seed(0)
    config = MSClipConfig.from_preset("msclip-tiny", objective={"loss": "siglip"})
    reference = MSClipForPreTraining._from_config(config, attn_implementation="sdpa").train()
    model = copy.deepcopy(reference)
    batch = make_batch(config)

    expected_loss = reference(**batch).loss
    expected_loss.backward()
    result = gradcache_backward(model, split_batch(batch, 4), model.objective.pair_loss)

    assert_close_to_scale(result.loss, expected_loss, TOLERANCE, "loss")
    assert len(result.loss_params) == 2
    assert reference.logit_bias.grad.abs().item() > 0
    assert_same_gradients(model, reference, "siglip")


def test_bad_inputs_are_refused_with_a_clear_error():
    model = build_model("clip-tiny")
    batch = make_batch(model.config)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        gradcache_backward(model, [], ClipLoss())
    with pytest.raises(ValueError, match="not divisible"):
        split_batch(batch, 3)
    with pytest.raises(ValueError, match="same first dimension"):
        split_batch({**batch, "pixel_values": batch["pixel_values"][:4]}, 2)
    with pytest.raises(ValueError, match="scalar"):
        gradcache_backward(model, split_batch(batch, 2), lambda image, text, scale: image.sum(0))


# --------------------------------------------------------------------------------------------------------------------
# Two real gloo processes: each rank caches its own micro-batches, the loss gathers across ranks
# --------------------------------------------------------------------------------------------------------------------

WORLD_SIZE = 2
DISTRIBUTED_PRESET = "msclip-tiny"


def _rank_gradients(rank: int, use_ddp: bool) -> dict:
    model = build_model(DISTRIBUTED_PRESET)
    global_batch = make_batch(model.config, batch_size=BATCH)
    local = BATCH // WORLD_SIZE
    local_batch = {key: value[rank * local : (rank + 1) * local] for key, value in global_batch.items()}
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True)
    wrapped = DistributedDataParallel(model) if use_ddp else model
    result = gradcache_backward(wrapped, split_batch(local_batch, 2), loss_fn)
    if not use_ddp:
        # What DDP / DeepSpeed do after backward: average the gradients over ranks.
        for param in model.parameters():
            dist.all_reduce(param.grad)
            param.grad /= WORLD_SIZE
    return {"loss": result.loss.item(), "grads": gradients(model)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    try:
        results = {use_ddp: _rank_gradients(rank, use_ddp) for use_ddp in (False, True)}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gradcache_across_two_gloo_ranks_equals_single_process_full_batch(tmp_path):
    context = mp.start_processes(
        _worker, args=(free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"gloo workers did not finish within {SPAWN_TIMEOUT_S} s")
    rank_results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]

    reference = build_model(DISTRIBUTED_PRESET)
    expected_loss = full_batch_step(reference, make_batch(reference.config, batch_size=BATCH), ClipLoss()).item()
    expected_grads = gradients(reference)
    for use_ddp in (False, True):
        losses = [results[use_ddp]["loss"] for results in rank_results]
        # Local loss: each rank returns its own rows' share; their mean is the global loss.
        assert sum(losses) / WORLD_SIZE == pytest.approx(expected_loss, rel=TOLERANCE, abs=TOLERANCE)
        assert abs(losses[0] - losses[1]) > 1e-4
        for rank, results in enumerate(rank_results):
            grads = results[use_ddp]["grads"]
            assert grads.keys() == expected_grads.keys()
            for name, grad in grads.items():
                assert_close_to_scale(grad, expected_grads[name], TOLERANCE, f"rank {rank} ddp={use_ddp} {name}")
