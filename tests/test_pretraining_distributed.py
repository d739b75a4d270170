"""Real multi-process pre-training runs on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3 against one process on the same
global batches (kill-and-resume runs are in tests/test_preemption.py).

Every logged step's loss terms and gradient norm, and every parameter and buffer before training, after each optimizer
step and as saved at the end, are compared with the one-process run, relative to the compared values' scale
(`conftest.close_to_scale`). The runs use Adam's epsilon 1e-6 (CLIP's value; the transformers default is 1e-8): Adam
divides each element's step by ``|gradient| + eps``, so an element whose gradient is near zero gets a step decided by
rounding. With 1e-8 the float summation order of 2 ranks vs 1 process moved 16 of 2.7 M parameters by more than 1e-5
after the first update (at most 5.8e-5 = 0.58 of a learning-rate step, a sign flip of a gradient of ~3e-9); with 1e-6
the largest difference after step 1 is 1.9e-6.

Measured differences of the 2-rank runs (DDP, ZeRO-2, ZeRO-3 alike; tolerance in brackets):

* loss / clip term, steps 1-3: <= 1.4e-6 of the loss (1e-5); exp(logit_scale): equal to print precision (1e-5);
* gradient norm (before clipping) at step 1: <= 3.1e-7 relative (1e-5); at steps 2-3, on weights that already differ
  by rounding: <= 1.5e-5 relative (1e-4);
* parameters and buffers: before training equal (exact); after step 1 <= 1.9e-6 (1e-5); after steps 2-3 and in the
  saved model <= 1.05e-5, at 1 of 2.7 M elements (5e-5).

A bug in the gradient of one parameter group is far outside these bounds: `test_a_doubled_gradient_fails_the_comparison`
doubles the gradient of the shared parameters on rank 0 (before DDP averages it). Its step-2 loss is 0.044 off (1.2 %),
its step-1 gradient norm 14 %, and 286 k parameter elements differ by more than 1e-5 after step 1 (up to 2e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    TOKENIZER_CORPUS,
    TOKENIZER_VOCAB_SIZE,
    assert_close_to_scale,
    close_to_scale,
    difference_and_scale,
    free_port,
)

from modeling_msclip import (
    MSClipConfig,
    MSClipForPreTraining,
    MSClipImageProcessor,
    MSClipModel,
    MSClipProcessor,
    train_msclip_tokenizer,
)
from modeling_msclip.pretraining_msclip import align_text_config_with_tokenizer
from processing.shapes_dataset import ShapesConfig, write_shapes_dataset

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HOOKS_SCRIPT = REPO / "tests" / "scripts" / "pretrain_with_hooks.py"
NUM_SAMPLES = 48
GLOBAL_BATCH = 16
ADAM_EPSILON = "1e-6"  # see the module docstring
# The arguments every run compared with the one-process reference shares: one epoch, no saving, no augmentation.
COMPARED_RUN = ("--num_train_epochs", "1", "--save_strategy", "no", "--no_augmentation", "--adam_epsilon", ADAM_EPSILON)


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


def parameters_at(output: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The full state dicts that `PARAMS_OUTPUT` saved: step 0 (before training) and after each optimizer step."""
    return {int(path.stem.split("-")[1]): torch.load(path) for path in (output / "params").glob("step-*.pt")}


def mismatches(output: Path, reference: Path) -> list[str]:
    """Every value of run ``output`` that is outside its bound of the one-process run ``reference`` (the bounds and
    the measured differences are in the module docstring); empty when the runs agree."""
    found = []

    def compare(actual, expected, tol: float, what: str) -> None:
        if not close_to_scale(actual, expected, tol, what):
            difference, scale = difference_and_scale(actual, expected, what)
            found.append(f"{what}: |difference| {difference:.3g} > {tol:g} x scale {scale:.3g}")

    for key in ("loss", "clip", "logit_scale_exp", "grad_norm"):
        expected, actual = step_terms(reference, key), step_terms(output, key)
        if sorted(actual) != sorted(expected):
            found.append(f"{key} logged at steps {sorted(actual)}, not {sorted(expected)}")
        for step in sorted(set(actual) & set(expected)):
            tol = 1e-4 if key == "grad_norm" and step > 1 else 1e-5
            compare(actual[step], expected[step], tol, f"{key} at step {step}")

    expected_states, states = parameters_at(reference), parameters_at(output)
    if sorted(states) != sorted(expected_states):
        found.append(f"parameters saved at steps {sorted(states)}, not {sorted(expected_states)}")
    final = MSClipForPreTraining.from_pretrained(reference).state_dict()
    saved = MSClipForPreTraining.from_pretrained(output).state_dict()
    for step, state in [*sorted(states.items()), ("saved", saved)]:
        expected_state = final if step == "saved" else expected_states.get(step, {})
        tol = 0.0 if step == 0 else 1e-5 if step == 1 else 5e-5
        for name, value in expected_state.items():
            compare(state[name], value, tol, f"{name} after step {step}")
    return found


