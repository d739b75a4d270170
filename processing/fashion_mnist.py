"""Turn the Fashion-MNIST idx files into a captioned image folder that also loads as class folders.

Input: the four standard files (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``, gzipped or not), e.g. from Debian's
``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``, files in
/usr/share/datasets/fashion-mnist).

Output::

    OUT/train/<class_folder>/00000.png ...   OUT/train/metadata.jsonl
    OUT/test/<class_folder>/00000.png ...    OUT/test/metadata.jsonl
    OUT/classes.json

``metadata.jsonl`` has ``file_name``, ``text`` (a caption from `CAPTION_TEMPLATES`), ``class_name`` and
``fashion_mnist_label`` (the original 0-9 label). Load it for contrastive training with
``load_image_text_dataset(OUT, split="train")`` and for zero-shot evaluation with
``load_class_folder_dataset(OUT, split="test")`` (labels then follow the sorted folder names).

Usage::

    python processing/fashion_mnist.py --output data/fashion-mnist [--input_dir DIR] [--limit_train N]
        [--limit_test N] [--seed 0] [--overwrite]
"""

import argparse
import gzip
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

try:
    from modeling_msclip.webdataset_msclip import prepare_output_dir
except ModuleNotFoundError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from modeling_msclip.webdataset_msclip import prepare_output_dir

DEFAULT_INPUT_DIR = "/usr/share/datasets/fashion-mnist"
# The names CLIP-style zero-shot benchmarks use, in Fashion-MNIST label order.
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a grayscale photo of a {}.",
    "a product photo of a {}.",
)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# idx type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the content of an idx file: 2 zero bytes, a type code, the number of dimensions, the dimensions as
    big-endian uint32, then the values in C order.

    Raises:
        ValueError naming ``name`` when the header or the length is wrong.
    """
    if len(data) < 4:
        raise ValueError(f"{name}: too short for an idx header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{name}: not an idx file (the magic number must start with two zero bytes)")
    type_code, num_dims = data[2], data[3]
    if type_code not in IDX_DTYPES:
        raise ValueError(f"{name}: unknown idx type code 0x{type_code:02x}")
    if num_dims == 0:
        raise ValueError(f"{name}: an idx file needs at least one dimension")
    header_size = 4 + 4 * num_dims
    if len(data) < header_size:
        raise ValueError(f"{name}: truncated idx header")
    shape = tuple(int(value) for value in np.frombuffer(data, dtype=">u4", count=num_dims, offset=4))
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header_size != expected:
        raise ValueError(
            f"{name}: shape {shape} needs {expected} bytes of values, the file has {len(data) - header_size}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file, gzipped (``.gz``) or not."""
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
        return parse_idx(handle.read(), str(path))


def _find_idx_file(input_dir: Path, stem: str) -> Path:
    for candidate in (input_dir / f"{stem}.gz", input_dir / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{stem}(.gz) not found in {input_dir}; install Debian's dataset-fashion-mnist package or pass --input_dir"
    )


def load_fashion_mnist_split(input_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images [N, 28, 28] uint8, labels [N] uint8)`` of the "train" or "test" split."""
    if split not in IDX_FILES:
        raise ValueError(f"split must be one of {tuple(IDX_FILES)}, got {split!r}")
    images_stem, labels_stem = IDX_FILES[split]
    images = read_idx(_find_idx_file(Path(input_dir), images_stem))
    labels = read_idx(_find_idx_file(Path(input_dir), labels_stem))
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{split}: expected images [N, H, W] and labels [N], got {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{split}: label {int(labels.max())} is out of range for {len(FASHION_MNIST_CLASSES)} classes")
    return images.astype(np.uint8), labels.astype(np.int64)


def fix_articles(caption: str) -> str:
    """Turn "a" before a vowel into "an" ("a photo of a ankle boot." -> "a photo of an ankle boot.")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", caption)


def class_folder_name(class_name: str) -> str:
    """Folder name of a class: spaces become underscores (``load_class_folder_dataset`` turns them back)."""
    return class_name.replace(" ", "_")


def write_fashion_mnist(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the captioned class-folder tree described in the module docstring.

    Args:
        input_dir: folder with the idx files.
        output_dir: target folder; must be empty unless ``overwrite`` (which replaces only ``train/``, ``test/``
            and ``classes.json``).
        limit_train: keep only the first N training images.
        limit_test: keep only the first N test images.
        seed: seed of the caption-template choice.
        overwrite: allow replacing a previous output.

    Returns:
        The number of images written per split.
    """
    # Read the input before touching the output, so a wrong --input_dir never costs an earlier result.
    splits = {}
    for split, limit in (("train", limit_train), ("test", limit_test)):
        images, labels = load_fashion_mnist_split(input_dir, split)
        splits[split] = (images[:limit], labels[:limit]) if limit is not None else (images, labels)
    root = prepare_output_dir(output_dir, overwrite=overwrite, owned=("train", "test", "classes.json"))
    rng = np.random.default_rng(seed)
    written = {}
    for split, (images, labels) in splits.items():
        split_dir = root / split
        for class_name in FASHION_MNIST_CLASSES:
            (split_dir / class_folder_name(class_name)).mkdir(parents=True, exist_ok=True)
        with open(split_dir / "metadata.jsonl", "w", encoding="utf-8") as metadata_file:
            for index, (pixels, label) in enumerate(zip(images, labels)):
                class_name = FASHION_MNIST_CLASSES[int(label)]
                file_name = f"{class_folder_name(class_name)}/{index:05d}.png"
                Image.fromarray(pixels, mode="L").save(split_dir / file_name)
                template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
                caption = fix_articles(template.format(class_name))
                row = {
                    "file_name": file_name,
                    "text": caption,
                    "class_name": class_name,
                    "fashion_mnist_label": int(label),
                }
                metadata_file.write(json.dumps(row) + "\n")
        written[split] = len(images)
    with open(root / "classes.json", "w", encoding="utf-8") as classes_file:
        json.dump(
            {"classes": list(FASHION_MNIST_CLASSES), "templates": list(CAPTION_TEMPLATES)}, classes_file, indent=2
        )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--input_dir", "--input-dir", default=DEFAULT_INPUT_DIR, help="folder with the idx(.gz) files")
    parser.add_argument(
        "--limit_train", "--limit-train", type=int, default=None, help="keep only the first N training images"
    )
    parser.add_argument(
        "--limit_test", "--limit-test", type=int, default=None, help="keep only the first N test images"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the caption choice")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous output in --output")
    args = parser.parse_args(argv)
    try:
        written = write_fashion_mnist(
            args.input_dir,
            args.output,
            limit_train=args.limit_train,
            limit_test=args.limit_test,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written['train']} train and {written['test']} test images to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
