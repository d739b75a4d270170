"""Evaluate an MS-CLIP checkpoint: zero-shot classification, image-text retrieval, linear probe, shapes tasks.

    python training/run_evaluation.py --model CKPT --shapes-data data/shapes --output results/shapes.json
    python training/run_evaluation.py --model CKPT --zero-shot-data data/fashion-mnist --split test \
        --zero-shot-format classfolder --retrieval-data data/fashion-mnist --output results/fashion-mnist.json

Data may be in any format the project's one loader (data_msclip.load_dataset) reads: class folders
(root/<class>/*.png), image folders with a metadata.jsonl of captions and/or labels (--label-column), CSV/TSV/JSONL/
Parquet tables, webdataset shards, save_to_disk folders, Hub datasets, or the embedded shapes dataset (--shapes-data
runs every shapes zero-shot task and retrieval). The format is detected by the rules of docs/data.md; --format (or
--zero-shot-format, --retrieval-format, --linear-probe-format) names it: a folder with a metadata.jsonl is an image
folder, so the class sub-folders next to one (Fashion-MNIST) need classfolder. Prints a table; --output writes JSON.

CKPT is a dual encoder (MSClipModel / MSClipForPreTraining). A fine-tuned classifier (MSClipForImageClassification)
has no text tower: zero-shot, retrieval and the shapes tasks refuse it (its accuracy is the eval_results.json of
run_finetune_classification.py --eval_data); the linear probe runs on its vision features.
All options: ``python training/run_evaluation.py --help``. See docs/finetuning.md and docs/evaluation.md.
"""

from modeling_msclip.evaluation_msclip import main

if __name__ == "__main__":
    main()
