"""The one loader of image-text and labelled image data for MS-CLIP: `load_dataset`, with one format detection,
`detect_format`.

It serves pre-training, evaluation and fine-tuning, and returns a `datasets.Dataset` (or `datasets.IterableDataset`
when streaming) with the canonical columns of its task:

* ``image``: a `datasets.Image(decode=False)` value, i.e. ``{"bytes": ..., "path": ...}``, so nothing is decoded
  while the dataset is read and a corrupt file cannot crash a run there;
* ``text`` (task "image-text"): the caption (a string, or None when the source had none);
* ``label`` (task "classification"): made a `datasets.ClassLabel` by `prepare_labels`.

Images are decoded in the collators (`collators_msclip`), which drop records with an unreadable image or an empty
caption and count them in a `records_msclip.DataStats`. Webdataset shards are read and written by
`webdataset_msclip`, images transformed by `transforms_msclip`.
"""

import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets

from .records_msclip import clean_caption_value
from .webdataset_msclip import IMAGE_EXTENSIONS, IMAGE_FEATURE, choose_split, is_shard_path, load_webdataset

logger = logging.getLogger(__name__)


FORMATS = ("auto", "imagefolder", "csv", "tsv", "jsonl", "parquet", "webdataset", "hub", "classfolder", "disk")
IMAGE_COLUMN_CANDIDATES = ("image", "img", "image_path", "filepath", "file_path", "file_name", "path", "jpg", "png")
TEXT_COLUMN_CANDIDATES = ("text", "caption", "captions", "txt", "sentence", "sentences", "description", "title")
METADATA_FILENAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
_NO_METADATA = "__msclip_no_metadata__"


def iter_captions(
    source: str | os.PathLike,
    *,
    format: str = "auto",
    split: str | None = None,
    text_column: str | None = None,
    limit: int | None = None,
) -> Iterator[str]:
    """Every non-empty caption of a dataset, read lazily without decoding images.

    Reads any source `load_dataset` reads, image-text datasets and caption-only tables alike (streamed, so a large
    dataset is not loaded whole); a record with several captions yields each of them. Used to train a tokenizer on
    one's own captions.

    Args:
        source: the dataset (image folder, CSV/TSV/JSONL, webdataset shards, saved dataset, Hub name).
        format: one of `FORMATS`.
        split: split to read (None: the only one).
        text_column: caption column (auto-detected when None).
        limit: stop after this many records.

    Yields:
        Stripped captions.
    """
    dataset = load_dataset(source, format=format, task="captions", split=split, text_column=text_column, streaming=True)
    for number, record in enumerate(dataset):
        if limit is not None and number >= limit:
            return
        value = record.get("text")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            caption = clean_caption_value(item)
            if caption:
                yield caption


# --------------------------------------------------------------------------------------------------------------------
# Loading image-text datasets
# --------------------------------------------------------------------------------------------------------------------


def pick_split(loaded: Any, split: str | None, source: Any) -> datasets.Dataset | datasets.IterableDataset:
    """``loaded`` itself, or its split ``split`` when it is a dataset dict (``None``: its only split; an error
    naming the splits otherwise)."""
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return loaded[choose_split(list(loaded), split, source)]
    return loaded


