"""What the entry scripts share: the arguments naming a model and its processor, and command-line parsing (the
library parses no command line)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from modeling_msclip.trainer_msclip import configure_cpu_distributed_state


@dataclass
class CheckpointArguments:
    """Where a model and its processor come from (shared by pre-training and fine-tuning)."""

    model_preset: str | None = field(
        default=None, metadata={"help": "Named architecture preset to start from scratch (e.g. msclip-s-b32)."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Saved MS-CLIP checkpoint to start from (inference or pre-training)."}
    )
    processor_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Saved MSClipProcessor (default: the model folder, else one from --tokenizer_name_or_path)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "aliases": ["--vocab"],
            "help": "Tokenizer to build the processor from: a saved MSClipTokenizer folder (e.g. one trained with "
            "processing/build_tokenizer.py --train_from), a CLIP tokenizer folder (vocab.json + merges.txt) or "
            "bpe_simple_vocab_16e6.txt.gz. From a preset, the text tower's vocabulary follows it.",
        },
    )
    image_preset: str = field(default="msclip", metadata={"help": "Image statistics: 'msclip' (ImageNet) or 'clip'."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager, sdpa or flash_attention_2."})
    patch_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Share of patch tokens each image drops while training (FLIP; default: the config's, usually 0). "
            "0.5 makes the vision tower about twice as cheap per pair; not with MS-CLIP-S's parallel branch."
        },
    )

    def processor_options(self) -> dict[str, Any]:
        """The keyword arguments of `pretraining_msclip.build_processor` that name where the processor comes from."""
        return {
            "processor": self.processor_name_or_path,
            "checkpoint": self.model_name_or_path,
            "tokenizer": self.tokenizer_name_or_path,
            "image_preset": self.image_preset,
        }


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
