"""Webdataset shards (img2dataset layout): finding, reading and writing them."""

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from .records_msclip import DataStats, decode_image, describe_image, extract_caption

logger = logging.getLogger(__name__)


# Preferred order when a webdataset sample holds more than one image field.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTENSIONS = ("txt", "text", "caption")
IMAGE_FEATURE = datasets.Image(decode=False)
WEBDATASET_FEATURES = datasets.Features(
    {
        "image": IMAGE_FEATURE,
        "text": datasets.Value("string"),
        "__key__": datasets.Value("string"),
        "__url__": datasets.Value("string"),
        "json": datasets.Json(),
    }
)
# --------------------------------------------------------------------------------------------------------------------
# Webdataset shards (img2dataset layout)
# --------------------------------------------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """Split a tar member name into (sample key, field) the webdataset way: the key ends at the basename's first dot.

    ``"dir/000001.jpg" -> ("dir/000001", "jpg")``; ``"a/000001.seg.png" -> ("a/000001", "seg.png")``.
    """
    directory, _, basename = name.rpartition("/")
    if "." not in basename or basename.startswith("."):
        return None, None
    stem, _, field = basename.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field.lower()


def _assemble_webdataset_record(
    key: str, fields: dict[str, bytes], shard: str, image_field: str | None, text_field: str | None
) -> dict[str, Any]:
    image_fields = [image_field] if image_field else [ext for ext in IMAGE_EXTENSIONS if ext in fields]
    image = None
    for field in image_fields:
        if field in fields:
            image = {"bytes": fields[field], "path": f"{key}.{field}"}
            break
    metadata = None
    if "json" in fields:
        try:
            metadata = json.loads(fields["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            logger.warning("Ignoring unreadable %s.json in %s", key, shard)
    text = None
    for field in [text_field] if text_field else CAPTION_EXTENSIONS:
        if field in fields:
            text = fields[field].decode("utf-8", errors="replace")
            break
    if text is None and isinstance(metadata, Mapping) and isinstance(metadata.get("caption"), str):
        text = metadata["caption"]
    return {"image": image, "text": text, "__key__": key, "__url__": shard, "json": metadata}


def open_shard(shard: str) -> Any:
    """A binary file object for a local shard path or an fsspec URL (``s3://``, ``gs://``, ``https://``, ...)."""
    if "://" in shard:
        import fsspec

        return fsspec.open(shard, "rb").open()
    return open(shard, "rb")


def iter_webdataset_shard(
    shard: str, image_field: str | None = None, text_field: str | None = None
) -> Iterator[dict[str, Any]]:
    """Yield the samples of one tar shard as ``{"image", "text", "__key__", "__url__", "json"}`` dicts.

    Members that share a key and follow each other form one sample (img2dataset writes them so). The image is the
    first of `IMAGE_EXTENSIONS` present (or ``image_field``), the caption the first of `CAPTION_EXTENSIONS` (or
    ``text_field``), falling back to the ``caption`` of the ``.json`` member. A truncated or corrupt shard yields
    the samples before the damage and logs a warning instead of raising.
    """
    current_key, fields = None, {}
    try:
        with open_shard(shard) as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, field = split_member_name(member.name)
                if key is None:
                    continue
                if current_key is not None and key != current_key:
                    yield _assemble_webdataset_record(current_key, fields, shard, image_field, text_field)
                    fields = {}
                current_key = key
                handle = archive.extractfile(member)
                fields[field] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError) as error:
        logger.warning("Shard %s is corrupt or truncated (%r); using the samples read before the damage", shard, error)
        current_key, fields = None, {}  # the sample in progress may be incomplete
    if current_key is not None:
        yield _assemble_webdataset_record(current_key, fields, shard, image_field, text_field)


def _generate_webdataset_records(
    shards: list[str], image_field: str | None, text_field: str | None, signature: str
) -> Iterator[dict[str, Any]]:
    # `signature` (sizes and modification times) only feeds datasets' cache fingerprint.
    del signature
    for shard in shards:
        yield from iter_webdataset_shard(shard, image_field, text_field)


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style braces: ``"s/{000..002}.tar"`` and ``"{a,b}.tar"`` (nested and repeated allowed)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    prefix, suffix = pattern[: match.start()], pattern[match.end() :]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        first, last = range_match.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(prefix + option + suffix)]


def is_shard_path(path: str) -> bool:
    return path.endswith((".tar", ".tar.gz", ".tgz"))


