"""Generate the embedded shapes dataset (no download) as an image folder or webdataset shards.

Usage::

    python processing/make_shapes_dataset.py --output data/shapes --num_train 5000 --num_test 1000 \
        [--num_validation 500] [--image_size 64] [--seed 0] [--format imagefolder|webdataset] \
        [--samples_per_shard 1000] [--two_object_probability 0.3] [--overwrite]

See processing/shapes_dataset.py and docs/data.md for the content and the splits.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a file, sys.path[0] is processing/ itself: the repository root makes `processing` (and, in a checkout
# without `pip install -e .`, `modeling_msclip`) importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from processing.shapes_dataset import ShapesConfig, write_shapes_dataset  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--num_train", "--num-train", type=int, default=5000)
    parser.add_argument("--num_validation", "--num-validation", type=int, default=500)
    parser.add_argument("--num_test", "--num-test", type=int, default=1000)
    parser.add_argument("--image_size", "--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", default="imagefolder", choices=("imagefolder", "webdataset"))
    parser.add_argument("--samples_per_shard", "--samples-per-shard", type=int, default=1000)
    parser.add_argument("--two_object_probability", "--two-object-probability", type=float, default=0.3)
    parser.add_argument("--overwrite", action="store_true", help="replace a previous output in --output")
    args = parser.parse_args(argv)
    try:
        config = ShapesConfig(
            image_size=args.image_size, seed=args.seed, two_object_probability=args.two_object_probability
        )
        root = write_shapes_dataset(
            args.output,
            num_train=args.num_train,
            num_validation=args.num_validation,
            num_test=args.num_test,
            config=config,
            data_format=args.format,
            samples_per_shard=args.samples_per_shard,
            overwrite=args.overwrite,
        )
    except (FileExistsError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.num_train} train, {args.num_validation} validation and {args.num_test} test images "
        f"({args.format}, {args.image_size}x{args.image_size}) to {root}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
