"""`MSClipTrainer`: the transformers `Trainer` for MS-CLIP pre-training.

What it adds to the plain Trainer:

* optimizer parameter groups {shared, modality-specific} x {decay, no decay}, with their own learning rate and weight
  decay for the parameters both towers use (the official recipe has ``LR_SHARE`` / ``WD_SHARE``), and no decay on
  biases, norms, embeddings and ``logit_scale``;
* logging of every loss term, ``exp(logit_scale)`` and the nCLIP collapse diagnostics, averaged over the steps since
  the last log and over ranks;
* a defined policy for non-finite losses (raise, or skip the whole optimizer step) and the post-step clamp of
  ``logit_scale``;
* `configure_cpu_distributed_state`, the one place that makes multi-process runs (DDP and DeepSpeed) on CPU-only
  machines real multi-rank runs (see its docstring).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .checkpointing_msclip import OutputArguments
from .gradcache_msclip import gradcache_backward, split_batch
from .loss_msclip import FINITE_LOSS_POLICIES, check_finite_loss, clamp_logit_scale_
from .records_msclip import SAMPLE_KEYS, DataStats
from .streaming_msclip import RESUME_MARKER_KEY, STREAM_INFO_KEY, ImageTextStream, StreamMonitor, save_stream_state

NONFINITE_POLICIES = ("auto", *FINITE_LOSS_POLICIES)
# Batch entries for the trainer's bookkeeping, never passed to the model (evaluation batches keep them).
NON_MODEL_KEYS = frozenset({"return_loss", SAMPLE_KEYS, STREAM_INFO_KEY})


@dataclass
class MSClipTrainingArguments(TrainingArguments, OutputArguments):
    """`TrainingArguments` plus the MS-CLIP optimizer and robustness settings and ``--overwrite_output_dir``.

    The objective itself (CLIP / SigLIP / nCLIP / xCLIP and their knobs) is part of the model config
    (``MSClipConfig.objective``) so that checkpoints carry it.
    """

    learning_rate_shared: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the parameters shared by both towers (default: --learning_rate)."},
    )
    weight_decay_shared: float | None = field(
        default=None,
        metadata={"help": "Weight decay of the shared parameters (default: --weight_decay)."},
    )
    contrastive_micro_batches: int = field(
        default=1,
        metadata={
            "help": "Gradient caching: split each per-device batch into this many micro-batches whose "
            "activations are alive one at a time, while the contrastive loss still compares every "
            "pair of the whole batch (exact full-batch gradients; CLIP and SigLIP objectives)."
        },
    )
    nonfinite_loss: str = field(
        default="auto",
        metadata={
            "help": "On a NaN/inf loss: 'raise' stops with an error naming the term; 'skip' drops the whole "
            "optimizer step (no update, no momentum change) and counts it; 'auto' (default) is 'skip', "
            "and 'raise' under DeepSpeed, whose engine owns the optimizer step."
        },
    )

    expected_world_size: int | None = field(
        default=None,
        metadata={
            "help": "Number of processes this run must have over all machines (e.g. nodes x GPUs per node). The run "
            "stops at start-up when its process group is smaller or larger, instead of training on fewer ranks "
            "(as a DeepSpeed multi-node launch without a working hostfile or 'standard' launcher does)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expected_world_size is not None and self.expected_world_size < 1:
            raise ValueError(f"--expected_world_size must be >= 1, got {self.expected_world_size}")
        if self.nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(f"--nonfinite_loss must be one of {NONFINITE_POLICIES}, got {self.nonfinite_loss!r}")
        if self.contrastive_micro_batches < 1:
            raise ValueError(f"--contrastive_micro_batches must be >= 1, got {self.contrastive_micro_batches}")


def is_no_decay_parameter(name: str, parameter: nn.Parameter) -> bool:
    """Biases, norm weights, ``logit_scale`` (all 1-d) and embedding tables are not decayed."""
    return parameter.ndim < 2 or name.endswith(("position_embedding", "token_embedding.weight", "class_embedding"))


def is_shared_parameter(name: str) -> bool:
    """Parameters of a block component used by both towers (`MSClipModalityModules` key ``"shared"``)."""
    return ".shared." in f".{name}"


def build_parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    learning_rate_shared: float | None = None,
    weight_decay_shared: float | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into {shared, specific} x {decay, no decay} optimizer groups.

    Each group has a ``name`` key (for logging and tests); empty groups are left out.
    """
    shared_lr = learning_rate if learning_rate_shared is None else learning_rate_shared
    shared_wd = weight_decay if weight_decay_shared is None else weight_decay_shared
    settings = {
        "shared_decay": (shared_lr, shared_wd),
        "shared_no_decay": (shared_lr, 0.0),
        "specific_decay": (learning_rate, weight_decay),
        "specific_no_decay": (learning_rate, 0.0),
    }
    members: dict[str, list[nn.Parameter]] = {name: [] for name in settings}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        kind = "shared" if is_shared_parameter(name) else "specific"
        decay = "no_decay" if is_no_decay_parameter(name, parameter) else "decay"
        members[f"{kind}_{decay}"].append(parameter)
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in members.items()
        if params
    ]


