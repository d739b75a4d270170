"""Evaluate an MS-CLIP checkpoint: zero-shot classification, image-text retrieval, linear probe, shapes tasks.

    python training/run_evaluation.py --model CKPT --shapes_data data/shapes --output results/shapes.json
    python training/run_evaluation.py --model CKPT --zero_shot_data data/fashion-mnist --split test \
        --zero_shot_format classfolder --retrieval_data data/fashion-mnist --output results/fashion-mnist.json

Data may be in any format the project's one loader (data_msclip.load_dataset) reads: class folders
(root/<class>/*.png), image folders with a metadata.jsonl of captions and/or labels (--label_column), CSV/TSV/JSONL/
Parquet tables, webdataset shards, save_to_disk folders, Hub datasets, or the embedded shapes dataset (--shapes_data
runs every shapes zero-shot task and retrieval). The format is detected by the rules of docs/data.md; --format (or
--zero_shot_format, --retrieval_format, --linear_probe_format) names it: a folder with a metadata.jsonl is an image
folder, so the class sub-folders next to one (Fashion-MNIST) need classfolder. Prints a table; --output writes JSON.

CKPT is a dual encoder (MSClipModel / MSClipForPreTraining). A fine-tuned classifier (MSClipForImageClassification)
has no text tower: zero-shot, retrieval and the shapes tasks refuse it (its accuracy is the eval_results.json of
run_finetune_classification.py --eval_data); the linear probe runs on its vision features.
All options: ``python training/run_evaluation.py --help``. See docs/finetuning.md and docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `processing` importable

from modeling_msclip.data_msclip import FORMATS  # noqa: E402
from modeling_msclip.encoding_msclip import (  # noqa: E402
    image_classifier_refusal,
    is_image_classifier_checkpoint,
    load_image_classifier_features,
    load_model_and_processor,
)
from modeling_msclip.evaluation_msclip import (  # noqa: E402
    DEFAULT_TEMPLATES,
    evaluate_linear_probe,
    evaluate_retrieval,
    evaluate_zero_shot,
    format_results_table,
    load_eval_dataset,
    save_results_json,
)
from modeling_msclip.records_msclip import read_nonempty_lines  # noqa: E402
from processing.shapes_dataset import evaluate_shapes_dataset  # noqa: E402

# The options whose evaluations need a text tower (refused for a fine-tuned image classifier).
TEXT_TASK_OPTIONS = ("--zero_shot_data", "--retrieval_data", "--shapes_data")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point: run the requested evaluations, print a table and write JSON."""
    parser = argparse.ArgumentParser(description="Evaluate an MS-CLIP checkpoint (zero-shot, retrieval, linear probe)")
    parser.add_argument(
        "--model",
        required=True,
        help="directory written by save_pretrained (model + processor): an MSClipModel/MSClipForPreTraining; a "
        "fine-tuned MSClipForImageClassification is accepted for the linear probe only (no text tower)",
    )
    parser.add_argument(
        "--zero_shot_data",
        "--zero-shot-data",
        help="labelled data: class folders, saved dataset, imagefolder with labels",
    )
    parser.add_argument("--class_names", "--class-names", help="text file, one class name per line in label order")
    parser.add_argument("--templates", help="text file, one template with a {} placeholder per line")
    parser.add_argument(
        "--retrieval_data",
        "--retrieval-data",
        help="captioned data: imagefolder with metadata.jsonl, CSV/JSONL, shards",
    )
    parser.add_argument(
        "--linear_probe_train",
        "--linear-probe-train",
        help="labelled data for fitting (same formats as --zero_shot_data)",
    )
    parser.add_argument("--linear_probe_test", "--linear-probe-test", help="labelled data for scoring")
    parser.add_argument(
        "--shapes_data", "--shapes-data", help="the shapes dataset written by processing/make_shapes_dataset.py"
    )
    parser.add_argument(
        "--shapes_split", "--shapes-split", default="test", help="split of --shapes_data to evaluate (default: test)"
    )
    parser.add_argument(
        "--shapes_tasks", "--shapes-tasks", help="comma-separated shapes zero-shot tasks (default: all)"
    )
    parser.add_argument("--split", help="split of --zero_shot_data / --retrieval_data when they hold several")
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMATS,
        help="format of every data option (default auto: detected, see docs/data.md); a folder with a "
        "metadata.jsonl is an image folder, so class sub-folders next to one need classfolder",
    )
    for option, data in (
        ("zero-shot", "--zero_shot_data"),
        ("retrieval", "--retrieval_data"),
        ("linear-probe", "both --linear_probe_* sources"),
    ):
        underscored = option.replace("-", "_")
        parser.add_argument(
            f"--{underscored}_format",
            f"--{option}-format",
            choices=FORMATS,
            help=f"format of {data} (default: --format)",
        )
    parser.add_argument(
        "--image_column", "--image-column", help="image column of a table or datasets source (default: detected)"
    )
    parser.add_argument(
        "--text_column", "--text-column", help="caption column of the retrieval data (default: detected)"
    )
    parser.add_argument("--label_column", "--label-column", help="label column of the labelled data (default: label)")
    parser.add_argument(
        "--max_samples",
        "--max-samples",
        type=int,
        help="use at most this many records of each dataset (a seeded random subset)",
    )
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--output", help="JSON file for the results")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    args = parser.parse_args(argv)
    if not (args.zero_shot_data or args.retrieval_data or args.linear_probe_train or args.shapes_data):
        parser.error(
            "give at least one of --zero_shot_data, --retrieval_data, --linear_probe_train/_test, --shapes_data"
        )
    if bool(args.linear_probe_train) != bool(args.linear_probe_test):
        parser.error("--linear_probe_train and --linear_probe_test go together")
    if args.output and Path(args.output).exists() and not args.overwrite:
        parser.error(f"{args.output} exists; pass --overwrite to replace it")

    if is_image_classifier_checkpoint(args.model):
        options = [option for option in TEXT_TASK_OPTIONS if getattr(args, option[2:])]
        if options:
            parser.error(image_classifier_refusal(args.model, " and ".join(options)))
        model, processor = load_image_classifier_features(args.model, args.device)
    else:
        model, processor = load_model_and_processor(args.model, args.device)
    class_names = read_nonempty_lines(args.class_names) if args.class_names else None
    columns = {"image_column": args.image_column}
    labelled = {"purpose": "classification", "label_column": args.label_column, "class_names": class_names, **columns}
    results: dict[str, Any] = {}
    if args.zero_shot_data:
        dataset = load_eval_dataset(
            args.zero_shot_data,
            args.max_samples,
            split=args.split,
            format=args.zero_shot_format or args.format,
            require_class_names=True,
            **labelled,
        )
        results["zeroshot"] = evaluate_zero_shot(
            model,
            processor,
            dataset,
            class_names,
            (read_nonempty_lines(args.templates) if args.templates else None) or DEFAULT_TEMPLATES,
            batch_size=args.batch_size,
        )
    if args.retrieval_data:
        dataset = load_eval_dataset(
            args.retrieval_data,
            args.max_samples,
            split=args.split,
            purpose="retrieval",
            format=args.retrieval_format or args.format,
            text_column=args.text_column,
            **columns,
        )
        results["retrieval"] = evaluate_retrieval(model, processor, dataset, batch_size=args.batch_size)
    if args.linear_probe_train:
        probe_format = args.linear_probe_format or args.format
        results["linear_probe"] = evaluate_linear_probe(
            model,
            processor,
            load_eval_dataset(args.linear_probe_train, args.max_samples, format=probe_format, **labelled),
            load_eval_dataset(args.linear_probe_test, args.max_samples, format=probe_format, **labelled),
            batch_size=args.batch_size,
            device=args.device,
        )
    if args.shapes_data:
        tasks = [task.strip() for task in args.shapes_tasks.split(",") if task.strip()] if args.shapes_tasks else None
        shapes_results = evaluate_shapes_dataset(
            model,
            processor,
            args.shapes_data,
            split=args.shapes_split,
            tasks=tasks,
            batch_size=args.batch_size,
            max_samples=args.max_samples,
        )
        results.update({f"shapes_{key}": value for key, value in shapes_results.items()})
    print(format_results_table(results))
    if args.output:
        print(f"results written to {save_results_json(results, args.output, overwrite=args.overwrite)}")
    return results


if __name__ == "__main__":
    main()
