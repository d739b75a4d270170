"""Measurement primitives: interleaved timing, peak memory of one call, FLOP counts, machine description.

Timing interleaves the contenders (A B C, B C A, C A B, ...) and reports medians, so slow drifts of a shared
machine (other processes, thermal state) hit every contender alike instead of whichever ran last.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Timing:
    """Seconds per call of one contender, one value per repetition."""

    name: str
    seconds: list[float] = field(default_factory=list)
    # With the CPU clock: the same repetitions split into user and system (kernel) CPU seconds per call.
    user_seconds: list[float] = field(default_factory=list)
    system_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median over the repetitions: how noisy the measurement was."""
        return (max(self.seconds) - min(self.seconds)) / self.median


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_timings(
    contenders: dict[str, Callable[[], object]],
    repetitions: int,
    calls_per_repetition: int = 1,
    warmup_calls: int = 1,
    sync: Callable[[], None] = lambda: None,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Time every contender ``repetitions`` times, interleaved, rotating the order each repetition.

    Args:
        contenders: name -> a call to time (a training step, a forward, ...).
        repetitions: how many times each contender is timed; report the median.
        calls_per_repetition: calls per timed repetition (for calls too short to time one by one).
        warmup_calls: untimed calls per contender first (allocator warm-up, lazy initialisation, autotuning).
        sync: waits for the device before reading the clock.
        clock: ``"wall"`` (``perf_counter``) or ``"cpu"`` (``process_time``: CPU seconds of this process, all threads
            summed). With one compute thread the CPU clock measures the work done and ignores the time the process
            sat descheduled because a neighbour was running, which is what dominates wall-clock noise on a shared
            machine; with several threads it would also count their spin-waiting, so use wall time there. The CPU
            clock also records each repetition's user / system split (``getrusage``): system time is mostly page
            faults, which grow with how much memory a step allocates afresh.

    Returns:
        name -> `Timing` with seconds per call.
    """
    if repetitions < 1 or calls_per_repetition < 1:
        raise ValueError("repetitions and calls_per_repetition must be at least 1")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    names = list(contenders)
    for name in names:
        for _ in range(warmup_calls):
            contenders[name]()
    sync()
    timings = {name: Timing(name) for name in names}
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            start = now()
            for _ in range(calls_per_repetition):
                contenders[name]()
            sync()
            timings[name].seconds.append((now() - start) / calls_per_repetition)
            if clock == "cpu":
                after = resource.getrusage(resource.RUSAGE_SELF)
                timings[name].user_seconds.append((after.ru_utime - usage.ru_utime) / calls_per_repetition)
                timings[name].system_seconds.append((after.ru_stime - usage.ru_stime) / calls_per_repetition)
    return timings


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by PyTorch during ``fn()`` above what was allocated when it started.

    CUDA: the caching allocator's exact peak (``max_memory_allocated``). CPU: PyTorch has no CPU peak counter, so
    ``fn`` runs once under ``torch.profiler`` with ``profile_memory=True`` and the allocation/free events of the
    CPU allocator are replayed in time order; the running maximum is the peak. It counts every tensor allocated by
    PyTorch (activations, gradients, optimizer temporaries) but not memory that libraries such as oneDNN allocate
    privately, nor Python objects. Returns ``None`` when the profiler yields no memory events.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    if not events:
        return None
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` as counted by ``torch.utils.flop_counter`` (matmuls, convolutions, attention kernels).

    On CPU the fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no FLOP formula, so
    attention scores are not counted there; on CUDA the flash/efficient kernels are.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def machine_description(device: torch.device) -> dict[str, object]:
    """CPU / GPU model, cores, threads, library versions, date and load: what a reader needs to weigh the numbers."""
    import transformers

    info: dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["code"] = _code_version()
    return info


def _code_version() -> str:
    """The git commit of the checkout, marked ``+modified`` when the library has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "modeling_msclip"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + (" +modified modeling_msclip/" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