@pytest.fixture(scope="module")
def single_process(workspace):
    output = launch(
        workspace,
        "single",
        [sys.executable],
        GLOBAL_BATCH,
        *COMPARED_RUN,
        env={"PARAMS_OUTPUT": str(workspace / "single" / "params")},
    )
    assert sorted(parameters_at(output)) == [0, 1, 2, 3]
    return output


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
        *COMPARED_RUN,
        *extra,
        env={"PROBE_OUTPUT": str(probe), "PARAMS_OUTPUT": str(workspace / name / "params")},
    )

    ranks = seen_keys(output)
    assert len(ranks) == 2 and all(len(keys) == NUM_SAMPLES // 2 for keys in ranks)
    assert not set(ranks[0]) & set(ranks[1]), "a sample went to both ranks"
    assert sorted(ranks[0] + ranks[1]) == sorted(seen_keys(single_process)[0]), "an epoch must cover every sample once"

    assert sorted(step_terms(output)) == [1, 2, 3]
    found = mismatches(output, single_process)
    assert not found, f"{len(found)} values of two ranks differ from one process:\n" + "\n".join(found[:20])

    # The saved checkpoint loads as a plain inference model and reproduces the trained model's outputs.
    saved = torch.load(probe)
    model = MSClipModel.from_pretrained(output, attn_implementation="sdpa").eval()
    with torch.no_grad():
        outputs = model(**saved["batch"])
    assert_close_to_scale(outputs.image_embeds, saved["image_embeds"], 1e-5, "reloaded image_embeds")
    assert_close_to_scale(outputs.text_embeds, saved["text_embeds"], 1e-5, "reloaded text_embeds")
    # Cosines times exp(logit_scale) ~ 14: the logits carry 14 times the unit embeddings' rounding.
    assert_close_to_scale(outputs.logits_per_image, saved["logits_per_image"], 5e-5, "reloaded logits_per_image")


def test_a_doubled_gradient_fails_the_comparison(workspace, single_process):
    """The comparison above catches a gradient bug in one parameter group: a DDP run in which rank 0 doubles the
    gradient of the parameters shared by both towers before it is averaged (``DOUBLE_SHARED_GRAD``) must fail it on
    the step-1 gradient norm, the step-2 loss and the shared parameters after step 1, while the step-1 loss (computed
    before any update) still agrees."""
    output = launch(
        workspace,
        "ddp_doubled_shared_gradient",
        accelerate("multi_process.yaml"),
        GLOBAL_BATCH // 2,
        *COMPARED_RUN,
        env={"DOUBLE_SHARED_GRAD": "1", "PARAMS_OUTPUT": str(workspace / "ddp_doubled_shared_gradient" / "params")},
    )
    found = mismatches(output, single_process)
    failed = {line.split(":")[0] for line in found}
    assert {"grad_norm at step 1", "loss at step 2", "clip at step 2"} <= failed, found[:20]
    assert "loss at step 1" not in failed, found[:20]
    shared_after_first = [name for name in failed if ".shared." in name and name.endswith("after step 1")]
    assert len(shared_after_first) >= 10, found[:20]


def test_zero3_from_a_preset_starts_from_the_one_process_weights(workspace, tmp_path):
    """A 2-rank ZeRO-3 run from ``--model_preset`` starts from exactly the weights of one process with the same
    ``--seed``, and its first step has the same loss. Fails without `pretraining_msclip._without_zero3_init` (the
    model is then built inside ``deepspeed.zero.Init`` and initialised module by module on rank 0: 96 of 433 tensors
    differed)."""
    states, losses = {}, {}
    for name, launcher, batch, extra in [
        ("one", [sys.executable], GLOBAL_BATCH, ()),
        ("zero3", accelerate("deepspeed_zero3.yaml"), GLOBAL_BATCH // 2, ("--nonfinite_loss", "raise")),
    ]:
        output = tmp_path / name
        command = [
            *launcher, str(HOOKS_SCRIPT),
            "--model_preset", "msclip-s-tiny",
            "--processor_name_or_path", str(workspace / "init"),
            "--train_data", str(workspace / "shapes"), "--train_split", "train",
            "--per_device_train_batch_size", str(batch),
            "--max_steps", "1", "--seed", "7", "--no_augmentation",
            "--logging_steps", "1", "--report_to", "none", "--dataloader_num_workers", "0", "--save_strategy", "no",
            "--output_dir", str(output), *extra,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PARAMS_OUTPUT": str(output / "params")}
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        states[name], losses[name] = torch.load(output / "params" / "step-0.pt"), step_terms(output, "loss")
    assert sorted(states["zero3"]) == sorted(states["one"])
    differing = [key for key, value in states["one"].items() if not torch.equal(states["zero3"][key], value)]
    assert not differing, f"{len(differing)} of {len(states['one'])} initial tensors differ: {differing[:5]}"
    assert_close_to_scale(losses["zero3"][1], losses["one"][1], 1e-5, "first-step loss from the preset")
