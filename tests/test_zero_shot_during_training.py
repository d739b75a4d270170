"""Zero-shot evaluation during pre-training (``--zeroshot_eval_data``), as `make demo` runs it, in a real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE

from modeling_msclip import train_msclip_tokenizer
from processing.shapes_dataset import COLOR_NAMES, ShapesConfig, write_shapes_dataset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_zero_shot_during_training_logs_accuracy_and_keeps_every_loss(tmp_path):
    """Evaluation on logging steps used to swallow that step's loss (issue 17, bug 2): every logging step must have
    its loss, loss terms and learning rate, and the evaluation steps their zero-shot accuracy."""
    write_shapes_dataset(
        tmp_path / "shapes", num_train=32, num_validation=8, num_test=16, config=ShapesConfig(image_size=32)
    )
    train_msclip_tokenizer(TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE).save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "classes.txt").write_text("\n".join(COLOR_NAMES))
    command = [
        sys.executable, "training/run_pretrain.py",
        "--model_preset", "msclip-s-tiny", "--tokenizer_name_or_path", str(tmp_path / "tokenizer"),
        "--train_data", str(tmp_path / "shapes"), "--train_split", "train",
        "--per_device_train_batch_size", "8", "--max_steps", "6", "--learning_rate", "1e-4",
        "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no", "--output_dir", str(tmp_path / "run"),
        "--zeroshot_eval_data", str(tmp_path / "shapes"), "--zeroshot_eval_split", "test",
        "--zeroshot_label_column", "color_label", "--zeroshot_class_names", str(tmp_path / "classes.txt"),
        "--zeroshot_eval_steps", "2",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    losses = {entry["step"] for entry in history if "loss" in entry and "clip" in entry and "learning_rate" in entry}
    assert losses == set(range(1, 7)), history
    evaluated = {entry["step"]: entry for entry in history if "eval_zeroshot_top1" in entry}
    assert sorted(evaluated) == [2, 4, 6]
    assert all(0.0 <= entry["eval_zeroshot_top1"] <= 1.0 for entry in evaluated.values())
    assert any("eval_retrieval" in key or "recall" in key for key in evaluated[2]), evaluated[2]