def find_webdataset_shards(source: str) -> dict[str, list[str]]:
    """Find tar shards by split.

    ``source`` is a shard, a brace/glob pattern of shards (one split, "train"), or a folder. In a folder, shards
    directly inside form split "train" and shards inside a sub-folder form the split named after it
    (``shards/test/000000.tar`` is split "test").
    """
    if any(character in source for character in "*?[{"):
        paths = set()
        for pattern in expand_braces(source):
            if any(character in pattern for character in "*?["):
                paths.update(glob.glob(pattern))
            elif os.path.isfile(pattern):
                paths.add(pattern)
            else:
                raise FileNotFoundError(f"Shard {pattern} (from {source!r}) does not exist")
        if not paths:
            raise FileNotFoundError(f"No shard matches {source!r}")
        return {"train": sorted(paths)}
    path = Path(source)
    if path.is_file():
        return {"train": [str(path)]}
    if not path.is_dir():
        raise FileNotFoundError(f"No such shard or folder: {source}")
    splits: dict[str, list[str]] = {}
    top_level = sorted(str(child) for child in path.iterdir() if child.is_file() and is_shard_path(child.name))
    if top_level:
        splits["train"] = top_level
    for child in sorted(path.iterdir()):
        if child.is_dir():
            shards = sorted(str(grandchild) for grandchild in child.iterdir() if is_shard_path(grandchild.name))
            if shards:
                if child.name in splits:
                    raise ValueError(f"{source} has shards both at its top level and in {child}: both mean 'train'")
                splits[child.name] = shards
    if not splits:
        raise FileNotFoundError(f"No *.tar shards in {source} or in its sub-folders")
    return splits


def _files_signature(paths: Sequence[str]) -> str:
    parts = []
    for path in paths:
        status = os.stat(path)
        parts.append(f"{os.path.abspath(path)}:{status.st_size}:{status.st_mtime_ns}")
    return "|".join(parts)


def load_webdataset(
    source: str,
    split: str | None,
    streaming: bool,
    cache_dir: str | None,
    image_field: str | None,
    text_field: str | None,
) -> datasets.Dataset | datasets.IterableDataset:
    splits = find_webdataset_shards(source)
    name = choose_split(list(splits), split, source)
    gen_kwargs = {
        "shards": splits[name],
        "image_field": image_field,
        "text_field": text_field,
        "signature": _files_signature(splits[name]),
    }
    # Our own reader (instead of datasets' "webdataset" builder) so that a corrupt shard, an undecodable .txt or
    # .json, or a sample missing a field is skipped and counted rather than ending the run; the shard list is
    # still split across DataLoader workers when streaming.
    if streaming:
        return datasets.IterableDataset.from_generator(
            _generate_webdataset_records, features=WEBDATASET_FEATURES, gen_kwargs=gen_kwargs, split=name
        )
    return datasets.Dataset.from_generator(
        _generate_webdataset_records,
        features=WEBDATASET_FEATURES,
        gen_kwargs=gen_kwargs,
        cache_dir=cache_dir,
        split=datasets.NamedSplit(name),
    )


def choose_split(available: Sequence[str], split: str | None, source: Any) -> str:
    if split is None:
        if len(available) == 1:
            return available[0]
        raise ValueError(f"{source} has the splits {sorted(available)}: pass split= to choose one")
    if split not in available:
        raise ValueError(f"{source} has no split {split!r}; its splits are {sorted(available)}")
    return split


# --------------------------------------------------------------------------------------------------------------------
# Writing webdataset shards
# --------------------------------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: str | os.PathLike, *, overwrite: bool, owned: Sequence[str]) -> Path:
    """Make sure ``output_dir`` can receive new output without silently replacing anything a user saved.

    A missing folder is created and an empty one is used. A non-empty folder raises `FileExistsError` unless
    ``overwrite`` is set; then only the entries matching the glob patterns in ``owned`` (what this tool writes)
    are deleted and everything else is left alone.
    """
    import shutil

    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"The output {path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    if not any(path.iterdir()):
        return path
    if not overwrite:
        raise FileExistsError(f"The output folder {path} is not empty; pass --overwrite (overwrite=True) to replace it")
    for pattern in owned:
        for entry in path.glob(pattern):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return path


