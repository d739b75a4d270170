"""run_pretrain.py plus two test hooks, launched by tests/test_preemption.py.

Environment:
    STALL_AFTER_STEP=k  once k optimizer steps are done, the next forward pass writes ``<output_dir>/stalled`` and
                        blocks, so that the test's external SIGKILL lands in the middle of a training step;
    STOP_IN_BACKWARD=r:k
                        once k optimizer steps are done, rank r stops itself (SIGSTOP) inside the next backward pass,
                        once every parameter's gradient is computed: after the collectives inside the model and
                        the loss, before the last gradient bucket is reduced, so the other ranks wait in DDP's or
                        DeepSpeed's gradient reduction;
    STEP_LOG=path       every rank appends "<rank> <global step>" to ``path`` after each optimizer step it trains
                        (and "<rank> pid <process id>" when training begins, so a test can signal one rank).
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from training.run_pretrain import parse_arguments, run_pretraining  # noqa: E402


class StallInForward(TrainerCallback):
    """Installs a forward pre-hook that blocks inside the step after ``step`` (the stall is not in a callback)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def stall(module, inputs):
            if state.global_step >= self.step:
                Path(args.output_dir, "stalled").write_text(str(state.global_step))
                time.sleep(600)

        model.register_forward_pre_hook(stall)


class StopInBackward(TrainerCallback):
    """Hangs rank ``rank`` inside the backward pass of the step after ``step``, like a peer that stops responding."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.process_index != self.rank:
            return

        def stop(gradients):
            if state.global_step >= self.step:
                os.kill(os.getpid(), signal.SIGSTOP)

        parameters = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.graph.register_multi_grad_hook(parameters, stop, mode="all")


class StepLog(TrainerCallback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_begin(self, args, state, control, **kwargs):
        with open(self.path, "a") as handle:
            handle.write(f"{args.process_index} pid {os.getpid()}\n")

    def on_step_end(self, args, state, control, **kwargs):
        with open(self.path, "a") as handle:
            handle.write(f"{args.process_index} {state.global_step}\n")


def main() -> None:
    callbacks = []
    if os.environ.get("STALL_AFTER_STEP"):
        callbacks.append(StallInForward(int(os.environ["STALL_AFTER_STEP"])))
    if os.environ.get("STOP_IN_BACKWARD"):
        rank, step = os.environ["STOP_IN_BACKWARD"].split(":")
        callbacks.append(StopInBackward(int(rank), int(step)))
    if os.environ.get("STEP_LOG"):
        callbacks.append(StepLog(os.environ["STEP_LOG"]))
    run_pretraining(*parse_arguments(), callbacks=callbacks)


if __name__ == "__main__":
    main()
