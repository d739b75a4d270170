"""Diagnostics of a saved MS-CLIP model on paired image-caption data: modality gap, per-layer modality NMI and
attention similarity (modeling_msclip/diagnostics_msclip.py; docs/evaluation.md gives the definitions).

    python training/run_diagnostics.py --model CHECKPOINT_DIR --data CAPTIONS_DIR --output OUT_DIR

Prints the numbers and writes diagnostics.json and diagnostics.png into the (new or empty) output folder.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from modeling_msclip.diagnostics_msclip import (
    POOLINGS,
    collect_diagnostics,
    format_diagnostics,
    plot_diagnostics,
)
from modeling_msclip.encoding_msclip import load_model_and_processor
from modeling_msclip.evaluation_msclip import load_eval_dataset, to_jsonable


@dataclass
class DiagnosticsArguments:
    """Which model, on which paired data, written where."""

    model: str = field(metadata={"help": "directory written by save_pretrained (model + processor)"})
    data: str = field(
        metadata={
            "help": "imagefolder with metadata.jsonl (file_name, text) or a saved dataset with image and text columns"
        }
    )
    output: str = field(metadata={"help": "output directory (must be new or empty)"})
    overwrite: bool = field(default=False, metadata={"help": "allow writing into a non-empty output directory"})
    max_samples: int = field(default=1000, metadata={"help": "pairs read from --data"})
    batch_size: int = field(default=32, metadata={"help": "pairs encoded at once"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)"})
    image_column: str = field(default="image", metadata={"help": "image column of --data"})
    text_column: str = field(default="text", metadata={"help": "caption column of --data"})
    pooling: str = field(default="mean", metadata={"help": "token pooling for the NMI", "choices": list(POOLINGS)})
    normalize_nmi: bool = field(default=False, metadata={"help": "L2-normalise pooled features before k-means"})


def run_diagnostics(args: DiagnosticsArguments) -> dict[str, Any]:
    """Diagnostics of ``args.model`` on ``args.data``: printed, and written to ``args.output`` as diagnostics.json
    and diagnostics.png.

    Raises:
        FileExistsError: when the output folder is not empty and ``args.overwrite`` is not set.
    """
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise FileExistsError(f"output directory {output} is not empty; pass --overwrite to write into it")
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: diagnostics of a saved MS-CLIP model on paired image-caption data (exit status 2 on a refused output)."""
    parser = HfArgumentParser(
        DiagnosticsArguments, description="Modality gap, per-layer modality NMI and attention similarity"
    )
    (args,) = parser.parse_args_into_dataclasses(list(argv) if argv is not None else sys.argv[1:])
    try:
        return run_diagnostics(args)
    except FileExistsError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