class MSClipTrainer(Trainer):
    """`Trainer` for `MSClipForPreTraining` (see the module docstring for what it adds)."""

    # compute_loss returns the per-micro-batch mean: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        stream_monitor: StreamMonitor | None = None,
        seen_samples_log: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        """The `Trainer`'s arguments, plus ``stream_monitor`` when the train dataset is an `ImageTextStream` (it
        accounts for the consumed batches and saves the stream's position with each checkpoint), and
        ``seen_samples_log``, a file to which the key of every pair trained on is appended, in training order (from
        the batches' `SAMPLE_KEYS` or stream keys, so read-ahead batches that are never trained are not listed)."""
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, MSClipTrainingArguments):
            raise TypeError("MSClipTrainer needs MSClipTrainingArguments")
        bound_process_group_timeouts(timedelta(seconds=self.args.ddp_timeout))
        if isinstance(self.train_dataset, ImageTextStream) and stream_monitor is None:
            stream_monitor = StreamMonitor(self.train_dataset, DataStats())
        self.stream_monitor = stream_monitor
        self.seen_samples_log = Path(seen_samples_log) if seen_samples_log is not None else None
        if self.seen_samples_log is not None:
            self.seen_samples_log.parent.mkdir(parents=True, exist_ok=True)
        self._data_wait_seconds = 0.0
        self._samples_since_log = 0
        self._last_log_time: float | None = None
        self._throughput_step = 0
        self.nonfinite_policy = self.args.nonfinite_loss
        if self.nonfinite_policy == "auto":
            self.nonfinite_policy = "raise" if self.is_deepspeed_enabled else "skip"
        if self.nonfinite_policy == "skip" and self.is_deepspeed_enabled:
            raise ValueError(
                "--nonfinite_loss skip is not available under DeepSpeed, whose engine owns the "
                "optimizer step (fp16 loss scaling skips overflows itself); use raise or auto"
            )
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._skip_this_step = False
        self.skipped_nonfinite_steps = 0
        self.add_callback(_MSClipStepCallback(self))

    # ------------------------------------------------------------------ data

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The Trainer's loader, or for an `ImageTextStream` a loader that reads it as it is: the stream is already
        sharded by rank and batches itself, so accelerate must neither shard it again nor dispatch its batches."""
        if not isinstance(self.train_dataset, ImageTextStream):
            return super().get_train_dataloader()
        from accelerate.data_loader import prepare_data_loader

        stream = self.train_dataset
        if stream.num_workers != self.args.dataloader_num_workers:
            raise ValueError(
                f"the stream was built for {stream.num_workers} DataLoader workers, the run has "
                f"--dataloader_num_workers {self.args.dataloader_num_workers}"
            )
        if self.args.dataloader_persistent_workers:
            raise ValueError("--dataloader_persistent_workers cannot be used with a stream: each epoch starts new ones")
        options: dict[str, Any] = {"num_workers": self.args.dataloader_num_workers}
        if self.args.dataloader_num_workers > 0:
            options["prefetch_factor"] = self.args.dataloader_prefetch_factor
            options["multiprocessing_context"] = self.args.dataloader_multiprocessing_context
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, pin_memory=self.args.dataloader_pin_memory, **options
        )
        return prepare_data_loader(loader, device=self.args.device, num_processes=1, process_index=0)

    def num_examples(self, dataloader: torch.utils.data.DataLoader) -> int:
        """Pairs per epoch on this rank (a stream's length is in batches)."""
        if isinstance(self.train_dataset, ImageTextStream) and dataloader.dataset is self.train_dataset:
            return len(self.train_dataset) * self.train_dataset.batch_size
        return super().num_examples(dataloader)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list[Any], Any]:
        """The Trainer's prefetch of one optimizer step's batches, timed: the wait is logged as ``data_wait_s``."""
        start = time.perf_counter()
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        end = time.perf_counter()
        if self._last_log_time is None:  # the first fetch starts the workers: measure from its end
            self._last_log_time, self._throughput_step = end, self.state.global_step
        else:
            self._data_wait_seconds += end - start
        return batches, num_items

    def _consume_batch_info(self, inputs: dict[str, Any]) -> None:
        """Take the data bookkeeping out of a training batch: stream accounting and the seen-samples log."""
        if RESUME_MARKER_KEY in inputs:
            raise RuntimeError(
                "a resume marker of the data stream reached training: the Trainer skipped fewer batches than the "
                "stream's saved position (was the checkpoint made with other --gradient_accumulation_steps?)"
            )
        info = inputs.pop(STREAM_INFO_KEY, None)
        keys = inputs.pop(SAMPLE_KEYS, None)
        if info is not None:
            keys = info["keys"]
            if self.stream_monitor is not None:
                self.stream_monitor.consume(info)
        if self.seen_samples_log is not None and keys is not None:
            with open(self.seen_samples_log, "a") as handle:
                handle.write("".join(f"{key}\n" for key in keys))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, plus this rank's stream position (before the completion marker is written)."""
        super()._save_checkpoint(model, trial)
        if self.stream_monitor is not None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_stream_state(self.stream_monitor, folder, self.args.process_index)

    # ------------------------------------------------------------------ optimizer

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW-family optimizer (from ``--optim``) over `build_parameter_groups`."""
        if self.optimizer is None:
            model = model if model is not None else self.model
            groups = build_parameter_groups(
                model,
                self.args.learning_rate,
                self.args.weight_decay,
                self.args.learning_rate_shared,
                self.args.weight_decay_shared,
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            optimizer_kwargs.pop("weight_decay", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------ gradient caching

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """The Trainer's step, or with ``--contrastive_micro_batches k > 1`` a gradient-cached step over k
        micro-batches (`gradcache_msclip.gradcache_backward`)."""
        self._consume_batch_info(inputs)
        if "pixel_values" in inputs:
            self._samples_since_log += int(inputs["pixel_values"].shape[0])
        if self.args.contrastive_micro_batches == 1:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.is_deepspeed_enabled:
            raise ValueError("--contrastive_micro_batches is not available under DeepSpeed (its engine owns backward)")
        pretraining = self.accelerator.unwrap_model(model)
        objective = pretraining.objective
        if not objective.supports_gradient_caching:
            raise ValueError(
                f"--contrastive_micro_batches needs an objective of the pair embeddings alone (clip or siglip), not "
                f"{objective.name!r}"
            )
        model.train()
        inputs = self._prepare_inputs(inputs)
        batch = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values") if key in inputs}
        micro_batches = split_batch(batch, self.args.contrastive_micro_batches)
        steps = self.current_gradient_accumulation_steps
        with self.compute_loss_context_manager():
            cached = gradcache_backward(
                model, micro_batches, objective.pair_loss, backward_fn=lambda t: self.accelerator.backward(t / steps)
            )
        self._accept_loss(objective.pair_terms(cached.loss, *cached.loss_params))
        return cached.loss / steps

    # ------------------------------------------------------------------ loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Run the model's objective, record its terms, apply the non-finite policy."""
        inputs = {key: value for key, value in inputs.items() if key not in NON_MODEL_KEYS}
        outputs = model(**inputs, return_loss=True)
        loss = outputs.loss
        if model.training:
            self._accept_loss({"loss": loss.detach(), **(outputs.loss_terms or {})})
        return (loss, outputs) if return_outputs else loss

    def _accept_loss(self, terms: dict[str, torch.Tensor]) -> None:
        """Apply the non-finite policy (the same verdict on every rank); record the terms of a finite step."""
        if not check_finite_loss(terms, self.nonfinite_policy):
            self._skip_this_step = True
            return
        for key, value in terms.items():
            if key == "loss":
                continue
            self._term_sums[key] = self._term_sums.get(key, 0.0) + value.detach()
        self._term_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged loss terms (and the skipped-step count) to the training logs."""
        if "loss" in logs and self._term_count:
            keys = sorted(self._term_sums)
            stacked = torch.stack([torch.as_tensor(self._term_sums[k], dtype=torch.float32) for k in keys])
            stacked = stacked.to(self.args.device) / self._term_count
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(stacked)
                stacked /= dist.get_world_size()
            logs.update(dict(zip(keys, stacked.tolist(), strict=True)))
            self._term_sums, self._term_count = {}, 0
        if "loss" in logs:
            logs["skipped_nonfinite_steps"] = self.skipped_nonfinite_steps
            self._log_throughput(logs)
        super().log(logs, start_time)

    def _log_throughput(self, logs: dict[str, float]) -> None:
        """Per-step data wait and pairs/s per device since the last log (this rank's; measured from the end of the
        first fetch, so starting the workers is not counted)."""
        now = time.perf_counter()
        steps = self.state.global_step - self._throughput_step
        if self._last_log_time is not None and steps > 0:
            logs["data_wait_s"] = round(self._data_wait_seconds / steps, 6)
            logs["samples_per_second_per_device"] = round(self._samples_since_log / (now - self._last_log_time), 3)
        self._last_log_time, self._throughput_step = now, self.state.global_step
        self._data_wait_seconds, self._samples_since_log = 0.0, 0


class _MSClipStepCallback(TrainerCallback):
    """Drops the step of a non-finite batch and clamps ``logit_scale`` after each optimizer step."""

    def __init__(self, trainer: MSClipTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer._skip_this_step:
            # Gradients set to None make every optimizer skip the parameter: no update, no moment change.
            for parameter in self.trainer.model.parameters():
                parameter.grad = None
            self.trainer.skipped_nonfinite_steps += 1
            self.trainer._skip_this_step = False

    def on_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.is_deepspeed_enabled:
            return  # the engine keeps its own master weights; the loss's forward cap applies instead
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        msclip = getattr(model, "msclip", model)
        if hasattr(msclip, "logit_scale"):
            clamp_logit_scale_(msclip.logit_scale, msclip.config.logit_scale_max)


def bound_process_group_timeouts(timeout: timedelta) -> None:
    """Give every process group of this run, those that exist and those created later, the timeout ``timeout``.

    `torch.distributed.new_group` without a timeout falls back to torch's defaults (30 minutes for gloo, 10 for
    NCCL), not to the default group's: DeepSpeed creates its data-parallel group that way (a clone of the world
    group, in `deepspeed.utils.groups`), so with ``--ddp_timeout 20`` a ZeRO gradient reduction still waited 30
    minutes for a hung peer. Setting torch's defaults covers the groups DeepSpeed and others create when the model
    is prepared; the existing groups are set one by one. A no-op when `torch.distributed` is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if distributed_c10d.default_pg_nccl_timeout is not None:
        distributed_c10d.default_pg_nccl_timeout = timeout
    for group in list(distributed_c10d._world.pg_map):
        if not distributed_c10d._rank_not_in_group(group):
            distributed_c10d._set_pg_timeout(timeout, group)


