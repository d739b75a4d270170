"""Diagnostics of a saved MS-CLIP model on paired image-caption data: modality gap, per-layer modality NMI and
attention similarity (modeling_msclip/diagnostics_msclip.py; docs/evaluation.md gives the definitions).

    python training/run_diagnostics.py --model CHECKPOINT_DIR --data CAPTIONS_DIR --output OUT_DIR

Prints the numbers and writes diagnostics.json and diagnostics.png into the (new or empty) output folder.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modeling_msclip.diagnostics_msclip import (
    POOLINGS,
    collect_diagnostics,
    format_diagnostics,
    plot_diagnostics,
)
from modeling_msclip.evaluation_msclip import load_eval_dataset, load_model_and_processor, to_jsonable


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: diagnostics of a saved MS-CLIP model on paired image-caption data."""
    parser = argparse.ArgumentParser(description="Modality gap, per-layer modality NMI and attention similarity")
    parser.add_argument("--model", required=True, help="directory written by save_pretrained (model + processor)")
    parser.add_argument(
        "--data",
        required=True,
        help="imagefolder with metadata.jsonl (file_name, text) or a saved dataset with image and text columns",
    )
    parser.add_argument("--output", required=True, help="output directory (must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output directory")
    parser.add_argument("--max-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--pooling", choices=POOLINGS, default="mean", help="token pooling for the NMI")
    parser.add_argument("--normalize-nmi", action="store_true", help="L2-normalise pooled features before k-means")
    args = parser.parse_args(argv)

    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        parser.error(f"output directory {output} is not empty; pass --overwrite to write into it")

    model, processor = load_model_and_processor(args.model, args.device, attn_implementation="eager")
    dataset = load_eval_dataset(args.data, args.max_samples)
    results = collect_diagnostics(
        model,
        processor,
        dataset,
        image_column=args.image_column,
        text_column=args.text_column,
        batch_size=args.batch_size,
        text_pooling=args.pooling,
        image_pooling=args.pooling,
        normalize_for_nmi=args.normalize_nmi,
    )
    print(format_diagnostics(results))
    output.mkdir(parents=True, exist_ok=True)
    (output / "diagnostics.json").write_text(json.dumps(to_jsonable(results), indent=2) + "\n")
    plot_path = plot_diagnostics(results, output / "diagnostics.png")
    print(f"wrote {output / 'diagnostics.json'} and {plot_path}")
    return results


if __name__ == "__main__":
    main()