TASKS = ("image-text", "classification", "captions")
LABEL_COLUMN_CANDIDATES = ("label",)
TABLE_FORMATS = ("csv", "tsv", "jsonl", "parquet")
# A path that does not exist and ends in one of these is a local path with a typo, never a Hub dataset id.
LOCAL_FILE_EXTENSIONS = (
    ".csv",
    ".tsv",
    ".tab",
    ".json",
    ".jsonl",
    ".parquet",
    ".arrow",
    ".tar",
    ".tgz",
    ".gz",
    ".zip",
    ".txt",
    *(f".{extension}" for extension in IMAGE_EXTENSIONS),
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_PATTERN_CHARACTERS = "*?[{"


def looks_like_local_path(source: str | os.PathLike) -> bool:
    """Whether a path is meant as a local one (so that, when it does not exist, it is an error, not a Hub id).

    Local-looking: absolute; starting with ``.`` or ``~`` (``./x``, ``../x``); holding a backslash or two or more
    ``/``; ending in a file extension of `LOCAL_FILE_EXTENSIONS` (``.jsonl``, ``.csv``, ``.tar``, ``.parquet``,
    ...); or ``dir/name`` where the folder ``dir`` exists here.
    """
    source = os.fspath(source)
    if os.path.isabs(source) or source.startswith((".", "~")) or "\\" in source or source.count("/") >= 2:
        return True
    if source.lower().endswith(LOCAL_FILE_EXTENSIONS):
        return True
    parent = os.path.dirname(source)
    return bool(parent) and os.path.isdir(parent)


def looks_like_hub_id(source: str | os.PathLike) -> bool:
    """Whether ``source`` reads as a Hub dataset id: ``name`` or ``owner/name`` (letters, digits, ``_``, ``.``,
    ``-``) that is not a local-looking path (see `looks_like_local_path`)."""
    source = os.fspath(source)
    return _HUB_ID.fullmatch(source) is not None and not looks_like_local_path(source)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _is_image_file_name(name: str) -> bool:
    stem, dot, extension = name.rpartition(".")
    return bool(dot and stem) and extension.lower() in IMAGE_EXTENSIONS


def _list_folder(folder: Path) -> tuple[list[str], list[str]]:
    """The sorted (file names, sub-folder names) of a folder; hidden entries are left out."""
    files, folders = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                folders.append(entry.name)
            elif entry.is_file():
                files.append(entry.name)
    return sorted(files), sorted(folders)


def _holds_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(entry.is_file() and _is_image_file_name(entry.name) for entry in entries)


def folder_layout(root: str | os.PathLike) -> dict[str, list[str]]:
    """What a folder holds at its top level and one level down, as paths relative to it.

    Returns:
        ``{"shards": [...], "metadata": [...], "class_folders": [...], "images": [...]}``: ``*.tar`` shards,
        ``metadata.jsonl/csv/parquet`` files, class folders (a sub-folder that holds images and no metadata file,
        ``root/<class>/``, or a sub-folder of a split folder that holds images, ``root/<split>/<class>/``) and up
        to three image files lying directly in ``root``.
    """
    root = Path(root)
    layout: dict[str, list[str]] = {"shards": [], "metadata": [], "class_folders": [], "images": []}
    files, folders = _list_folder(root)
    layout["shards"] += [name for name in files if is_shard_path(name.lower())]
    layout["metadata"] += [name for name in files if name in METADATA_FILENAMES]
    layout["images"] += [name for name in files if _is_image_file_name(name)][:3]
    for folder in folders:
        sub_files, sub_folders = _list_folder(root / folder)
        layout["shards"] += [f"{folder}/{name}" for name in sub_files if is_shard_path(name.lower())]
        metadata = [f"{folder}/{name}" for name in sub_files if name in METADATA_FILENAMES]
        layout["metadata"] += metadata
        if not metadata and any(_is_image_file_name(name) for name in sub_files):
            layout["class_folders"].append(folder)
        if not any(_is_image_file_name(name) for name in sub_files):  # a split folder: its sub-folders may be classes
            layout["class_folders"] += [f"{folder}/{sub}" for sub in sub_folders if _holds_images(root / folder / sub)]
    return layout


def _class_names_of(class_folders: Sequence[str]) -> list[str]:
    return sorted({folder.rpartition("/")[2] for folder in class_folders})


def _some(paths: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f", ... ({len(paths)} in all)" if len(paths) > limit else "")


def _no_captions_error(source: Any) -> ValueError:
    return ValueError(
        f"{source} is read as class folders (root/<class>/*.png): class folders carry no captions, so they cannot "
        "be image-text pairs for pre-training or retrieval. Add a metadata.jsonl with file_name and a caption "
        "column (then it is an image folder), or use the data for classification (zero-shot, linear probe, "
        "fine-tuning)."
    )


def _detect_folder_format(path: Path, source: str) -> str:
    if _is_saved_dataset(path):
        return "disk"
    layout = folder_layout(path)
    candidates: dict[str, list[str]] = {}
    if layout["shards"]:
        candidates["webdataset"] = layout["shards"]
    if layout["metadata"]:
        candidates["imagefolder"] = layout["metadata"]
    elif len(_class_names_of(layout["class_folders"])) >= 2:
        candidates["classfolder"] = [f"{folder}/" for folder in layout["class_folders"]]
    if len(candidates) == 1:
        return next(iter(candidates))
    if candidates:
        listed = "; ".join(f"format='{name}' ({_some(paths)})" for name, paths in candidates.items())
        raise ValueError(f"The folder {source} fits several formats: {listed}. Pass format= to choose one.")
    if layout["class_folders"]:
        reason = (
            f"it holds one image sub-folder ({layout['class_folders'][0]}/) and no metadata file: class folders "
            "need at least two classes, and an image folder needs a metadata.jsonl (file_name and caption or label "
            "columns)"
        )
    elif layout["images"]:
        reason = (
            f"it holds images ({_some(layout['images'])}) but no metadata file: an image folder needs a "
            "metadata.jsonl (file_name and caption or label columns) next to them"
        )
    else:
        reason = (
            f"it holds no *.tar shards, no {'/'.join(METADATA_FILENAMES)} and no class folders "
            "(root/<class>/*.png), directly or one level down"
        )
    raise ValueError(f"Cannot tell the format of the folder {source}: {reason}. Pass format= (one of {FORMATS[1:]}).")


def detect_format(source: str | os.PathLike, *, split: str | None = None) -> str:
    """The format of a source path, by one set of rules for every task (see docs/data.md, "Format detection").

    When ``split`` names a sub-folder of a folder ``source``, that split folder (what is read) is examined.

    * a glob/brace pattern, or a URL ending in ``.tar`` -> "webdataset";
    * a file: ``*.csv`` -> "csv", ``*.tsv``/``*.tab`` -> "tsv", ``*.jsonl``/``*.json`` -> "jsonl",
      ``*.parquet`` -> "parquet", ``*.tar``/``*.tar.gz``/``*.tgz`` -> "webdataset";
    * a folder written by ``save_to_disk`` (``state.json`` / ``dataset_dict.json``) -> "disk";
    * a folder with ``*.tar`` shards (directly or one level down) -> "webdataset";
    * a folder with a ``metadata.jsonl``/``metadata.csv``/``metadata.parquet`` (directly or one level down)
      -> "imagefolder", also when its images sit in sub-folders;
    * a folder with at least two image sub-folders (``root/<class>/``, ``root/<split>/<class>/``) and no
      metadata file -> "classfolder";
    * a path that does not exist: a Hub id (`looks_like_hub_id`: ``name`` or ``owner/name``) -> "hub", anything
      else -> `FileNotFoundError` naming it.

    A folder that fits several formats (shards next to an image folder or class folders) is refused with a
    `ValueError` that lists the candidates; so is a folder that fits none.
    """
    source = os.fspath(source)
    if split is not None and (Path(source) / split).is_dir() and not _is_saved_dataset(Path(source)):
        source = os.path.join(source, split)
    if any(character in source for character in _PATTERN_CHARACTERS):
        return "webdataset"
    if "://" in source:
        if is_shard_path(source.lower()):
            return "webdataset"
        raise ValueError(f"Cannot tell the format of the URL {source}: pass format= (shard URLs end in .tar)")
    path = Path(source)
    if path.is_file():
        lower = path.name.lower()
        if lower.endswith(".csv"):
            return "csv"
        if lower.endswith((".tsv", ".tab")):
            return "tsv"
        if lower.endswith((".jsonl", ".json")):
            return "jsonl"
        if lower.endswith(".parquet"):
            return "parquet"
        if is_shard_path(lower):
            return "webdataset"
        raise ValueError(
            f"Cannot tell the format of the file {source}: expected .csv, .tsv, .jsonl, .parquet or .tar; pass format="
        )
    if path.is_dir():
        return _detect_folder_format(path, source)
    if looks_like_hub_id(source):
        return "hub"
    where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
    hint = ""
    if _HUB_ID.fullmatch(source) and not source.lower().endswith(LOCAL_FILE_EXTENSIONS):
        hint = "; to load a Hub dataset of that name anyway, pass format='hub'"
    raise FileNotFoundError(f"No such file or folder: {source!r}{where}{hint}")


def _column_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)  # features unknown (e.g. a generator): look at one record
    if first is None:
        raise ValueError("The dataset is empty")
    return list(first)


