"""Fine-tune an MS-CLIP checkpoint for image classification with the plain transformers `Trainer`.

    python training/run_finetune_classification.py --model_name_or_path CKPT \
        --train_data data/fashion-mnist --train_split train --eval_data data/fashion-mnist --eval_split test \
        --format classfolder \
        --output_dir runs/fmnist-ft --max_steps 500 --per_device_train_batch_size 64 --learning_rate 1e-4 \
        --eval_strategy steps --eval_steps 100

CKPT is an MSClipModel or MSClipForPreTraining folder (its vision tower is loaded; ``--init_head_from_text`` starts
the head as the zero-shot classifier), or use ``--model_preset msclip-s-tiny`` to train from scratch. Data are class
folders (root/<class>/*.png), image folders or tables with a label column, save_to_disk folders or Hub datasets with
image + label columns, read by data_msclip.load_dataset; ``--format`` names the format instead of detecting it (the
Fashion-MNIST tree has a metadata.jsonl next to its class folders, so it needs ``--format classfolder``).

All options: ``python training/run_finetune_classification.py --help`` (model, data and transformers
TrainingArguments options), or pass one JSON file holding them. See docs/finetuning.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `training` importable

from transformers import (
    HfArgumentParser,  # noqa: E402
    TrainingArguments,  # noqa: E402
)

from modeling_msclip.checkpointing_msclip import OutputArguments  # noqa: E402
from modeling_msclip.finetuning_msclip import DataArguments, ModelArguments, run_finetuning  # noqa: E402
from training.arguments import parse_arguments_for_this_machine  # noqa: E402


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, OutputArguments]:
    """Parse the command line (or a single ``.json`` file of arguments) for this machine."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, OutputArguments))
    return parse_arguments_for_this_machine(parser, argv)


def main() -> None:
    run_finetuning(*parse_arguments())


if __name__ == "__main__":
    main()
