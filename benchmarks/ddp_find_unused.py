"""DDP step time with ``--ddp_find_unused_parameters true`` vs the default ``false``, on 2 ranks (real launches).

    python -m benchmarks.ddp_find_unused                     # CPU: 2 gloo ranks, msclip-s-tiny at 64 px, 2 x 8 pairs
    python -m benchmarks.ddp_find_unused --repetitions 3 --max_steps 60

Each repetition launches ``training/run_pretrain.py`` under ``accelerate launch`` (configuration/accelerate/
multi_process.yaml) once with each setting, alternating which goes first, on the same data and initial weights.
The step time is read from rank 0's training log: ``per_device_batch / samples_per_second_per_device`` per logging
interval (the first interval, which holds the warm-up steps, is left out), and ``data_wait_s`` is subtracted for the
compute-and-communication part. The median over intervals and repetitions is reported. Wall clock: on a shared
machine other processes show up in it, so compare the two settings only within one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE, free_port  # noqa: E402  (the test suite's tokenizer)

SETTINGS = ("false", "true")


def prepare(root: Path, preset: str, image_size: int) -> None:
    """A shapes dataset and a saved initial model with its processor (the test suite's tokenizer)."""
    import torch

    from modeling_msclip import (
        MSClipConfig,
        MSClipForPreTraining,
        MSClipImageProcessor,
        MSClipProcessor,
        train_msclip_tokenizer,
    )
    from modeling_msclip.pretraining_msclip import align_text_config_with_tokenizer
    from processing.shapes_dataset import ShapesConfig, write_shapes_dataset

    write_shapes_dataset(
        root / "shapes", num_train=64, num_validation=8, num_test=8, config=ShapesConfig(image_size=image_size)
    )
    tokenizer = train_msclip_tokenizer(TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE)
    config = MSClipConfig.from_preset(preset)
    align_text_config_with_tokenizer(config, tokenizer, resize=True)
    torch.manual_seed(0)
    MSClipForPreTraining(config).save_pretrained(root / "init")
    image_processor = MSClipImageProcessor.from_preset("msclip", image_size=image_size)
    MSClipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "init")


def run(root: Path, setting: str, repetition: int, args: argparse.Namespace) -> list[tuple[float, float]]:
    """One 2-rank launch; (step seconds, step seconds without data wait) of each logging interval after the first."""
    output = root / f"run-{setting}-{repetition}"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configuration" / "accelerate" / "multi_process.yaml"),
        "--num_processes", "2", "--main_process_port", str(free_port()),
        str(REPO / "training" / "run_pretrain.py"),
        "--model_name_or_path", str(root / "init"),
        "--train_data", str(root / "shapes"), "--train_split", "train",
        "--per_device_train_batch_size", str(args.per_device_batch),
        "--max_steps", str(args.max_steps), "--logging_steps", str(args.logging_steps),
        "--learning_rate", "1e-4", "--report_to", "none", "--save_strategy", "no",
        "--dataloader_num_workers", "0", "--no_augmentation",
        "--ddp_find_unused_parameters", setting,
        "--output_dir", str(output),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {setting} run failed:\n{result.stderr[-4000:]}")
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    intervals = [entry for entry in history if "samples_per_second_per_device" in entry][1:]
    return [
        (step := args.per_device_batch / e["samples_per_second_per_device"], step - e["data_wait_s"]) for e in intervals
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="msclip-s-tiny")
    parser.add_argument("--image_size", "--image-size", type=int, default=64)
    parser.add_argument("--per_device_batch", "--per-device-batch", type=int, default=8)
    parser.add_argument("--max_steps", "--max-steps", type=int, default=40)
    parser.add_argument("--logging_steps", "--logging-steps", type=int, default=5)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ddp_find_unused_") as folder:
        root = Path(folder)
        prepare(root, args.preset, args.image_size)
        times: dict[str, list[tuple[float, float]]] = {setting: [] for setting in SETTINGS}
        for repetition in range(args.repetitions):
            order = SETTINGS if repetition % 2 == 0 else SETTINGS[::-1]
            for setting in order:
                times[setting] += run(root, setting, repetition, args)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, 2 ranks x {args.threads} thread(s)")
    print(f"{args.preset} at {args.image_size} px, {args.per_device_batch} pairs per rank, {args.max_steps} steps")
    median = {s: (statistics.median(t for t, _ in v), statistics.median(c for _, c in v)) for s, v in times.items()}
    for setting, (step, compute) in median.items():
        spread = max(t for t, _ in times[setting]) - min(t for t, _ in times[setting])
        print(
            f"find_unused_parameters={setting:5s}: step {step * 1e3:7.1f} ms (spread {spread * 1e3:.1f} ms over "
            f"{len(times[setting])} intervals), without data wait {compute * 1e3:7.1f} ms"
        )
    ratio = median["true"][0] / median["false"][0]
    print(f"true / false step time: {ratio:.3f}")


if __name__ == "__main__":
    main()
