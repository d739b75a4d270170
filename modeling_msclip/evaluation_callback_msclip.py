# Copyright 2025 The modeling_msclip authors. Licensed under the Apache License, Version 2.0.
"""`ZeroShotEvalCallback`: zero-shot classification and retrieval on a small held-out set during `Trainer` training
(the evaluations of `evaluation_msclip`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from .evaluation_msclip import (
    DEFAULT_TEMPLATES,
    class_names_from_dataset,
    evaluate_retrieval,
    evaluate_zero_shot,
    flatten_scalar_metrics,
)

# ----------------------------------------------------------------------------------------------------------------------
# Trainer callback
# ----------------------------------------------------------------------------------------------------------------------


def _needs_all_ranks(args: Any) -> bool:
    """ZeRO-3 / FSDP shard parameters: every rank must join the forward passes, not just the main one."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return True
    except ImportError:  # pragma: no cover - deepspeed integration always ships with transformers
        pass
    return bool(getattr(args, "fsdp", None))


def _broadcast_from_main(results: dict[str, float] | None) -> dict[str, float] | None:
    """Share the main process's metrics with every rank (needed for `metric_for_best_model`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return results
    if torch.distributed.get_world_size() == 1:
        return results
    payload = [results]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


class ZeroShotEvalCallback(TrainerCallback):
    """Run zero-shot classification and/or retrieval on a small held-out set during `Trainer` training.

    It runs at every trainer evaluation (`on_evaluate`, its metrics are also merged into the evaluation metrics so
    that `metric_for_best_model="eval_zeroshot_top1"` works) and, with `eval_steps=N`, every N optimizer steps.
    Metrics are named `{metric_prefix}_zeroshot_{metric}` and `{metric_prefix}_retrieval_{metric}`.

    Only the main process computes (all ranks under DeepSpeed ZeRO-3 / FSDP, whose sharded forward needs every
    rank) and logs. Logging goes through `trainer.log` (so `state.log_history` *and* reporting integrations see the
    metrics) when the trainer is attached with `callback.attach(trainer)`; otherwise the entry is appended to
    `state.log_history` directly, in the same `{..., "epoch", "step"}` format.

    Example::

        callback = ZeroShotEvalCallback(processor, zero_shot_dataset=val_images, class_names=names, eval_steps=500)
        trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
        callback.attach(trainer)
    """

    def __init__(
        self,
        processor: Any = None,
        *,
        zero_shot_dataset: Sequence[Mapping[str, Any]] | None = None,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        retrieval_dataset: Sequence[Mapping[str, Any]] | None = None,
        eval_steps: int | None = None,
        run_on_evaluate: bool = True,
        batch_size: int = 64,
        metric_prefix: str = "eval",
        image_column: str = "image",
        label_column: str = "label",
        text_column: str = "text",
    ) -> None:
        if zero_shot_dataset is None and retrieval_dataset is None:
            raise ValueError("ZeroShotEvalCallback needs a zero_shot_dataset and/or a retrieval_dataset")
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1 or None, got {eval_steps}")
        if zero_shot_dataset is not None and class_names is None:
            class_names = class_names_from_dataset(zero_shot_dataset, label_column)
            if class_names is None:
                raise ValueError("class_names is required for the zero-shot dataset (it has no ClassLabel names)")
        self.processor = processor
        self.zero_shot_dataset = zero_shot_dataset
        self.class_names = list(class_names) if class_names is not None else None
        self.templates = tuple(templates)
        self.retrieval_dataset = retrieval_dataset
        self.eval_steps = eval_steps
        self.run_on_evaluate = run_on_evaluate
        self.batch_size = batch_size
        self.metric_prefix = metric_prefix
        self.image_column = image_column
        self.label_column = label_column
        self.text_column = text_column
        self.trainer = None
        self._last_step: int | None = None
        self._last_results: dict[str, float] | None = None

    def attach(self, trainer: Any) -> ZeroShotEvalCallback:
        """Log through `trainer.log` from now on and register this callback with the trainer if it is not yet."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    def compute_metrics(self, model: torch.nn.Module, processor: Any = None) -> dict[str, float]:
        """Run the configured evaluations now and return flat, prefixed scalar metrics."""
        processor = self.processor if self.processor is not None else processor
        if processor is None:
            raise ValueError("ZeroShotEvalCallback has no processor: pass one or give the Trainer a processing_class")
        results: dict[str, dict[str, Any]] = {}
        if self.zero_shot_dataset is not None:
            results["zeroshot"] = evaluate_zero_shot(
                model,
                processor,
                self.zero_shot_dataset,
                self.class_names,
                self.templates,
                image_column=self.image_column,
                label_column=self.label_column,
                batch_size=self.batch_size,
            )
        if self.retrieval_dataset is not None:
            results["retrieval"] = evaluate_retrieval(
                model,
                processor,
                self.retrieval_dataset,
                image_column=self.image_column,
                text_column=self.text_column,
                batch_size=self.batch_size,
            )
        prefix = f"{self.metric_prefix}_" if self.metric_prefix else ""
        return flatten_scalar_metrics(results, prefix=prefix, include_sizes=False)

    def _run(self, args: Any, state: Any, model: torch.nn.Module | None, processor: Any) -> dict[str, float] | None:
        """Compute (or reuse, same step) the metrics on the ranks that must and share them; log on the main one."""
        if self._last_step == state.global_step and self._last_results is not None:
            return self._last_results
        if model is None:
            raise ValueError("ZeroShotEvalCallback received no model from the Trainer")
        results = None
        if state.is_world_process_zero or _needs_all_ranks(args):
            results = self.compute_metrics(model, processor)
        results = _broadcast_from_main(results if state.is_world_process_zero else None)
        if results is None:  # single process that is not "world process zero" cannot happen; be defensive
            return None
        if state.is_world_process_zero:
            if self.trainer is not None:
                self.trainer.log(dict(results))
            else:
                state.log_history.append({**results, "epoch": state.epoch, "step": state.global_step})
        self._last_step, self._last_results = state.global_step, results
        return results

    def on_train_begin(self, args, state, control, processing_class=None, **kwargs):
        # Fail before the first step, not after N steps of training, when no processor is available.
        if self.processor is None and processing_class is None:
            raise ValueError("ZeroShotEvalCallback has no processor: pass one or give the Trainer a processing_class")
        return control

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.eval_steps is not None and state.global_step % self.eval_steps == 0:
            # `trainer.log` clears `should_log` (transformers' CallbackHandler.on_log), which would drop this step's
            # training loss when it is also a logging step: keep the flag as the flow callback set it.
            should_log = control.should_log
            self._run(args, state, model, processing_class)
            control.should_log = should_log
        return control

    def on_evaluate(self, args, state, control, metrics=None, model=None, processing_class=None, **kwargs):
        if self.run_on_evaluate:
            results = self._run(args, state, model, processing_class)
            if results is not None and metrics is not None:
                metrics.update(results)
        return control