def _find_column(columns: Sequence[str], requested: str | None, candidates: Sequence[str], what: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"The {what} column {requested!r} is not among the dataset's columns {list(columns)}")
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    lowered = {column.lower(): column for column in columns}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    raise ValueError(f"Cannot find the {what} column among {list(columns)}: pass {what}_column=")


def _resolve_image_paths(batch: dict[str, list[Any]], column: str, base_dir: str) -> dict[str, list[Any]]:
    resolved = []
    for value in batch[column]:
        if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
            resolved.append(None)
            continue
        value = str(value).strip()
        if "://" not in value and not os.path.isabs(value):
            value = os.path.normpath(os.path.join(base_dir, value))
        resolved.append({"bytes": None, "path": value})
    return {column: resolved}


def _rename(
    dataset: datasets.Dataset | datasets.IterableDataset, old: str, new: str, columns: Sequence[str]
) -> datasets.Dataset | datasets.IterableDataset:
    if old == new:
        return dataset
    if new in columns:
        raise ValueError(
            f"Cannot rename the selected column {old!r} to {new!r}: the dataset already has a different {new!r} "
            "column. Rename or remove it first."
        )
    return dataset.rename_column(old, new)


def _undecoded_image_column(
    dataset: datasets.Dataset | datasets.IterableDataset, image_column: str, image_base_dir: str | os.PathLike | None
) -> datasets.Dataset | datasets.IterableDataset:
    """Make ``image_column`` an undecoded `datasets.Image`; paths are resolved against ``image_base_dir`` if given."""
    features = dataset.features
    feature = features.get(image_column) if features is not None else None
    if image_base_dir is not None and not isinstance(feature, (datasets.Image, dict)):
        new_features = None
        if features is not None:
            new_features = features.copy()
            new_features[image_column] = IMAGE_FEATURE
        return dataset.map(
            _resolve_image_paths,
            batched=True,
            fn_kwargs={"column": image_column, "base_dir": os.path.abspath(image_base_dir)},
            features=new_features,
        )
    castable = isinstance(feature, datasets.Value) and feature.dtype in (
        "string",
        "large_string",
        "binary",
        "large_binary",
    )
    if isinstance(feature, datasets.Image) or castable:
        return dataset.cast_column(image_column, IMAGE_FEATURE)
    return dataset


