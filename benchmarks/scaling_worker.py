"""One rank of ``python -m benchmarks.scaling --measure``: ``training/run_pretrain.py`` with a measuring callback.

    accelerate launch --config_file CFG benchmarks/scaling_worker.py --report_dir DIR --profile_steps 2 \\
        -- (every option of training/run_pretrain.py)

The options before ``--`` are this script's; everything after it goes to training/run_pretrain.py unchanged, so the
run is the real pre-training path (data loading, collation, DDP or the DeepSpeed engine, the loss's gathers).
``--max_steps`` counts every step: the warm-up ones (the caller drops them), the timed ones and the profiled ones.
Each rank writes ``DIR/rank<r>.json`` with

* ``step_seconds``: wall time between the ends of consecutive optimizer steps (the first step is timed from the start
  of training), for every step that runs without the profiler;
* ``collective_seconds_per_step``: time spent inside gloo collectives per step, from `torch.profiler` over the
  last ``--profile_steps`` steps (the profiler's overhead stays out of ``step_seconds``). The events are the
  collectives' own (``gloo:all_reduce``, ...), recorded on the threads that run them, so DDP's bucketed all-reduce,
  DeepSpeed's reduce-scatter / all-gather and the loss's feature all-gather are all counted; the time includes
  waiting for the slowest rank, and a collective that overlaps the backward pass counts in full. (On GPUs the
  ``nccl:`` events time only the kernel launch: the collective itself would need CUDA activity in the profiler.)
* ``collective_calls_per_step`` and ``collective_elements_per_step``, by collective: how many there were and how many
  elements this rank passed in (the whole tensor of an all-reduce, this rank's share of an all-gather);
* ``num_parameters``: the model's parameter count (whole, also under ZeRO-3);
* ``max_rss_bytes`` and ``max_rss_bytes_at_train_begin``: the process's peak resident set (``ru_maxrss``) over the
  warm-up and timed steps (read before the profiler starts, whose event records would count) and when training
  starts (model built, data loaded, engine set up).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `training` importable
from training.run_pretrain import parse_arguments, run_pretraining  # noqa: E402

# Profiler event names of the collectives themselves: gloo names its work "gloo:<op>" (recorded on the thread that
# runs it), NCCL "nccl:<op>". The dispatcher's "c10d::allreduce_" events only enqueue the work: not counted.
COLLECTIVE_PREFIXES = ("gloo:", "nccl:")


def max_rss_bytes() -> int:
    """Peak resident set of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ScalingProbe(TrainerCallback):
    """Times every optimizer step, profiles the collectives of the last ``profile_steps`` steps and writes this
    rank's measurements to ``report_dir/rank<r>.json`` at the end of training."""

    def __init__(self, report_dir: Path, profile_steps: int) -> None:
        self.report_dir = report_dir
        self.profile_steps = profile_steps
        self.step_seconds: list[float] = []
        self.collective_seconds: float | None = None
        self.collective_calls: Counter[str] = Counter()
        self.collective_elements: Counter[str] = Counter()
        self.profiler: torch.profiler.profile | None = None
        self.rss_at_begin = 0
        self.num_parameters = 0
        self.rss_before_profiler = 0
        self.last = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.rss_at_begin = max_rss_bytes()
        # Under ZeRO-3 a parameter holds only this rank's partition; ds_numel is its full size.
        self.num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.profiler is None:
            self.step_seconds.append(now - self.last)
        if state.global_step == state.max_steps - self.profile_steps and self.profile_steps > 0:
            # The profiler keeps every event (with its shapes) in this process: the peak is taken before it starts.
            self.rss_before_profiler = max_rss_bytes()
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
            self.profiler.__enter__()
        elif self.profiler is not None and state.global_step == state.max_steps:
            self.profiler.__exit__(None, None, None)
            events = [e for e in self.profiler.events() if e.name.startswith(COLLECTIVE_PREFIXES)]
            self.collective_seconds = sum(e.cpu_time_total for e in events) / 1e6 / self.profile_steps
            self.collective_calls = Counter(e.name for e in events)
            for event in events:  # the first input is this rank's tensor: the whole one, or its share for a gather
                self.collective_elements[event.name] += math.prod(event.input_shapes[0]) if event.input_shapes else 0
        self.last = time.perf_counter()  # after the profiler's start or stop, which are not part of any step

    def on_train_end(self, args, state, control, **kwargs):
        self.report_dir.mkdir(parents=True, exist_ok=True)
        report = {
            "rank": args.process_index,
            "world_size": args.world_size,
            "per_device_batch": args.per_device_train_batch_size,
            "num_parameters": self.num_parameters,
            "step_seconds": self.step_seconds,
            "collective_seconds_per_step": self.collective_seconds,
            "collective_calls_per_step": {k: v / self.profile_steps for k, v in self.collective_calls.items()},
            "collective_elements_per_step": {k: v / self.profile_steps for k, v in self.collective_elements.items()},
            "max_rss_bytes": self.rss_before_profiler or max_rss_bytes(),
            "max_rss_bytes_at_train_begin": self.rss_at_begin,
        }
        (self.report_dir / f"rank{args.process_index}.json").write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report_dir", "--report-dir", required=True, help="folder for rank<r>.json")
    parser.add_argument(
        "--profile_steps", "--profile-steps", type=int, default=2, help="last steps run under the profiler"
    )
    args = parser.parse_args(own)
    probe = ScalingProbe(Path(args.report_dir), args.profile_steps)
    run_pretraining(*parse_arguments(rest), callbacks=[probe])


if __name__ == "__main__":
    main()
