"""Preemption-safe output folders: which checkpoint to resume from, and never replacing a saved run silently.

* `CheckpointCompletionCallback` writes ``msclip_checkpoint_complete.json`` into ``checkpoint-N/`` once every rank
  has finished saving it (after a barrier). A checkpoint without the marker was killed mid-write.
* ``--resume_from_checkpoint latest`` (also ``true``/``True``) resumes from the newest complete checkpoint of
  ``--output_dir``, skipping incomplete ones with a warning, and starts from scratch when there is none, so a
  scheduler can re-run the same command after a preemption.
* `prepare_output_dir` refuses a non-empty ``--output_dir`` unless the run resumes or ``--overwrite_output_dir``
  asks to start over (then the old ``checkpoint-*`` folders are removed, so that a later ``latest`` cannot pick up
  the previous run).
* `check_resume_compatible` refuses to resume a DeepSpeed checkpoint without DeepSpeed (the optimizer and scheduler
  state would silently not be restored) and a ZeRO checkpoint on another world size, with what to do instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "msclip_checkpoint_complete.json"
LATEST = ("latest", "true", "True")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class OutputArguments:
    """What may happen to an existing output folder."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in a non-empty --output_dir: its checkpoint-* folders are deleted first and its "
            "other files are replaced as the run saves."
        },
    )


class CheckpointCompletionCallback(TrainerCallback):
    """Marks a checkpoint complete once every rank has written its part (see the module docstring)."""

    def __init__(self, deepspeed_stage: int | None = None) -> None:
        self.deepspeed_stage = deepspeed_stage

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            marker = {
                "global_step": state.global_step,
                "world_size": args.world_size,
                "deepspeed_zero_stage": self.deepspeed_stage,
            }
            temporary = folder / (COMPLETE_MARKER + ".tmp")
            temporary.write_text(json.dumps(marker))
            os.replace(temporary, folder / COMPLETE_MARKER)


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (largest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir() if (m := _CHECKPOINT_NAME.match(path.name))]
    return [path for _, path in sorted(found, reverse=True) if path.is_dir()]


def read_completion(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The completion marker of a checkpoint folder, or None when it has none (killed mid-write)."""
    marker = Path(checkpoint) / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``output_dir`` (None if there is none); newer incomplete ones are skipped
    with a warning."""
    for folder in checkpoint_folders(output_dir):
        if read_completion(folder) is not None:
            return folder
        logger.warning("skipping %s: it has no %s (the save was interrupted)", folder, COMPLETE_MARKER)
    return None


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder to resume from: ``latest`` finds the newest complete one (None: start from scratch);
    a path must exist and be complete."""
    if resume_from_checkpoint in (None, False, "", "false", "False"):
        return None
    if resume_from_checkpoint is True or resume_from_checkpoint in LATEST:
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s, starting from scratch",
                           output_dir)  # fmt: skip
            return None
        logger.warning("resuming from %s", latest)
        return str(latest)
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such checkpoint folder")
    if read_completion(path) is None:
        raise ValueError(
            f"--resume_from_checkpoint {path} has no {COMPLETE_MARKER}: its save was interrupted (or it was not "
            "written by this library); use --resume_from_checkpoint latest to take the newest complete one"
        )
    return str(path)


def check_resume_compatible(checkpoint: str | os.PathLike, deepspeed_stage: int | None, world_size: int) -> None:
    """Refuse a resume that would restore less than the checkpoint holds (see the module docstring)."""
    marker = read_completion(checkpoint) or {}
    saved_stage = marker.get("deepspeed_zero_stage")
    has_deepspeed_state = saved_stage is not None or any(Path(checkpoint).glob("global_step*"))
    if has_deepspeed_state and deepspeed_stage is None:
        raise ValueError(
            f"{checkpoint} was saved by DeepSpeed (ZeRO stage {saved_stage}); resuming it without DeepSpeed would "
            "restore no optimizer or scheduler state. Resume with the same DeepSpeed config, or start a new run "
            "from its weights (--model_name_or_path after zero_to_fp32.py)."
        )
    saved_world = marker.get("world_size")
    if deepspeed_stage is not None and saved_world is not None and saved_world != world_size:
        raise ValueError(
            f"{checkpoint} was saved by {saved_world} DeepSpeed ranks and this run has {world_size}: ZeRO partitions "
            "the optimizer state by rank. Resume with the same number of processes, or convert it with DeepSpeed's "
            "universal checkpoint tools (ds_to_universal.py) and resume with universal_checkpoint enabled."
        )


def deepspeed_zero_stage(trainer: Any) -> int | None:
    """The ZeRO stage of a built Trainer's DeepSpeed engine, or None without DeepSpeed."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    return int(trainer.accelerator.state.deepspeed_plugin.zero_stage)


def prepare_output_dir(output_dir: str | os.PathLike, resuming: bool, overwrite: bool) -> None:
    """Refuse a non-empty ``output_dir`` unless resuming or overwriting; overwriting removes old checkpoints.

    Raises:
        FileExistsError: naming the folder and both ways out.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--output_dir {path} exists and is not a folder")
    if resuming or not path.is_dir() or not any(path.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"--output_dir {path} is not empty; pass --resume_from_checkpoint latest to continue that run, or "
            "--overwrite_output_dir to start over (its checkpoint-* folders are then deleted)"
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return  # one process deletes; the folder is shared by all ranks of a node (and, for checkpoints, of a run)
    for folder in checkpoint_folders(path):
        logger.warning("--overwrite_output_dir: deleting %s of the previous run", folder)
        shutil.rmtree(folder, ignore_errors=True)


def checkpoint_to_resume(training_args: Any, overwrite: bool) -> str | None:
    """Call first thing in a run: the checkpoint to resume from (`resolve_resume_checkpoint`), after checking (and,
    with ``overwrite``, clearing) the output folder (`prepare_output_dir`)."""
    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    resuming = training_args.resume_from_checkpoint not in (None, False, "", "false", "False")
    prepare_output_dir(training_args.output_dir, resuming=resuming, overwrite=overwrite)
    return checkpoint


def attach_checkpointing(trainer: Any, checkpoint: str | None) -> None:
    """Mark the trainer's checkpoints complete when saved, and check that ``checkpoint`` can be resumed here."""
    stage = deepspeed_zero_stage(trainer)
    trainer.add_callback(CheckpointCompletionCallback(stage))
    if checkpoint is not None:
        check_resume_compatible(checkpoint, stage, trainer.args.world_size)


__all__ = [
    "COMPLETE_MARKER",
    "CheckpointCompletionCallback",
    "OutputArguments",
    "attach_checkpointing",
    "checkpoint_to_resume",
    "check_resume_compatible",
    "deepspeed_zero_stage",
    "find_latest_checkpoint",
    "prepare_output_dir",
    "read_completion",
    "resolve_resume_checkpoint",
]