def _has_candidate(columns: Sequence[str], candidates: Sequence[str]) -> bool:
    lowered = {column.lower() for column in columns}
    return any(candidate in columns or candidate in lowered for candidate in candidates)


def prepare_image_text_columns(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    image_column: str | None = None,
    text_column: str | None = None,
    image_base_dir: str | os.PathLike | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Give a dataset the canonical ``image`` (undecoded `datasets.Image`) and ``text`` columns.

    Args:
        dataset: any image-text dataset.
        image_column: the column holding images or image paths; detected from `IMAGE_COLUMN_CANDIDATES` if None.
        text_column: the caption column; detected from `TEXT_COLUMN_CANDIDATES` if None.
        image_base_dir: when given, the image column holds paths relative to this folder (CSV/JSONL sources).

    Returns:
        The dataset with ``image`` and ``text`` columns; other columns are kept.
    """
    columns = _column_names(dataset)
    features = dataset.features
    if (
        text_column is None
        and features is not None
        and isinstance(features.get("label"), datasets.ClassLabel)
        and not _has_candidate(columns, TEXT_COLUMN_CANDIDATES)
    ):
        raise _no_captions_error(f"The dataset with columns {columns}")
    image_column = _find_column(columns, image_column, IMAGE_COLUMN_CANDIDATES, "image")
    text_column = _find_column(columns, text_column, TEXT_COLUMN_CANDIDATES, "text")
    dataset = _undecoded_image_column(dataset, image_column, image_base_dir)
    dataset = _rename(dataset, image_column, "image", columns)
    return _rename(dataset, text_column, "text", [c if c != image_column else "image" for c in columns])


def _no_label_column_error(columns: Sequence[str], source: Any, split: str | None) -> ValueError:
    where = f"{source}" + (f" (split {split})" if split else "")
    message = (
        f"{where} has no label column: classification needs one (detected: {'/'.join(LABEL_COLUMN_CANDIDATES)}), "
        f"and its columns are {list(columns)}. Pass label_column= (--label_column) naming the "
        "column that holds each image's class."
    )
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        folder = Path(source) / split if split and (Path(source) / split).is_dir() else Path(source)
        classes = _class_names_of(folder_layout(folder)["class_folders"])
        if len(classes) >= 2:
            message += (
                f" Its sub-folders look like class folders ({_some(classes, 5)}): to take the folder names as the "
                "classes, pass format='classfolder' (--format classfolder)."
            )
    return ValueError(message)


def prepare_classification_columns(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    image_base_dir: str | os.PathLike | None = None,
    source: Any = "The dataset",
    split: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Give a dataset the canonical ``image`` (undecoded `datasets.Image`) and ``label`` columns.

    The label column is ``label_column``, else the first of `LABEL_COLUMN_CANDIDATES` present; without one this
    raises a `ValueError` naming the columns found (and suggesting ``format="classfolder"`` when ``source`` is a
    folder whose sub-folders look like class folders). A different column named ``label`` is dropped. The labels
    themselves are left as they are: `prepare_labels` turns them into a `ClassLabel`.
    """
    columns = _column_names(dataset)
    image_column = _find_column(columns, image_column, IMAGE_COLUMN_CANDIDATES, "image")
    if label_column is not None:
        if label_column not in columns:
            raise ValueError(f"The label column {label_column!r} is not among the dataset's columns {columns}")
    else:
        lowered = {column.lower(): column for column in columns}
        found = [lowered[name] for name in LABEL_COLUMN_CANDIDATES if name in lowered]
        if not found:
            raise _no_label_column_error(columns, source, split)
        label_column = found[0]
    dataset = _undecoded_image_column(dataset, image_column, image_base_dir)
    dataset = _rename(dataset, image_column, "image", columns)
    if label_column != "label":
        if "label" in columns:
            dataset = dataset.remove_columns("label")
        dataset = dataset.rename_column(label_column, "label")
    return dataset


def _imagefolder_files(root: str, split: str | None) -> dict[str, Any]:
    # A split folder is read on its own: with data_dir alone, datasets lists and prepares every split.
    split_dir = Path(root) / split if split is not None else None
    if split_dir is not None and split_dir.is_dir():
        return {"data_files": {split: [str(split_dir / "**")]}}
    return {"data_dir": root}


def _to_iterable(dataset: datasets.Dataset) -> datasets.IterableDataset:
    # Several shards, so that DataLoader workers each get a part of the data.
    return dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 64)))