def configure_cpu_distributed_state(uses_deepspeed: bool, timeout_seconds: int = 1800) -> dict[str, Any]:
    """Make a multi-process run on a machine without accelerators a real multi-rank run, with a bounded timeout.

    Returns `TrainingArguments` overrides (``{}`` with an accelerator or in a single process). Two cases, seen with
    transformers 5.23 / accelerate 1.15 / deepspeed 0.19 under ``torchrun`` or ``accelerate launch`` on CPU:

    * plain data parallel: without ``use_cpu`` accelerate's `PartialState` finds no device backend, records one
      process and each rank trains on the full data; ``use_cpu=True`` selects gloo and real sharding;
    * DeepSpeed: `TrainingArguments` does not hand a backend to `PartialState`; DeepSpeed still builds a process
      group of all ranks but the Trainer believes it is alone (``world_size 1`` on every rank).

    In both cases transformers would create the process group without ``--ddp_timeout`` (its CPU branch passes
    none), so a hung peer would block every rank forever. The gloo process group is therefore created here, with
    ``timeout_seconds``, and the Trainer is told to use it (``use_configured_state``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or torch.cuda.is_available():
        return {}
    from accelerate import PartialState

    if uses_deepspeed:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(cpu=not uses_deepspeed, backend="gloo", timeout=timedelta(seconds=timeout_seconds))
    overrides: dict[str, Any] = {"accelerator_config": {"use_configured_state": True}}
    if not uses_deepspeed:
        overrides["use_cpu"] = True
    return overrides


def check_world_size(training_args: TrainingArguments) -> int:
    """Stop with an error naming both numbers when the run has another number of processes than it was asked for.

    Compared with the world size of the process group (the Trainer's, and `torch.distributed`'s where initialised):
    ``WORLD_SIZE`` as the launcher (torchrun, ``accelerate launch``, DeepSpeed's launcher) exported it, and
    ``--expected_world_size`` when given. The explicit option is the only reliable signal for launchers that shrink
    the run themselves: accelerate 1.15 exports neither ``num_machines`` nor ``num_processes`` to the workers, and its
    DeepSpeed multi-node launch without a hostfile (``deepspeed_multinode_launcher`` pdsh, the default) starts one
    rank per machine with ``WORLD_SIZE=1``, each training alone. Returns the world size.
    """
    world_size = training_args.world_size
    if dist.is_available() and dist.is_initialized():
        group_size = dist.get_world_size()
        if group_size != world_size:
            raise RuntimeError(
                f"The process group has {group_size} processes but the Trainer sees {world_size}: every rank would "
                "train on the full data (see configure_cpu_distributed_state)."
            )
    exported = os.environ.get("WORLD_SIZE")
    if exported is not None and exported.isdigit() and int(exported) != world_size:
        raise RuntimeError(
            f"The launcher exported WORLD_SIZE={exported} but this run's process group has {world_size} processes."
        )
    expected = getattr(training_args, "expected_world_size", None)
    if expected is not None and expected != world_size:
        hint = ""
        if training_args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            hint = (
                " Under `accelerate launch --num_machines N` DeepSpeed needs `deepspeed_multinode_launcher: standard`"
                " in the accelerate config (one launch per machine), or a hostfile (`deepspeed_hostfile`) for pdsh;"
                " without either each machine trains alone (DeepSpeed logs 'Unable to find hostfile')."
            )
        raise RuntimeError(
            f"This run was asked for {expected} processes (--expected_world_size {expected}) but its process group "
            f"has {world_size} (rank {training_args.process_index}); refusing to train on another number of "
            f"processes.{hint} See docs/training.md, 'Several machines'."
        )
    return world_size


__all__ = [
    "MSClipTrainer",
    "MSClipTrainingArguments",
    "build_parameter_groups",
    "check_world_size",
    "configure_cpu_distributed_state",
    "is_no_decay_parameter",
    "is_shared_parameter",
]
