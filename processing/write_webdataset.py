"""Write webdataset tar shards (img2dataset layout) from an image folder or a CSV/TSV/JSONL file.

Each shard ``000000.tar, 000001.tar, ...`` holds ``<key>.jpg``/``<key>.png`` (the image), ``<key>.txt`` (the
caption) and ``<key>.json`` (caption, key and the source's other columns). Records with an unreadable image or an
empty caption are skipped and counted.

Usage::

    python processing/write_webdataset.py --input data/shapes --split train --output shards/train \
        [--format auto|imagefolder|csv|tsv|jsonl] [--image_column COL] [--text_column COL] \
        [--samples_per_shard 10000] [--image_format keep|jpg|png] [--overwrite]
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

try:
    from modeling_msclip.data_msclip import load_image_text_dataset
    from modeling_msclip.records_msclip import DataStats
    from modeling_msclip.webdataset_msclip import write_webdataset
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from modeling_msclip.data_msclip import load_image_text_dataset
    from modeling_msclip.records_msclip import DataStats
    from modeling_msclip.webdataset_msclip import write_webdataset


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="image folder (with metadata.jsonl/csv) or CSV/TSV/JSONL file")
    parser.add_argument("--output", required=True, help="folder for the shards")
    parser.add_argument("--format", default="auto", choices=("auto", "imagefolder", "csv", "tsv", "jsonl"))
    parser.add_argument("--split", default=None, help="split of an image folder with split sub-folders")
    parser.add_argument(
        "--image_column", "--image-column", default=None, help="column with image paths (auto-detected)"
    )
    parser.add_argument("--text_column", "--text-column", default=None, help="column with captions (auto-detected)")
    parser.add_argument("--samples_per_shard", "--samples-per-shard", type=int, default=10000)
    parser.add_argument("--image_format", "--image-format", default="keep", choices=("keep", "jpg", "png"))
    parser.add_argument("--overwrite", action="store_true", help="replace old *.tar shards in --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stats = DataStats()
    try:
        dataset = load_image_text_dataset(
            args.input,
            format=args.format,
            image_column=args.image_column,
            text_column=args.text_column,
            split=args.split,
        )
        shards = write_webdataset(
            dataset,
            args.output,
            samples_per_shard=args.samples_per_shard,
            image_format=args.image_format,
            overwrite=args.overwrite,
            stats=stats,
        )
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {stats.kept} samples in {len(shards)} shards to {args.output}")
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