_DATASET_OBJECTS = (datasets.Dataset, datasets.IterableDataset, datasets.DatasetDict, datasets.IterableDatasetDict)


def _task_columns(
    dataset: datasets.Dataset | datasets.IterableDataset,
    task: str,
    *,
    image_column: str | None,
    text_column: str | None,
    label_column: str | None,
    image_base_dir: str | os.PathLike | None = None,
    source: Any = "The dataset",
    split: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    if task == "image-text":
        return prepare_image_text_columns(
            dataset, image_column=image_column, text_column=text_column, image_base_dir=image_base_dir
        )
    if task == "captions":  # a caption table needs no image column (tokenizer training)
        columns = _column_names(dataset)
        return _rename(dataset, _find_column(columns, text_column, TEXT_COLUMN_CANDIDATES, "text"), "text", columns)
    return prepare_classification_columns(
        dataset,
        image_column=image_column,
        label_column=label_column,
        image_base_dir=image_base_dir,
        source=source,
        split=split,
    )


def load_dataset(
    source: str | os.PathLike | datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict,
    *,
    format: str = "auto",
    task: str = "image-text",
    split: str | None = None,
    streaming: bool = False,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a dataset for pre-training, evaluation or fine-tuning: the one loader of the project.

    ``format="auto"`` decides with `detect_format` (the same rules for every task). Formats:

    * ``"imagefolder"``: a folder of images with ``metadata.jsonl`` / ``metadata.csv`` / ``metadata.parquet``
      holding ``file_name`` and caption or label columns (images may sit in sub-folders); split sub-folders
      (``train/``, ``validation/``, ``test/``) become splits, and a split folder is read on its own.
    * ``"csv"``, ``"tsv"``, ``"jsonl"``, ``"parquet"``: a table of image paths (relative to the table's folder, or
      absolute) and captions or labels. TSV is read without quote handling, as CC3M-style files need.
    * ``"webdataset"``: tar shards as img2dataset writes them (``<key>.jpg``/``.png`` + ``<key>.txt`` and
      ``<key>.json``): a shard, a glob/brace pattern, or a folder (sub-folders are splits). Here
      ``image_column``/``text_column`` name the member extensions. Image-text only.
    * ``"classfolder"``: ``root/<class_name>/*.png`` or ``root/<split>/<class_name>/*`` (metadata files ignored);
      ``label`` is a `datasets.ClassLabel` over the sorted folder names. Classification only: class folders carry
      no captions.
    * ``"disk"``: a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder.
    * ``"hub"``: a Hub dataset id, loaded with `datasets.load_dataset`. With ``format="auto"`` only a missing
      path that looks like ``name`` or ``owner/name`` is one (`looks_like_hub_id`); a missing local-looking path
      is a `FileNotFoundError` naming it.
    * a `datasets.Dataset` / `IterableDataset` / `DatasetDict` object is used as it is.

    Images are left undecoded (``datasets.Image(decode=False)``); the collators decode them and skip bad ones.

    Args:
        source: path, pattern, Hub id or datasets object.
        format: one of `FORMATS`.
        task: ``"image-text"`` (canonical ``image`` + ``text`` columns) or ``"classification"`` (canonical
            ``image`` + ``label``; pass the result to `prepare_labels` for a `ClassLabel` and the class names), or
            ``"captions"`` (a canonical ``text`` column, no image needed: caption-only tables for a tokenizer).
        split: split to return; None picks the only split and raises if there are several.
        streaming: return a lazily read `datasets.IterableDataset`.
        image_column: column with the image or image path (detected from `IMAGE_COLUMN_CANDIDATES` when None).
        text_column: caption column, image-text and captions tasks (detected from `TEXT_COLUMN_CANDIDATES` when None).
        label_column: label column, classification task (``label`` when None; without one, an error naming the
            columns found).
        cache_dir: datasets cache folder (defaults to datasets' own).

    Returns:
        A `datasets.Dataset`, or a `datasets.IterableDataset` when streaming; other columns are kept.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: an unknown format or task, a layout that fits several formats or none, class folders for the
            image-text task, a missing column.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}; expected one of {FORMATS}")
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}")
    columns = {"image_column": image_column, "text_column": text_column, "label_column": label_column}
    if isinstance(source, _DATASET_OBJECTS):
        dataset = pick_split(source, split, "The dataset")
        if streaming and isinstance(dataset, datasets.Dataset):
            dataset = _to_iterable(dataset)
        return _task_columns(dataset, task, **columns)
    source = os.fspath(source)
    path = Path(source)
    if split is not None and path.is_dir() and not _is_saved_dataset(path) and _is_saved_dataset(path / split):
        source, path, split = str(path / split), path / split, None  # a saved dataset per split folder
    kind = detect_format(source, split=split) if format == "auto" else format
    if kind == "classfolder":
        if task in ("image-text", "captions"):
            raise _no_captions_error(source)
        if label_column not in (None, "label"):
            raise ValueError(
                f"Class folders have one label column, 'label' (the folder names); label_column={label_column!r} "
                "does not apply to them"
            )
        dataset, class_names = load_class_folder_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
        if len(class_names) < 2:
            logger.warning("%s holds %d class folder(s): %s", source, len(class_names), class_names)
        return dataset
    if kind == "webdataset":
        if task == "classification":
            raise ValueError(
                f"Webdataset shards ({source}) are read for the image-text task only; for classification use an "
                "image folder with a label column, class folders, a table or a saved dataset"
            )
        return load_webdataset(source, split, streaming, cache_dir, image_column, text_column)
    if kind == "disk":
        if not path.is_dir():
            raise FileNotFoundError(f"No such save_to_disk folder: {source}")
        dataset = pick_split(datasets.load_from_disk(source), split, source)
        if streaming:
            dataset = _to_iterable(dataset)
        return _task_columns(dataset, task, source=source, split=split, **columns)
    if kind == "imagefolder":
        if not path.exists():
            raise FileNotFoundError(f"No such image folder: {source}")
        if not path.is_dir():
            raise NotADirectoryError(f"An imagefolder source must be a folder: {source}")
        loaded = datasets.load_dataset(
            "imagefolder", **_imagefolder_files(source, split), split=split, streaming=streaming, cache_dir=cache_dir
        )
        dataset = pick_split(loaded, split, source)
        return _task_columns(dataset, task, source=source, split=split, **{**columns, "image_column": "image"})
    if kind in TABLE_FORMATS:
        if not path.is_file():
            raise FileNotFoundError(f"No such {kind.upper()} file: {source}")
        name = split or "train"
        options: dict[str, Any] = {}
        if kind in ("csv", "tsv"):
            # Only empty cells are missing: a caption reading "NA" or "null" stays text.
            options = {"keep_default_na": False, "na_values": [""]}
            if kind == "tsv":
                options.update(delimiter="\t", quoting=3)  # csv.QUOTE_NONE
        builder = {"jsonl": "json", "tsv": "csv"}.get(kind, kind)
        dataset = datasets.load_dataset(
            builder, data_files={name: source}, split=name, streaming=streaming, cache_dir=cache_dir, **options
        )
        return _task_columns(dataset, task, image_base_dir=path.parent, source=source, split=split, **columns)
    loaded = datasets.load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
    return _task_columns(pick_split(loaded, split, source), task, source=source, split=split, **columns)


def load_image_text_dataset(
    source: str | os.PathLike | datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict,
    *,
    format: str = "auto",
    image_column: str | None = None,
    text_column: str | None = None,
    split: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Image-text pairs with canonical ``image`` and ``text`` columns: ``load_dataset(source, task="image-text",
    ...)`` (see `load_dataset` for the formats). Class folders are refused: they carry no captions."""
    return load_dataset(
        source,
        format=format,
        task="image-text",
        split=split,
        streaming=streaming,
        image_column=image_column,
        text_column=text_column,
        cache_dir=cache_dir,
    )


def class_name_from_folder(folder_name: str) -> str:
    """Readable class name of a class folder: underscores become spaces (``"ankle_boot" -> "ankle boot"``)."""
    return folder_name.replace("_", " ")


def load_class_folder_dataset(
    root: str | os.PathLike,
    *,
    split: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, list[str]]:
    """Load ``root/<class_name>/*.png`` (or ``root/<split>/<class_name>/*``) for classification.

    Metadata files in the tree are ignored, so a captioned image folder whose images sit in class sub-folders
    (as `processing/fashion_mnist.py` writes it) also loads as class folders; ``format="auto"`` reads such a folder
    as an image folder (it has a metadata file), so ask for class folders with ``format="classfolder"``.

    Returns:
        The dataset with ``image`` (undecoded) and ``label`` (a `datasets.ClassLabel` over the sorted folder
        names) columns, and the readable class names in label order (see `class_name_from_folder`).
    """
    root = os.fspath(root)
    if not Path(root).is_dir():
        raise NotADirectoryError(f"A class-folder source must be a folder: {root}")
    loaded = datasets.load_dataset(
        "imagefolder",
        **_imagefolder_files(root, split),
        metadata_filenames=[_NO_METADATA],
        drop_labels=False,
        split=split,
        streaming=streaming,
        cache_dir=cache_dir,
    )
    dataset = pick_split(loaded, split, root).cast_column("image", IMAGE_FEATURE)
    label_feature = dataset.features["label"]
    return dataset, [class_name_from_folder(name) for name in label_feature.names]


def _is_labelled(value: Any) -> bool:
    return value is not None and value != "" and not (isinstance(value, int) and value < 0)


def _labelled(labels: list[Any]) -> list[bool]:
    return [_is_labelled(value) for value in labels]


def prepare_labels(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    require_class_names: bool = False,
) -> tuple[datasets.Dataset | datasets.IterableDataset, list[str]]:
    """Turn the labels of a classification dataset into a `datasets.ClassLabel` ``label`` column.

    The step after ``load_dataset(..., task="classification")``. Records with a missing, empty or negative label
    are dropped (with a warning). Labels may be a `ClassLabel` (renamed by ``class_names`` when given, which must
    be as many), strings (encoded in sorted order) or integers (named by ``class_names``, else by their number,
    unless ``require_class_names``, which makes that an error: zero-shot prompts need real names). A streamed
    dataset needs a `ClassLabel` (its names cannot be collected without reading it all).

    Args:
        dataset: a dataset with the label column.
        label_column: the column with the labels, renamed to ``label`` (a different ``label`` column is dropped).
        class_names: names in label order, for integer labels (or to rename a `ClassLabel`'s classes).
        require_class_names: refuse integer labels that have no names.

    Returns:
        The dataset and the readable class names in label order (underscores become spaces, as in class folders).
    """
    columns = _column_names(dataset)
    if label_column not in columns:
        raise ValueError(f"The label column {label_column!r} is not among the dataset's columns {columns}")
    if label_column != "label":
        if "label" in columns:
            dataset = dataset.remove_columns("label")
        dataset = dataset.rename_column(label_column, "label")
    feature = dataset.features["label"] if dataset.features is not None else None
    if isinstance(dataset, datasets.IterableDataset):
        if not isinstance(feature, datasets.ClassLabel):
            raise ValueError(
                "The labels of a streamed dataset must be a ClassLabel (their names cannot be collected without "
                "reading the whole dataset): load it with streaming=False"
            )
        dataset = dataset.filter(_labelled, input_columns="label", batched=True)
    else:
        before = len(dataset)
        dataset = dataset.filter(_labelled, input_columns="label", batched=True)
        if len(dataset) < before:
            logger.warning("Dropped %d record(s) without a label", before - len(dataset))
    if isinstance(feature, datasets.ClassLabel):
        if class_names is not None:
            if len(class_names) != feature.num_classes:
                raise ValueError(f"{len(class_names)} class names given for {feature.num_classes} classes")
            dataset = dataset.cast_column("label", datasets.ClassLabel(names=list(class_names)))
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        dataset = dataset.class_encode_column("label")
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        num_classes = max(dataset["label"], default=-1) + 1
        if class_names is None and require_class_names:
            raise ValueError("The labels are plain integers without class names: pass the class names (--class_names)")
        if class_names is None:
            class_names = [str(index) for index in range(num_classes)]
        elif len(class_names) < num_classes:
            raise ValueError(f"Label {num_classes - 1} occurs but only {len(class_names)} class names were given")
        dataset = dataset.cast_column("label", datasets.ClassLabel(names=list(class_names)))
    else:
        raise ValueError(f"The label column must hold class ids or class names, not {feature}")
    return dataset, [class_name_from_folder(name) for name in dataset.features["label"].names]
