"""Preemption-safe runs: completion markers, ``--resume_from_checkpoint latest``, no silent overwrite of a saved run.

The slow tests kill real runs from outside (SIGKILL to the whole process group while every rank is inside a forward
pass of the step after checkpoint 4), add a half-written newer checkpoint, and re-run the same command with
``--resume_from_checkpoint latest``. They fail when resuming is switched off: the re-run would then train steps 1-6
again (the step log must hold only 5 and 6), or pick the half-written checkpoint (it must be skipped), and the
losses and weights must equal the uninterrupted run's.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_scale, free_port
from test_pretraining_distributed import workspace  # noqa: F401 - the shared data and initial checkpoint

from modeling_msclip import MSClipForPreTraining
from modeling_msclip.checkpointing_msclip import (
    COMPLETE_MARKER,
    check_resume_compatible,
    find_latest_checkpoint,
    prepare_output_dir,
    resolve_resume_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "pretrain_preemptible.py"


def make_checkpoint(root: Path, step: int, complete: bool, **marker) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"partial")
    if complete:
        (folder / COMPLETE_MARKER).write_text(json.dumps({"global_step": step, **marker}))
    return folder


def test_latest_is_the_newest_complete_checkpoint(tmp_path, caplog):
    make_checkpoint(tmp_path, 2, True)
    four = make_checkpoint(tmp_path, 4, True)
    make_checkpoint(tmp_path, 10, True)
    (tmp_path / "checkpoint-10" / COMPLETE_MARKER).write_text("{trunc")  # torn marker: not complete
    make_checkpoint(tmp_path, 6, False)
    (tmp_path / "checkpoint-8").write_text("a file, not a folder")
    with caplog.at_level(logging.WARNING, logger="modeling_msclip.checkpointing_msclip"):
        assert find_latest_checkpoint(tmp_path) == four
    assert "checkpoint-10" in caplog.text and "checkpoint-6" in caplog.text
    for spelling in ("latest", "true", "True", True):
        assert resolve_resume_checkpoint(spelling, tmp_path) == str(four)
    assert resolve_resume_checkpoint(None, tmp_path) is None
    assert resolve_resume_checkpoint("latest", tmp_path / "fresh") is None  # first run of a re-runnable command
    with pytest.raises(ValueError, match="its save was interrupted"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-6"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-99"), tmp_path)


def test_a_saved_run_is_never_replaced_silently(tmp_path):
    run = tmp_path / "run"
    make_checkpoint(run, 2, True)
    (run / "model.safetensors").write_bytes(b"the user's model")
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest.*--overwrite_output_dir"):
        prepare_output_dir(run, resuming=False, overwrite=False)
    prepare_output_dir(run, resuming=True, overwrite=False)
    assert (run / "checkpoint-2").is_dir()
    prepare_output_dir(run, resuming=False, overwrite=True)  # starting over removes the old run's checkpoints
    assert not (run / "checkpoint-2").exists() and (run / "model.safetensors").exists()
    prepare_output_dir(tmp_path / "new", resuming=False, overwrite=False)


def test_resumes_that_would_restore_less_are_refused(tmp_path):
    zero3 = make_checkpoint(tmp_path, 4, True, world_size=2, deepspeed_zero_stage=3)
    with pytest.raises(ValueError, match="without DeepSpeed would restore no optimizer or scheduler state"):
        check_resume_compatible(zero3, deepspeed_stage=None, world_size=2)
    with pytest.raises(ValueError, match="saved by 2 DeepSpeed ranks and this run has 1.*ds_to_universal"):
        check_resume_compatible(zero3, deepspeed_stage=3, world_size=1)
    check_resume_compatible(zero3, deepspeed_stage=3, world_size=2)
    ddp = make_checkpoint(tmp_path, 6, True, world_size=2, deepspeed_zero_stage=None)
    check_resume_compatible(ddp, deepspeed_stage=None, world_size=1)  # DDP state is not partitioned
    unmarked = make_checkpoint(tmp_path, 8, False)
    (unmarked / "global_step8").mkdir()
    with pytest.raises(ValueError, match="saved by DeepSpeed"):
        check_resume_compatible(unmarked, deepspeed_stage=None, world_size=1)


# ----------------------------------------------------------------------------------------- killed and re-run runs


def command(data: Path, output: Path, launcher: list[str], *extra: str) -> list[str]:
    return [
        *launcher,
        str(SCRIPT),
        "--model_name_or_path", str(data / "init"),
        "--train_data", str(data / "shapes"),
        "--train_split", "train",
        "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-4",
        "--logging_steps", "1",
        "--report_to", "none",
        "--dataloader_num_workers", "0",
        "--max_steps", "6",
        "--save_strategy", "steps",
        "--save_steps", "2",
        "--seed", "0",
        "--output_dir", str(output),
        *extra,
    ]  # fmt: skip


def run(arguments: list[str], env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run(
        arguments, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def kill_inside_step_five(arguments: list[str], output: Path, ranks: int) -> None:
    """Start the run, wait until every rank blocks in the forward pass after checkpoint 4, SIGKILL them all."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALL_AFTER_STEP": "4"}
    # The log goes to a file: DeepSpeed writes more than a pipe holds, and an unread pipe would block the run.
    log = output.parent / f"{output.name}-killed.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            arguments, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 600
    while not (output / "stalled").exists():
        assert process.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the run never reached step 5\n" + log.read_text()[-4000:]
        time.sleep(0.5)
    time.sleep(2.0 if ranks > 1 else 0.5)  # let the other ranks reach the same forward pass
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    (output / "stalled").unlink()


