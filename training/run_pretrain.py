"""Pre-train an MS-CLIP model on image-text pairs.

One process:
    python training/run_pretrain.py --model_preset msclip-s-tiny --train_data DIR --vocab BPE --output_dir OUT
Several processes (DDP) or DeepSpeed ZeRO:
    accelerate launch --config_file configuration/accelerate/multi_process.yaml training/run_pretrain.py ...
    accelerate launch --config_file configuration/accelerate/deepspeed_zero2.yaml training/run_pretrain.py ...

All options: ``python training/run_pretrain.py --help`` (model, data and transformers TrainingArguments options),
or pass one JSON file holding them. See docs/training.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `training` importable

from transformers import HfArgumentParser  # noqa: E402

from modeling_msclip.pretraining_msclip import DataArguments, ModelArguments, run_pretraining  # noqa: E402
from modeling_msclip.trainer_msclip import MSClipTrainingArguments  # noqa: E402
from training.arguments import parse_arguments_for_this_machine  # noqa: E402


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, MSClipTrainingArguments]:
    """Parse the command line (or a single ``.json`` file of arguments) for this machine."""
    parser = HfArgumentParser((ModelArguments, DataArguments, MSClipTrainingArguments))
    return parse_arguments_for_this_machine(parser, argv)


def main() -> None:
    run_pretraining(*parse_arguments())


if __name__ == "__main__":
    main()
