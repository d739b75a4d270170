"""Evaluate an MS-CLIP checkpoint: zero-shot classification, image-text retrieval, linear probe, shapes tasks.

    python training/run_evaluation.py --model CKPT --shapes-data data/shapes --output results/shapes.json
    python training/run_evaluation.py --model CKPT --zero-shot-data data/fashion-mnist --split test \
        --retrieval-data data/fashion-mnist --output results/fashion-mnist.json

Data may be in any format the project's loaders read: class folders (root/<class>/*.png), image folders with a
metadata.jsonl of captions, CSV/TSV/JSONL tables, webdataset shards, save_to_disk folders, or the embedded shapes
dataset (--shapes-data runs every shapes zero-shot task and retrieval). Prints a table; --output writes JSON.
All options: ``python training/run_evaluation.py --help``. See docs/finetuning.md and docs/evaluation.md.
"""

from modeling_msclip.evaluation_msclip import main

if __name__ == "__main__":
    main()
