"""Pre-train an MS-CLIP model on image-text pairs.

One process:
    python training/run_pretrain.py --model_preset msclip-s-tiny --train_data DIR --vocab BPE --output_dir OUT
Several processes (DDP) or DeepSpeed ZeRO:
    accelerate launch --config_file configuration/accelerate/multi_process.yaml training/run_pretrain.py ...
    accelerate launch --config_file configuration/accelerate/deepspeed_zero2.yaml training/run_pretrain.py ...

All options: ``python training/run_pretrain.py --help`` (model, data and transformers TrainingArguments options),
or pass one JSON file holding them. See docs/training.md.
"""

from modeling_msclip.pretraining_msclip import parse_pretraining_arguments, run_pretraining


def main() -> None:
    run_pretraining(*parse_pretraining_arguments())


if __name__ == "__main__":
    main()
