"""Fine-tuning in two processes with a real ``accelerate launch`` (gloo on CPU): the run ends, writes its results and
sums the counts of skipped images over both ranks.

``--skip_record_check`` leaves the unreadable images to each rank's collator, so each rank counts only the broken
images of its own share of the data, and the totals are right only when they are summed over the ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from test_finetune import write_color_folders

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "run_finetune_classification.py"
BROKEN = b"\x89PNG\r\n\x1a\n this is not an image"


def test_two_process_finetuning_finishes_and_sums_the_skipped_images_over_ranks(tmp_path):
    # Training: 3 classes x 4 images + 4 broken ones = 16 records, 8 per rank, 2 steps of 4 per rank in one epoch
    # (16 divides evenly, so no rank repeats a record to fill its share).
    train, evaluation = tmp_path / "train", tmp_path / "eval"
    write_color_folders(train, per_class=4, seed=1, size=16)
    for index in range(4):
        (train / "red" / f"broken{index}.png").write_bytes(BROKEN)
    # Evaluation: 8 records in folder order, dark_blue/0,1,2,broken | green/0,1 red/0,broken. With 4 per batch the
    # first batch goes to rank 0 and the second to rank 1, so each rank meets one broken image.
    write_color_folders(evaluation, per_class=3, seed=2, size=16)
    for name in ("green/2.png", "red/1.png", "red/2.png"):
        (evaluation / name).unlink()
    (evaluation / "dark_blue" / "broken.png").write_bytes(BROKEN)
    (evaluation / "red" / "broken.png").write_bytes(BROKEN)

    output = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configuration" / "accelerate" / "multi_process.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        "--model_preset",
        "msclip-s-tiny",
        "--train_data",
        str(train),
        "--eval_data",
        str(evaluation),
        "--skip_record_check",
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        "--seed",
        "0",
        "--output_dir",
        str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own, so that a hanging run is ended with both of its ranks, not only the launcher.
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        files = sorted(path.name for path in output.iterdir()) if output.is_dir() else []
        pytest.fail(f"two-process fine-tuning did not finish within 300 s (it wrote {files})\n{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]

    assert (output / "model.safetensors").is_file()
    train_results = json.loads((output / "train_results.json").read_text())
    eval_results = json.loads((output / "eval_results.json").read_text())
    assert train_results["train_samples"] == 16
    assert train_results["train_skipped_corrupt_image"] == 4  # both ranks' collators, summed
    assert eval_results["eval_samples"] == 8
    assert eval_results["eval_skipped_corrupt_image"] == 2  # one on each rank
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    data_entries = [entry for entry in history if "data_train_skipped_corrupt_image" in entry]
    assert data_entries == [{"data_train_skipped_corrupt_image": 4, "data_eval_skipped_corrupt_image": 0}]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2]
