"""Runs over two "machines" on loopback: two `accelerate launch` commands started together, one process each, with
``--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`` (CPU, gloo), as docs/training.md tells users to
run them on real nodes; and the start-up check that refuses a run with fewer processes than it was asked for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_close_to_scale, free_port
from test_pretraining_distributed import (  # noqa: F401 - the shared data, initial checkpoint and 1-process run
    NUM_SAMPLES,
    seen_keys,
    single_process,
    step_terms,
    workspace,
)

from modeling_msclip.trainer_msclip import check_world_size

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "run_pretrain.py"
ACCELERATE_CONFIGS = REPO / "configuration" / "accelerate"
MESSAGE = "This run was asked for 2 processes (--expected_world_size 2) but its process group has 1"


def script_arguments(data: Path, output: Path, per_device_batch: int, *extra: str) -> list[str]:
    """The options of `test_pretraining_distributed.single_process`, for ``per_device_batch`` per rank."""
    return [
        str(SCRIPT),
        "--model_name_or_path", str(data / "init"),
        "--train_data", str(data / "shapes"),
        "--train_split", "train",
        "--per_device_train_batch_size", str(per_device_batch),
        "--learning_rate", "1e-4",
        "--logging_steps", "1",
        "--report_to", "none",
        "--dataloader_num_workers", "0",
        "--num_train_epochs", "1",
        "--save_strategy", "no",
        "--no_augmentation",
        "--output_dir", str(output),
        "--log_seen_samples", str(output / "seen"),
        *extra,
    ]  # fmt: skip


def machine_command(config: str, machine_rank: int, port: int, *accelerate_extra: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ACCELERATE_CONFIGS / config),
        "--num_machines", "2",
        "--num_processes", "2",
        "--machine_rank", str(machine_rank),
        "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port),
        *accelerate_extra,
    ]  # fmt: skip


def run_env() -> dict[str, str]:
    # LOGLEVEL=INFO: torchrun prints its launch configuration (rendezvous backend and endpoint). The venv's bin on
    # PATH: accelerate starts DeepSpeed's pdsh route as the `deepspeed` command.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO", "PATH": path}


def run_machines(
    commands: list[list[str]], cwd: Path, log_dir: Path, timeout: int = 240
) -> list[subprocess.CompletedProcess]:
    """Start every command at once (one per machine) and wait for all of them. Output goes to files: with pipes, a
    machine whose output nobody reads yet would block in a write while its peer waits for it in a collective."""
    logs = [log_dir / f"machine{i}.log" for i in range(len(commands))]
    handles = [log.open("w") for log in logs]
    processes = [
        subprocess.Popen(
            command, cwd=cwd, env=run_env(), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        for command, handle in zip(commands, handles, strict=True)
    ]
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process, handle in zip(processes, handles, strict=True):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the launcher and the ranks it started
                process.wait()
            handle.close()
    return [
        subprocess.CompletedProcess(command, process.returncode, log.read_text(), "")
        for command, process, log in zip(commands, processes, logs, strict=True)
    ]


def tail(results: list[subprocess.CompletedProcess]) -> str:
    return "\n".join(f"--- machine {i}: rc {r.returncode}\n{r.stdout[-4000:]}" for i, r in enumerate(results))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "config", "accelerate_extra", "script_extra"),
    [
        # The DDP template as docs/training.md runs it: c10d asked for on the command line (accelerate 1.15 ignores
        # the file's rdzv_backend). On loopback both nodes match 127.0.0.1, so the second is told not to host the
        # rendezvous store (on real nodes only the main node matches main_process_ip).
        ("ddp_c10d", "multi_node_template.yaml", ("--rdzv_backend", "c10d", "--mixed_precision", "no"), ()),
        ("zero3", "deepspeed_zero3.yaml", (), ("--nonfinite_loss", "raise")),
    ],
)
def test_two_machines_train_as_one_world_of_two(
    workspace,  # noqa: F811
    single_process,  # noqa: F811
    tmp_path,
    name,
    config,
    accelerate_extra,
    script_extra,
):
    """Both machines join one world of 2 ranks: disjoint halves of the data, the one-process step-1 loss.

    Fails when the feature is switched off: without ``deepspeed_multinode_launcher: standard`` in
    configuration/accelerate/deepspeed_zero3.yaml each machine starts DeepSpeed's pdsh route without a hostfile and
    trains alone as rank 0 with world size 1 (``--expected_world_size 2`` then stops both, and the seen-sample
    files would not be two halves anyway); without ``--rdzv_backend c10d`` torchrun reports the static rendezvous;
    with accelerate's ``--same_network`` the c10d endpoint is not ``127.0.0.1:port``.
    """
    output = workspace / f"multinode_{name}"
    port = free_port()
    arguments = script_arguments(workspace, output, 8, "--expected_world_size", "2", *script_extra)
    commands = []
    for machine_rank in (0, 1):
        host = ("--rdzv_conf", f"is_host={machine_rank == 0}") if "c10d" in name else ()
        commands.append([*machine_command(config, machine_rank, port, *accelerate_extra, *host), *arguments])
    results = run_machines(commands, cwd=REPO, log_dir=tmp_path)
    assert [r.returncode for r in results] == [0, 0], tail(results)

    if "c10d" in name:
        for result in results:
            launch_log = result.stdout + result.stderr
            assert "rdzv_backend             : c10d" in launch_log, tail(results)
            assert f"rdzv_endpoint            : 127.0.0.1:{port}" in launch_log, tail(results)

    ranks = seen_keys(output)
    assert len(ranks) == 2 and all(len(keys) == NUM_SAMPLES // 2 for keys in ranks), [len(k) for k in ranks]
    assert not set(ranks[0]) & set(ranks[1]), "a sample went to both machines"
    assert sorted(ranks[0] + ranks[1]) == sorted(seen_keys(single_process)[0]), "an epoch must cover every sample once"

    reference, distributed = step_terms(single_process), step_terms(output)
    assert sorted(reference) == sorted(distributed) == [1, 2, 3]
    assert_close_to_scale(distributed[1], reference[1], 1e-5, "first-step loss of two machines vs one process")


@pytest.mark.slow
def test_deepspeed_without_multinode_launcher_fails_loudly(workspace, tmp_path):  # noqa: F811
    """The DeepSpeed combination these configs shipped with (no ``deepspeed_multinode_launcher``, i.e. pdsh, and no
    hostfile) under ``--num_machines 2``: DeepSpeed proceeds "with local resources only", so machine 0 trains alone
    with world size 1 and used to exit 0. With ``--expected_world_size 2`` it now stops before training, with both
    numbers in the message. Machine 0 is started alone, as it would behave on its own node (on loopback a second
    machine's lone rank 0 would also bind 127.0.0.1:port).

    Fails when `check_world_size` is switched off (the run then exits 0 after training all 48 samples on one rank).
    It runs in ``tmp_path`` because accelerate writes ``.deepspeed_env`` into the working directory on this route.
    """
    output = tmp_path / "alone"
    command = [
        *machine_command(
            "deepspeed_zero3.yaml",
            0,
            free_port(),
            "--deepspeed_multinode_launcher",
            "pdsh",
            "--deepspeed_config_file",
            str(REPO / "configuration" / "deepspeed" / "zero3.json"),
        ),
        *script_arguments(workspace, output, 8, "--expected_world_size", "2", "--nonfinite_loss", "raise"),
    ]
    (result,) = run_machines([command], cwd=tmp_path, log_dir=tmp_path)
    assert result.returncode != 0, tail([result])
    log = result.stdout + result.stderr
    assert "Unable to find hostfile" in log, tail([result])  # the route reproduced: DeepSpeed fell back to local
    assert MESSAGE in log and "deepspeed_multinode_launcher: standard" in log, tail([result])
    assert not (output / "seen").exists(), "the run trained before it was stopped"


@pytest.mark.slow
def test_one_process_asked_for_two_fails_loudly(workspace, tmp_path):  # noqa: F811
    """A plain one-process run with ``--expected_world_size 2`` stops at start-up with both numbers.

    Fails when `check_world_size` is switched off (the run trains and exits 0).
    """
    output = tmp_path / "one"
    command = [sys.executable, *script_arguments(workspace, output, 8, "--expected_world_size", "2")]
    (result,) = run_machines([command], cwd=REPO, log_dir=tmp_path)
    assert result.returncode != 0 and MESSAGE in result.stdout, tail([result])
    assert not (output / "seen").exists(), "the run trained before it was stopped"


def test_check_world_size_compares_launcher_trainer_and_expected(monkeypatch):
    """The three numbers `check_world_size` compares. Fails when any of its comparisons is removed."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = SimpleNamespace(world_size=1, process_index=0, deepspeed=None, expected_world_size=None)
    assert check_world_size(args) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun started 2 ranks, the Trainer believes it is alone
    with pytest.raises(RuntimeError, match="exported WORLD_SIZE=2 but this run's process group has 1"):
        check_world_size(args)
    monkeypatch.setenv("WORLD_SIZE", "1")
    args.expected_world_size = 4
    with pytest.raises(RuntimeError, match=r"asked for 4 processes \(--expected_world_size 4\) but .* has 1"):
        check_world_size(args)
    args.deepspeed = "zero3.json"
    with pytest.raises(RuntimeError, match="deepspeed_multinode_launcher: standard"):
        check_world_size(args)
    args.expected_world_size = 1
    assert check_world_size(args) == 1
