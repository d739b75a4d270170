"""run_pretrain.py plus two test hooks, launched by tests/test_preemption.py.

Environment:
    STALL_AFTER_STEP=k  once k optimizer steps are done, the next forward pass writes ``<output_dir>/stalled`` and
                        blocks, so that the test's external SIGKILL lands in the middle of a training step;
    STEP_LOG=path       every rank appends "<rank> <global step>" to ``path`` after each optimizer step it trains
                        (and "<rank> pid <process id>" when training begins, so a test can signal one rank).
"""

import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from modeling_msclip.pretraining_msclip import run_pretraining  # noqa: E402
from training.run_pretrain import parse_arguments  # noqa: E402


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
    if os.environ.get("STEP_LOG"):
        callbacks.append(StepLog(os.environ["STEP_LOG"]))
    run_pretraining(*parse_arguments(), callbacks=callbacks)


if __name__ == "__main__":
    main()