def steps_trained(step_log: Path) -> dict[int, list[int]]:
    per_rank: dict[int, list[int]] = {}
    for line in step_log.read_text().split("\n"):
        if line and " pid " not in line:
            rank, step = map(int, line.split())
            per_rank.setdefault(rank, []).append(step)
    return per_rank


def step_losses(output: Path) -> dict[int, float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def accelerate_launch(processes: int, config: str = "multi_process.yaml") -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configuration" / "accelerate" / config),
        "--num_processes", str(processes), "--main_process_port", str(free_port()),
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ranks", "config"),
    [(1, None), (2, "multi_process.yaml"), (2, "deepspeed_zero3.yaml")],
    ids=["one-process", "ddp-2-ranks", "zero3-2-ranks"],
)
def test_killed_run_resumes_from_the_latest_complete_checkpoint(workspace, ranks, config):  # noqa: F811
    """Under ZeRO-3 the checkpoint holds each rank's partition of the fp32 weights and Adam moments
    (``global_step4/``); the resumed steps 5 and 6 reproduce the uninterrupted ZeRO-3 run bit for bit on CPU
    (measured: losses and all 433 saved tensors equal), and are compared at 1e-6 like the others. The killed run's
    log goes to a file: with an unread stderr pipe DeepSpeed's logging blocked the ZeRO-3 run before step 2."""
    launcher = [sys.executable] if ranks == 1 else accelerate_launch(ranks, config)
    extra = ("--nonfinite_loss", "raise") if config and "deepspeed" in config else ()
    name = f"{ranks}-{Path(config).stem}" if config else f"{ranks}"
    full, cut = workspace / f"full-{name}", workspace / f"cut-{name}"
    run(command(workspace, full, launcher, *extra), {"STEP_LOG": str(workspace / f"full-{name}.log")})
    assert all(steps == [1, 2, 3, 4, 5, 6] for steps in steps_trained(workspace / f"full-{name}.log").values())

    kill_inside_step_five(command(workspace, cut, launcher, *extra), cut, ranks)
    assert (cut / "checkpoint-4" / COMPLETE_MARKER).is_file() and not (cut / "checkpoint-6").exists()
    if extra:
        marker = json.loads((cut / "checkpoint-4" / COMPLETE_MARKER).read_text())
        assert marker["deepspeed_zero_stage"] == 3 and marker["world_size"] == 2, marker
        assert (cut / "checkpoint-4" / "global_step4").is_dir()  # the engine's partitioned state
    half_written = make_checkpoint(cut, 6, False)  # a newer save that the kill interrupted

    refused = run(command(workspace, cut, launcher, *extra), {}, expect=1)
    assert "is not empty; pass --resume_from_checkpoint latest" in refused.stderr

    step_log = workspace / f"resumed-{name}.log"
    resume = ("--resume_from_checkpoint", "latest")
    resumed = run(command(workspace, cut, launcher, *extra, *resume), {"STEP_LOG": str(step_log)})
    assert f"skipping {half_written}" in resumed.stderr
    trained = steps_trained(step_log)
    assert sorted(trained) == list(range(ranks)) and all(steps == [5, 6] for steps in trained.values()), trained
    expected, got = step_losses(full), step_losses(cut)
    for step in (5, 6):
        assert_close_to_scale(got[step], expected[step], 1e-6, f"resumed loss at step {step}")
    full_state = MSClipForPreTraining.from_pretrained(full).state_dict()
    resumed_state = MSClipForPreTraining.from_pretrained(cut).state_dict()
    for key, value in full_state.items():
        assert_close_to_scale(resumed_state[key], value, 1e-6, f"resumed {key}")
    # BatchNorm statistics (MS-CLIP-S's stem and branch) moved in training, so their equality means something.
    running_vars = [k for k in full_state if k.endswith("running_var")]
    assert running_vars and any(not torch.equal(full_state[k], torch.ones_like(full_state[k])) for k in running_vars)

    again = run(command(workspace, cut, launcher, *extra, *resume), {"STEP_LOG": str(step_log)})
    assert "resuming from" in again.stderr and "checkpoint-6" in again.stderr
    assert all(steps == [5, 6] for steps in steps_trained(step_log).values())  # a finished run trains no more