class WebDatasetShardWriter:
    """Write samples into img2dataset-layout shards ``000000.tar, 000001.tar, ...``.

    Each sample becomes ``<key>.<image extension>``, ``<key>.txt`` (the caption) and ``<key>.json`` (the caption,
    the key and any metadata). Keys are the 5-digit shard index followed by the index within the shard. Member
    times and owners are fixed, so the same samples give byte-identical shards. A shard is written under a
    ``.partial`` name and renamed when complete, so a crash never leaves a truncated ``.tar`` behind.
    """

    def __init__(self, output_dir: str | os.PathLike, *, samples_per_shard: int = 10000) -> None:
        """Configure the writer (the folder is created if needed).

        Args:
            output_dir: where the shards go.
            samples_per_shard: samples in every shard but the last.
        """
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.samples_per_shard = samples_per_shard
        self.shards: list[Path] = []
        self.num_samples = 0
        self._key_digits = len(str(samples_per_shard - 1))
        self._archive: tarfile.TarFile | None = None
        self._partial_path: Path | None = None
        self._in_shard = 0

    def __enter__(self) -> "WebDatasetShardWriter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        info.mtime = 0
        info.uname = info.gname = ""
        self._archive.addfile(info, io.BytesIO(data))

    def _finish_shard(self) -> None:
        if self._archive is None:
            return
        self._archive.close()
        final_path = self._partial_path.with_suffix("")  # "000000.tar.partial" -> "000000.tar"
        os.replace(self._partial_path, final_path)
        self.shards.append(final_path)
        self._archive = None

    def write(
        self,
        image_bytes: bytes,
        image_extension: str,
        caption: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> str:
        """Append one sample and return its key."""
        extension = image_extension.lower().lstrip(".")
        if extension not in IMAGE_EXTENSIONS:
            raise ValueError(f"Unsupported image extension {image_extension!r}; expected one of {IMAGE_EXTENSIONS}")
        if self._archive is None or self._in_shard >= self.samples_per_shard:
            self._finish_shard()
            self._partial_path = self.output_dir / f"{len(self.shards):06d}.tar.partial"
            self._archive = tarfile.open(self._partial_path, "w")
            self._in_shard = 0
        key = f"{len(self.shards):05d}{self._in_shard:0{self._key_digits}d}"
        record = {"key": key, "caption": caption}
        record.update({name: value for name, value in (metadata or {}).items() if name not in ("key", "caption")})
        self._add_member(f"{key}.{extension}", image_bytes)
        self._add_member(f"{key}.txt", caption.encode("utf-8"))
        self._add_member(f"{key}.json", json.dumps(record, sort_keys=True, default=str).encode("utf-8"))
        self._in_shard += 1
        self.num_samples += 1
        return key

    def close(self) -> list[Path]:
        """Finish the current shard and return all shard paths."""
        self._finish_shard()
        return self.shards


_PIL_FORMAT_TO_EXTENSION = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}
_EXTENSION_TO_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _raw_image_bytes(value: Any) -> bytes | None:
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)) and "://" not in os.fspath(value):
        with open(value, "rb") as handle:
            return handle.read()
    return None


def _json_safe_metadata(record: Mapping[str, Any]) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    if isinstance(record.get("json"), Mapping):
        metadata.update(record["json"])
    for name, value in record.items():
        if name in ("image", "text", "json") or name.startswith("__"):
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue  # e.g. a decoded image in a second column: not metadata
        metadata[name] = value
    return metadata


def write_webdataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    output_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 10000,
    image_format: str = "keep",
    jpeg_quality: int = 95,
    overwrite: bool = False,
    stats: DataStats | None = None,
) -> list[Path]:
    """Write a canonical image-text dataset (``image``/``text`` columns) as img2dataset-layout tar shards.

    Records with an empty caption or an undecodable image are skipped and counted in `stats`. Other columns go
    into each sample's ``.json``.

    Args:
        dataset: output of `load_image_text_dataset`.
        output_dir: folder for the shards; must be empty unless ``overwrite`` (which deletes only old ``*.tar``).
        samples_per_shard: samples per shard.
        image_format: "keep" stores the original bytes (an image whose format differs from the first image's is
            re-encoded to it, so every sample has the same extension, as loaders expect); "jpg" or "png" stores
            every image in that format (re-encoding only images in another format).
        jpeg_quality: quality for JPEG re-encoding.
        overwrite: allow a non-empty output folder.
        stats: counters to update (a new `DataStats` when omitted).

    Returns:
        The shard paths.
    """
    if image_format not in ("keep", "jpg", "png"):
        raise ValueError(f"image_format must be 'keep', 'jpg' or 'png', got {image_format!r}")
    stats = stats if stats is not None else DataStats()
    prepare_output_dir(output_dir, overwrite=overwrite, owned=("*.tar", "*.tar.partial"))
    target = None if image_format == "keep" else image_format
    seen = kept = corrupt_image = empty_caption = reencoded = 0
    with WebDatasetShardWriter(output_dir, samples_per_shard=samples_per_shard) as writer:
        for record in dataset:
            seen += 1
            caption = extract_caption(record, "text", "first")
            if caption is None:
                empty_caption += 1
                stats.log_skip("empty caption", describe_image(record.get("image")))
                continue
            try:
                image = decode_image(record.get("image"))
                raw = _raw_image_bytes(record.get("image"))
                source_format = Image.open(io.BytesIO(raw)).format if raw is not None else None
            except Exception as error:  # skip and count, never end the run
                corrupt_image += 1
                stats.log_skip("corrupt image", f"{describe_image(record.get('image'))}: {error!r}")
                continue
            extension = _PIL_FORMAT_TO_EXTENSION.get(source_format)
            if target is None:
                target = extension if extension in _EXTENSION_TO_PIL_FORMAT else "png"
            if extension != target:
                buffer = io.BytesIO()
                options = {"quality": jpeg_quality} if target == "jpg" else {}
                image.save(buffer, format=_EXTENSION_TO_PIL_FORMAT[target], **options)
                raw = buffer.getvalue()
                reencoded += 1
            writer.write(raw, target, caption, _json_safe_metadata(record))
            kept += 1
    if reencoded:
        logger.info("Re-encoded %d images to %s so that every sample has the same extension", reencoded, target)
    stats.add(seen=seen, kept=kept, skipped_corrupt_image=corrupt_image, skipped_empty_caption=empty_caption)
    return writer.shards
