"""Build an MS-CLIP tokenizer directory: from the CLIP vocabulary, or trained on your own captions.

Usage:
    python processing/build_tokenizer.py --vocab bpe_simple_vocab_16e6.txt.gz --output tokenizer/ [--overwrite]
    python processing/build_tokenizer.py --vocab path/to/clip-vit-base-patch32 --output tokenizer/
    python processing/build_tokenizer.py --train_from captions.jsonl --vocab_size 8192 --output tokenizer/

``--vocab`` takes OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` or a transformers CLIP tokenizer directory
(``vocab.json`` + ``merges.txt``); both give the official ids. ``--train_from`` learns new merges from the captions
of any dataset the data layer reads (JSONL/CSV/TSV tables, image folders with ``metadata.jsonl``, webdataset shards,
saved datasets; see docs/data.md), e.g. for non-English or domain text.

The output directory loads with ``AutoTokenizer.from_pretrained(output)`` once ``modeling_msclip`` is imported, or
with ``trust_remote_code=True`` anywhere (``tokenization_msclip.py`` is copied into it). The merges file itself is
not copied: it is OpenAI's file and ``tokenizer.json`` holds everything the tokenizer needs.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

try:
    import modeling_msclip  # noqa: F401
except ModuleNotFoundError:  # run as a script from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_msclip.data_msclip import FORMATS, iter_captions
from modeling_msclip.tokenization_msclip import MSClipTokenizer, build_msclip_tokenizer, train_msclip_tokenizer

# SHA-256 of OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz (identical in the MS-CLIP repository).
OFFICIAL_VOCAB_SHA256 = "fc496842c2d4b6e40b2bd1207a5ded6e425e6a7cf9c16afa86caa5d7d12df233"
# Captions used to check that the saved directory reloads to the same tokenizer.
ROUND_TRIP_CAPTIONS = ["a photo of a cat", "Hello, World!", "café &amp; <|endoftext|> 123", ""]


def file_sha256(path: Path) -> str:
    """Return the hexadecimal SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--vocab", type=Path, help="bpe_simple_vocab_16e6.txt.gz, or a CLIP tokenizer folder (vocab.json + merges.txt)"
    )
    source.add_argument(
        "--train_from", "--train-from", help="dataset whose captions to learn the merges from (any data format)"
    )
    parser.add_argument(
        "--vocab_size", "--vocab-size", type=int, help="with --train_from: vocabulary size, special tokens included"
    )
    parser.add_argument(
        "--min_frequency",
        "--min-frequency",
        type=int,
        default=2,
        help="with --train_from: least count of a merged pair",
    )
    parser.add_argument("--format", default="auto", choices=FORMATS, help="with --train_from: the dataset's format")
    parser.add_argument("--split", help="with --train_from: the split to read (default: the only one)")
    parser.add_argument(
        "--text_column", "--text-column", help="with --train_from: the caption column (default: detected)"
    )
    parser.add_argument(
        "--max_records", "--max-records", type=int, help="with --train_from: read at most this many records"
    )
    parser.add_argument("--output", type=Path, required=True, help="directory to write the tokenizer into")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output directory")
    parser.add_argument(
        "--truncation_style",
        "--truncation-style",
        choices=["keep_end", "official"],
        default="keep_end",
        help="default truncation of over-length captions saved with the tokenizer (see docs/processor.md)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build, save and verify the tokenizer; return the process exit status."""
    args = parse_args(argv)
    if args.train_from is not None and args.vocab_size is None:
        print("error: --train_from needs --vocab_size", file=sys.stderr)
        return 2
    if args.vocab is not None and not args.vocab.exists():
        print(f"error: vocabulary not found: {args.vocab}", file=sys.stderr)
        return 2
    if args.output.exists() and not args.output.is_dir():
        print(f"error: --output {args.output} exists and is not a directory", file=sys.stderr)
        return 2
    if args.output.is_dir() and any(args.output.iterdir()) and not args.overwrite:
        print(f"error: --output {args.output} is not empty; pass --overwrite to write into it", file=sys.stderr)
        return 2

    try:
        if args.train_from is not None:
            captions = iter_captions(
                args.train_from,
                format=args.format,
                split=args.split,
                text_column=args.text_column,
                limit=args.max_records,
            )
            tokenizer = train_msclip_tokenizer(
                captions, args.vocab_size, min_frequency=args.min_frequency, truncation_style=args.truncation_style
            )
        else:
            if args.vocab.is_file() and (digest := file_sha256(args.vocab)) != OFFICIAL_VOCAB_SHA256:
                print(f"warning: {args.vocab} has SHA-256 {digest}, not the official CLIP file's", file=sys.stderr)
            tokenizer = build_msclip_tokenizer(args.vocab, truncation_style=args.truncation_style)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.output)

    reloaded = MSClipTokenizer.from_pretrained(args.output)
    expected = tokenizer(ROUND_TRIP_CAPTIONS)["input_ids"]
    if reloaded(ROUND_TRIP_CAPTIONS)["input_ids"] != expected:
        print(f"error: the tokenizer saved in {args.output} does not reload to the same ids", file=sys.stderr)
        return 1
    print(f"MS-CLIP tokenizer (vocabulary {len(tokenizer)}) written to {args.output}, which now holds:")
    for path in sorted(args.output.iterdir()):
        print(f"  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
