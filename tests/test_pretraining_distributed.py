"""Real multi-process pre-training runs on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 against one process, and an
interrupted run resumed from its checkpoint against an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE, assert_close_to_scale, free_port

from modeling_msclip import (
    MSClipConfig,
    MSClipForPreTraining,
    MSClipImageProcessor,
    MSClipModel,
    MSClipProcessor,
    train_msclip_tokenizer,
)
from modeling_msclip.pretraining_msclip import align_text_config_with_tokenizer
from modeling_msclip.shapes_dataset import ShapesConfig, write_shapes_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HOOKS_SCRIPT = REPO / "tests" / "scripts" / "pretrain_with_hooks.py"
NUM_SAMPLES = 48
GLOBAL_BATCH = 16


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretraining")
    write_shapes_dataset(
        root / "shapes", num_train=NUM_SAMPLES, num_validation=8, num_test=8, config=ShapesConfig(image_size=64)
    )
    tokenizer = train_msclip_tokenizer(TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE)
    config = MSClipConfig.from_preset("msclip-s-tiny")
    align_text_config_with_tokenizer(config, tokenizer, resize=True)
    torch.manual_seed(0)
    MSClipForPreTraining(config).save_pretrained(root / "init")
    image_processor = MSClipImageProcessor.from_preset("msclip", image_size=64)
    MSClipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "init")
    return root


def launch(
    workspace: Path,
    name: str,
    launcher: list[str],
    per_device_batch: int,
    *extra: str,
    env: dict[str, str] | None = None,
    expect_returncode: int = 0,
) -> Path:
    output = workspace / name
    command = [
        *launcher,
        str(HOOKS_SCRIPT),
        "--model_name_or_path",
        str(workspace / "init"),
        "--train_data",
        str(workspace / "shapes"),
        "--train_split",
        "train",
        "--per_device_train_batch_size",
        str(per_device_batch),
        "--learning_rate",
        "1e-4",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        "--output_dir",
        str(output),
        "--log_seen_samples",
        str(output / "seen"),
        *extra,
    ]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == expect_returncode, result.stdout[-2000:] + result.stderr[-4000:]
    return output


def accelerate(config: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configuration" / "accelerate" / config),
        "--main_process_port",
        str(free_port()),
    ]


def step_terms(output: Path, key: str = "clip") -> dict[int, float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[key] for entry in history if key in entry}


def seen_keys(output: Path) -> list[list[str]]:
    return [path.read_text().split() for path in sorted((output / "seen").glob("seen_rank*.txt"))]


@pytest.fixture(scope="module")
def single_process(workspace):
    return launch(
        workspace,
        "single",
        [sys.executable],
        GLOBAL_BATCH,
        "--num_train_epochs",
        "1",
        "--save_strategy",
        "no",
        "--no_augmentation",
    )


@pytest.mark.parametrize(
    ("name", "config", "extra"),
    [
        ("ddp", "multi_process.yaml", ()),
        ("zero2", "deepspeed_zero2.yaml", ()),  # --nonfinite_loss auto resolves to raise under DeepSpeed
        ("zero3", "deepspeed_zero3.yaml", ("--nonfinite_loss", "raise")),
    ],
)
def test_two_process_runs_shard_the_data_and_match_one_process(workspace, single_process, name, config, extra):
    probe = workspace / f"{name}_probe.pt"
    output = launch(
        workspace,
        name,
        accelerate(config),
        GLOBAL_BATCH // 2,
        "--num_train_epochs",
        "1",
        "--save_strategy",
        "no",
        "--no_augmentation",
        *extra,
        env={"PROBE_OUTPUT": str(probe)},
    )

    ranks = seen_keys(output)
    assert len(ranks) == 2 and all(len(keys) == NUM_SAMPLES // 2 for keys in ranks)
    assert not set(ranks[0]) & set(ranks[1]), "a sample went to both ranks"
    assert sorted(ranks[0] + ranks[1]) == sorted(seen_keys(single_process)[0]), "an epoch must cover every sample once"

    reference, distributed = step_terms(single_process), step_terms(output)
    assert sorted(reference) == sorted(distributed) == [1, 2, 3]
    assert_close_to_scale(distributed[1], reference[1], 1e-5, "first-step loss of two ranks vs one process")
    assert_close_to_scale(distributed[3], reference[3], 1e-3, "third-step loss of two ranks vs one process")

    # The saved checkpoint loads as a plain inference model and reproduces the trained model's outputs.
    saved = torch.load(probe)
    model = MSClipModel.from_pretrained(output, attn_implementation="sdpa").eval()
    with torch.no_grad():
        outputs = model(**saved["batch"])
    assert_close_to_scale(outputs.image_embeds, saved["image_embeds"], 1e-5, "reloaded image_embeds")
    assert_close_to_scale(outputs.text_embeds, saved["text_embeds"], 1e-5, "reloaded text_embeds")
    # Cosines times exp(logit_scale) ~ 14: the logits carry 14 times the unit embeddings' rounding.
    assert_close_to_scale(outputs.logits_per_image, saved["logits_per_image"], 5e-5, "reloaded logits_per_image")
