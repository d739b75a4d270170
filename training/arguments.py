"""Command-line parsing shared by the entry scripts (the library parses no command line)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from modeling_msclip.trainer_msclip import configure_cpu_distributed_state


def _requested(args: Sequence[str], settings: dict[str, Any], name: str, default: Any) -> Any:
    """The value of ``--name`` in a command line (``--name v`` or ``--name=v``) or a JSON settings dict."""
    if name in settings:
        return settings[name]
    for index, argument in enumerate(args):
        if argument == f"--{name}" and index + 1 < len(args):
            return args[index + 1]
        if argument.startswith(f"--{name}="):
            return argument.split("=", 1)[1]
    return default


def parse_arguments_for_this_machine(parser: HfArgumentParser, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse a command line (or a single ``.json`` file of arguments) into ``parser``'s dataclasses, adding the
    `configure_cpu_distributed_state` overrides. DeepSpeed is recognised from ``--deepspeed``, the JSON file or an
    ``accelerate launch`` DeepSpeed config (``ACCELERATE_USE_DEEPSPEED``)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    from_json = len(args) == 1 and args[0].endswith(".json")
    settings = json.loads(Path(args[0]).read_text()) if from_json else {}
    uses_deepspeed = bool(settings.get("deepspeed")) or any(a.split("=")[0] == "--deepspeed" for a in args)
    uses_deepspeed = uses_deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    timeout = int(_requested(args, settings, "ddp_timeout", TrainingArguments.ddp_timeout))
    overrides = configure_cpu_distributed_state(uses_deepspeed, timeout)
    if from_json:
        return parser.parse_dict({**settings, **overrides})
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return parser.parse_args_into_dataclasses(args)