def process_ids(step_log: Path) -> dict[int, int]:
    fields = [line.split() for line in step_log.read_text().split("\n") if " pid " in line]
    return {int(rank): int(pid) for rank, _, pid in fields}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "waiting_in"),
    [("multi_process.yaml", "in _engine_run_backward"), ("deepspeed_zero2.yaml", "in overlapping_partition_gradients")],
    ids=["ddp", "zero2"],
)
def test_a_hung_peer_ends_every_rank_within_the_timeout(workspace, tmp_path, config, waiting_in):  # noqa: F811
    """Rank 1 stops (SIGSTOP) inside the backward pass of step 3, once all its gradients are computed: rank 0 then
    waits in the gradient reduction, on the default group in DDP's reducer (inside autograd) and on DeepSpeed's own
    data-parallel group in ZeRO-2's reduction epilogue (rank 0's traceback ends in ``waiting_in``, past the
    collectives of the model and the loss). With --ddp_timeout 20 the launch must fail within the timeout
    plus the launcher's grace period. How it fails when the feature is off: without the timeout reaching the gloo
    default group (transformers' CPU path passes none) the DDP case waits 30 minutes; without
    `bound_process_group_timeouts` the ZeRO-2 case does (DeepSpeed's group gets torch's default timeout), and the
    test stops at ``timeout + 150`` s and fails."""
    step_log, timeout = tmp_path / "steps.log", 20
    arguments = command(workspace, tmp_path / "out", accelerate_launch(2, config), "--ddp_timeout", str(timeout))
    arguments[arguments.index("--max_steps") + 1] = "500"
    arguments[arguments.index("--save_strategy") + 1] = "no"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEP_LOG": str(step_log), "STOP_IN_BACKWARD": "1:2"}
    log = tmp_path / "run.log"  # a file, not a pipe: DeepSpeed writes more than an unread pipe holds
    with log.open("w") as handle:
        process = subprocess.Popen(
            arguments, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while not (step_log.exists() and all(len(s) >= 2 for s in steps_trained(step_log).values())
                   and len(process_ids(step_log)) == 2):  # fmt: skip
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "the run never reached step 2"
            time.sleep(0.2)
        stopped = time.monotonic()  # rank 1 stops itself a moment later, in step 3's backward pass
        process.wait(timeout=timeout + 150)
        waited = time.monotonic() - stopped
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for pid in process_ids(step_log).values():
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    output = log.read_text()
    assert process.returncode != 0, output[-3000:]
    assert waited < timeout + 150, waited
    assert steps_trained(step_log) == {0: [1, 2], 1: [1, 2]}, steps_trained(step_log)
    rank0_error = output[output.index("[rank0]: Traceback") :]
    assert waiting_in in rank0_error and "Timed out" in rank0_error, rank0_error[-3000:]
    assert "loss_msclip.py" not in rank0_error and "modeling_msclip.py" not in rank0_error, rank0_error[-3000:]
