"""MSClipTrainer in one process: optimizer groups, non-finite losses, logit_scale clamp, global BatchNorm,
per-sample augmentation seeds."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close_to_scale
from transformers import TrainerCallback

from modeling_msclip import MSClipConfig, MSClipForPreTraining
from modeling_msclip.modeling_msclip import MSClipBatchNorm2d
from modeling_msclip.trainer_msclip import (
    MSClipTrainer,
    MSClipTrainingArguments,
    build_parameter_groups,
    is_no_decay_parameter,
)


class PairDataset(torch.utils.data.Dataset):
    """Random token/pixel pairs; ``nan_every`` puts NaN pixels into every n-th item."""

    def __init__(self, size: int, nan_items: set[int] = frozenset()) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = []
        for index in range(size):
            ids = torch.zeros(8, dtype=torch.long)
            ids[0], ids[1:6], ids[6] = 49406, torch.randint(1, 49405, (5,), generator=generator), 49407
            pixels = torch.randn(3, 64, 64, generator=generator)
            if index in nan_items:
                pixels[0, 0, 0] = float("nan")
            self.items.append({"input_ids": ids, "pixel_values": pixels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def tiny_model(preset: str = "msclip-tiny", **objective) -> MSClipForPreTraining:
    torch.manual_seed(0)
    return MSClipForPreTraining(MSClipConfig.from_preset(preset, objective=objective or None))


def trainer_for(model, dataset, tmp_path, **arguments) -> MSClipTrainer:
    defaults = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "use_cpu": True,
    }
    args = MSClipTrainingArguments(**{**defaults, **arguments})
    return MSClipTrainer(model=model, args=args, train_dataset=dataset)


def test_parameter_groups_separate_shared_and_no_decay_parameters(tmp_path):
    model = tiny_model("msclip-s-tiny")
    trainer = trainer_for(
        model, PairDataset(4), tmp_path, weight_decay=0.05, learning_rate_shared=3e-4, weight_decay_shared=0.2
    )
    optimizer = trainer.create_optimizer()
    named = dict(model.named_parameters())
    group_of = {}
    for group, reference in zip(
        optimizer.param_groups, build_parameter_groups(model, 1e-3, 0.05, 3e-4, 0.2), strict=True
    ):
        assert group["lr"] == reference["lr"] and group["weight_decay"] == reference["weight_decay"]
        for parameter in group["params"]:
            assert id(parameter) not in group_of, "a parameter is in two groups"
            group_of[id(parameter)] = reference["name"]
    assert set(group_of) == {id(p) for p in named.values()}, "every parameter must be in exactly one group"
    for name, parameter in named.items():
        shared = ".shared." in name
        no_decay = parameter.ndim < 2 or "embedding" in name and "patch_embedding" not in name
        expected = f"{'shared' if shared else 'specific'}_{'no_decay' if no_decay else 'decay'}"
        assert group_of[id(parameter)] == expected, name
    by_name = {group["name"]: group for group in build_parameter_groups(model, 1e-3, 0.05, 3e-4, 0.2)}
    assert by_name["shared_decay"]["lr"] == 3e-4 and by_name["shared_decay"]["weight_decay"] == 0.2
    assert by_name["shared_no_decay"]["weight_decay"] == 0.0 and by_name["specific_decay"]["weight_decay"] == 0.05
    for name in (
        "msclip.logit_scale",
        "msclip.text_model.embeddings.token_embedding.weight",
        "msclip.vision_model.embeddings.position_embedding",
        "msclip.encoder.layers.3.mlp.shared.fc1.bias",
    ):
        assert is_no_decay_parameter(name, named[name])
    assert sum(p.numel() for p in by_name["shared_decay"]["params"]) == sum(
        p.numel() for n, p in named.items() if ".shared." in n and p.ndim == 2
    )


def test_nonfinite_batches_skip_the_step_or_raise(tmp_path):
    clean = trainer_for(tiny_model(), PairDataset(8), tmp_path / "clean", max_steps=2)
    before = {k: v.clone() for k, v in clean.model.state_dict().items()}
    clean.train()
    assert any(not torch.equal(before[k], v) for k, v in clean.model.state_dict().items())

    poisoned = trainer_for(tiny_model(), PairDataset(8, nan_items=set(range(8))), tmp_path / "nan", max_steps=2)
    before = {k: v.clone() for k, v in poisoned.model.state_dict().items()}
    poisoned.train()
    assert poisoned.skipped_nonfinite_steps == 2
    for key, value in poisoned.model.state_dict().items():
        assert torch.equal(before[key], value), f"{key} changed during a skipped step"
    assert all(not state for state in poisoned.optimizer.state.values()), "AdamW moments must stay untouched"
    logged = [entry for entry in poisoned.state.log_history if "skipped_nonfinite_steps" in entry]
    assert logged[-1]["skipped_nonfinite_steps"] == 2

    strict = trainer_for(
        tiny_model(),
        PairDataset(8, nan_items={0, 1, 2, 3, 4, 5, 6, 7}),
        tmp_path / "raise",
        max_steps=2,
        nonfinite_loss="raise",
    )
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        strict.train()


def test_logit_scale_is_clamped_after_each_step(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.msclip.logit_scale.fill_(math.log(400.0))
    trainer = trainer_for(model, PairDataset(8), tmp_path, max_steps=1)
    trainer.train()
    assert model.msclip.logit_scale.item() <= math.log(100.0) + 1e-6
    logged = [entry["logit_scale_exp"] for entry in trainer.state.log_history if "logit_scale_exp" in entry]
    assert logged[0] == pytest.approx(100.0), "the loss must use exp(logit_scale) capped at 100"


def test_loss_terms_are_logged_for_xclip(tmp_path):
    model = tiny_model(loss="xclip", nclip_num_prototypes=32, nclip_hidden_dim=32, nclip_bottleneck_dim=16)
    trainer = trainer_for(model, PairDataset(8), tmp_path, max_steps=2)
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    for key in ("clip", "nclip", "pred", "smooth", "batch_entropy_image", "sample_entropy_text", "logit_scale_exp"):
        assert key in entry and math.isfinite(entry[key]), key
    assert_close_to_scale(entry["loss"], entry["clip"] + entry["nclip"], 1e-5, "logged loss vs clip + nclip")
    assert 0 <= entry["batch_entropy_image"] <= math.log(32) + 1e-6


def _global_batch_norm_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    features, weights = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    norm = MSClipBatchNorm2d(4)
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    torch.nn.init.normal_(norm.bias)
    local = features[4 * rank : 4 * rank + 4].clone().requires_grad_()
    output = norm(local)
    (output * weights[4 * rank : 4 * rank + 4]).sum().backward()
    weight_grad = norm.weight.grad.clone()
    dist.all_reduce(weight_grad)
    tensors = (output.detach(), local.grad, weight_grad, norm.running_mean, norm.running_var)
    queue.put((rank, *(tensor.numpy().copy() for tensor in tensors)))
    dist.destroy_process_group()


@pytest.mark.slow
def test_global_batch_norm_on_two_ranks_equals_one_process():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_global_batch_norm_worker, args=(port, queue), nprocs=2, start_method="spawn")
    results = sorted((queue.get() for _ in range(2)), key=lambda result: result[0])
    results = [(rank, *(torch.from_numpy(array) for array in arrays)) for rank, *arrays in results]

    torch.manual_seed(0)
    features, weights = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    reference = torch.nn.BatchNorm2d(4)
    torch.nn.init.uniform_(reference.weight, 0.5, 1.5)
    torch.nn.init.normal_(reference.bias)
    features.requires_grad_()
    output = reference(features)
    (output * weights).sum().backward()
    for rank, local_output, local_grad, weight_grad, running_mean, running_var in results:
        rows = slice(4 * rank, 4 * rank + 4)
        assert_close_to_scale(local_output, output[rows], 1e-5, f"rank {rank} output")
        assert_close_to_scale(local_grad, features.grad[rows], 1e-5, f"rank {rank} input gradient")
        assert_close_to_scale(weight_grad, reference.weight.grad, 1e-5, f"rank {rank} summed weight gradient")
        assert_close_to_scale(running_mean, reference.running_mean, 1e-6, f"rank {rank} running mean")
        assert_close_to_scale(running_var, reference.running_var, 1e-6, f"rank {rank} running variance")


def test_per_sample_augmentation_does_not_depend_on_batching(msclip_tokenizer_dir):
    from PIL import Image

    from modeling_msclip.collators_msclip import ImageTextCollator
    from modeling_msclip.tokenization_msclip import MSClipTokenizer
    from modeling_msclip.transforms_msclip import TrainImageTransform

    tokenizer = MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)
    transform = TrainImageTransform(32, mean=(0.5,) * 3, std=(0.5,) * 3, scale=(0.3, 1.0))
    images = [Image.fromarray(torch.randint(0, 255, (48, 48, 3), dtype=torch.uint8).numpy()) for _ in range(4)]
    records = [{"image": image, "text": f"caption {i}", "__index__": i} for i, image in enumerate(images)]
    collator = ImageTextCollator(tokenizer, transform, augmentation_seed=7)
    together = collator(records)["pixel_values"]
    apart = torch.cat([collator(records[i : i + 1])["pixel_values"] for i in (3, 0, 2, 1)])[[1, 3, 2, 0]]
    assert torch.equal(together, apart), "a sample's augmentation must not depend on its batch or order"
    collator.epoch = 1
    assert not torch.equal(collator(records)["pixel_values"], together), "epochs must draw new augmentations"
    state = torch.get_rng_state()
    collator(records)
    assert torch.equal(state, torch.get_rng_state()), "seeded augmentation must not consume the training RNG"


class GradientRecorder(TrainerCallback):
    """Keeps each step's gradients as the optimizer is about to see them."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("objective", ["clip", "siglip"])
def test_contrastive_micro_batches_give_the_full_batch_gradients(tmp_path, objective):
    recorded = []
    for micro_batches in (1, 4):
        recorder = GradientRecorder()
        trainer = trainer_for(
            tiny_model("clip-tiny", loss=objective),
            PairDataset(8),
            tmp_path / str(micro_batches),
            per_device_train_batch_size=8,
            max_steps=1,
            contrastive_micro_batches=micro_batches,
        )
        trainer.add_callback(recorder)
        trainer.train()
        recorded.append((recorder.steps[0], next(e for e in trainer.state.log_history if "loss" in e)))
    (full_grads, full_log), (cached_grads, cached_log) = recorded
    assert full_grads.keys() == cached_grads.keys()
    for name, grad in full_grads.items():
        assert_close_to_scale(cached_grads[name], grad, 1e-5, f"micro-batched grad of {name}")
    assert_close_to_scale(cached_log[objective], full_log[objective], 1e-5, f"micro-batched {objective} loss")
