"""Tests of the image-text data pipeline: every source format with a corrupt image and an empty caption in it,
skip-and-count across DataLoader workers, transforms against the image processor, the webdataset writer and the
Fashion-MNIST idx recipe. The demo's shapes dataset has its own tests (test_shapes_dataset.py).
"""

import gzip
import importlib
import io
import json
import multiprocessing
import struct
import tarfile
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import assert_close_to_scale, close_to_scale
from PIL import Image

from modeling_msclip.collators_msclip import ImageClassificationCollator, ImageTextCollator
from modeling_msclip.data_msclip import detect_format, load_class_folder_dataset, load_image_text_dataset
from modeling_msclip.image_processing_msclip import MSClipImageProcessor
from modeling_msclip.records_msclip import DataStats, decode_image, drop_bad_records, extract_caption
from modeling_msclip.tokenization_msclip import MSClipTokenizer
from modeling_msclip.transforms_msclip import ImageProcessorTransform, TrainImageTransform
from modeling_msclip.webdataset_msclip import expand_braces, write_webdataset

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
COLOR_OF = {0: (200, 30, 30), 1: (30, 200, 30), 2: (30, 30, 200), 3: (200, 200, 30), 4: (30, 200, 200)}


def _load_script(name: str):
    """Import a processing/ script (``main`` is its command line)."""
    return importlib.import_module(f"processing.{name}")


def _image(index: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    return Image.new("RGB", size, COLOR_OF[index % len(COLOR_OF)])


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _reference_pixels(image: Image.Image, size: int = 8, mean=MEAN, std=STD) -> torch.Tensor:
    """What the evaluation transform must give: hand-written bicubic shortest-side resize, centre crop (offset rounded
    like torchvision's CenterCrop) and normalisation with PIL and numpy."""
    width, height = image.size
    short = min(width, height)
    new_size = (int(size * width / short), int(size * height / short))
    resized = image.convert("RGB").resize(new_size, Image.Resampling.BICUBIC)
    left, top = round((new_size[0] - size) / 2), round((new_size[1] - size) / 2)
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float64) / 255
    array = (array - np.array(mean)) / np.array(std)
    return torch.tensor(array.transpose(2, 0, 1), dtype=torch.float32)


# The evaluation transform of these tests: the image processor at 8 px with the tests' mean and std.
EVAL_TRANSFORM = ImageProcessorTransform(
    MSClipImageProcessor.from_preset(image_size=8, image_mean=list(MEAN), image_std=list(STD))
)


@pytest.fixture(scope="module")
def tokenizer(msclip_tokenizer_dir):
    return MSClipTokenizer.from_pretrained(msclip_tokenizer_dir)


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "hf_cache")


def _collate_all(dataset, tokenizer, batch_size=3, num_workers=0):
    collator = ImageTextCollator(tokenizer, EVAL_TRANSFORM, caption_choice="first")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
    batches = list(loader)
    return batches, collator.stats


# Captions of the records every format test writes. Record 3's image is corrupt, record 4 has an empty caption,
# record 5 a whitespace caption and record 6's image file is missing; records GOOD are the ones to keep.
CAPTIONS = ["a red box, small", 'a "quoted" green box', "a blue box", "corrupt", "", "   ", "missing file", "a cyan"]
GOOD = [0, 1, 2, 7]


def _write_images(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(len(CAPTIONS)):
        name = f"{index}.png"
        if index == 3:
            (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
        elif index != 6:
            _image(index).save(folder / name)
        names.append(name)
    return names


def _check_pipeline(dataset, tokenizer):
    """Collate everything and check the kept captions' token ids, the pixels and the counts."""
    batches, stats = _collate_all(dataset, tokenizer)
    pixels = torch.cat([batch["pixel_values"] for batch in batches])
    assert pixels.shape == (len(GOOD), 3, 8, 8)
    token_ids = [
        ids[mask.bool()].tolist() for batch in batches for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]
    assert token_ids == [tokenizer(CAPTIONS[i])["input_ids"] for i in GOOD]
    for row, index in zip(pixels, GOOD):
        assert_close_to_scale(row, _reference_pixels(_image(index)), 1e-5, f"pixels of sample {index}")
    assert stats.as_dict() == {"seen": 8, "kept": 4, "skipped_corrupt_image": 2, "skipped_empty_caption": 2}
    assert all(batch["return_loss"] is True for batch in batches)


# ---------------------------------------------------------------------------------------------------------------
# DataStats
# ---------------------------------------------------------------------------------------------------------------


def _add_many(stats: DataStats, times: int) -> None:
    for _ in range(times):
        stats.add(seen=1, kept=1)


@pytest.mark.slow
def test_data_stats_is_thread_and_process_safe():
    stats = DataStats()
    threads = [threading.Thread(target=_add_many, args=(stats, 300)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_add_many, args=(stats, 300)) for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        assert process.exitcode == 0
    # 4 threads and 3 processes, 300 locked increments each: any lost update would show.
    assert stats.seen == stats.kept == 2100
    stats.add(skipped_corrupt_image=2, skipped_empty_caption=1, seen=3)
    assert stats.skipped == 3
    assert "seen 2103, kept 2100, skipped 3 (corrupt or unreadable image 2, empty caption 1)" in stats.summary()
    stats.reset()
    assert stats.as_dict() == dict.fromkeys(DataStats.FIELDS, 0)


@pytest.mark.slow
def test_data_stats_reaches_spawned_processes():
    stats = DataStats()
    context = torch.multiprocessing.get_context("spawn")
    process = context.Process(target=stats.add, kwargs={"seen": 5, "skipped_corrupt_image": 5})
    process.start()
    process.join()
    assert process.exitcode == 0
    assert stats.as_dict() == {"seen": 5, "kept": 0, "skipped_corrupt_image": 5, "skipped_empty_caption": 0}


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------


def _imagefolder(root: Path) -> None:
    for split in ("train", "test"):
        names = _write_images(root / split)
        with open(root / split / "metadata.jsonl", "w") as handle:
            for name, caption in zip(names, CAPTIONS):
                handle.write(json.dumps({"file_name": name, "caption": caption, "extra": len(caption)}) + "\n")


@pytest.mark.parametrize("streaming", [False, True])
def test_imagefolder(tmp_path, tokenizer, cache_dir, streaming):
    _imagefolder(tmp_path / "data")
    assert detect_format(tmp_path / "data") == "imagefolder"
    dataset = load_image_text_dataset(tmp_path / "data", split="test", streaming=streaming, cache_dir=cache_dir)
    assert isinstance(dataset, datasets.IterableDataset if streaming else datasets.Dataset)
    assert set(dataset.features) == {"image", "text", "extra"}
    assert dataset.features["image"] == datasets.Image(decode=False)
    _check_pipeline(dataset, tokenizer)
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]"):
        load_image_text_dataset(tmp_path / "data", cache_dir=cache_dir)


def _table(root: Path, fmt: str) -> Path:
    names = _write_images(root / "images")
    paths = [f"images/{name}" for name in names]
    if fmt == "csv":
        import csv

        path = root / "pairs.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filepath", "title"])
            writer.writerows(zip(paths, CAPTIONS))
    elif fmt == "tsv":
        path = root / "pairs.tsv"
        lines = ["url\tcaption"] + [f"{p}\t{c}" for p, c in zip(paths, CAPTIONS)]
        path.write_text("\n".join(lines) + "\n")
    else:
        path = root / "pairs.jsonl"
        path.write_text("".join(json.dumps({"picture": p, "sentence": c}) + "\n" for p, c in zip(paths, CAPTIONS)))
    return path


@pytest.mark.parametrize("streaming", [False, True])
def test_save_to_disk_folders(tmp_path, tokenizer, cache_dir, streaming):
    names = _write_images(tmp_path / "images")
    paths = [str(tmp_path / "images" / name) for name in names]
    datasets.Dataset.from_dict({"image": paths, "text": CAPTIONS}).save_to_disk(str(tmp_path / "saved"))
    assert detect_format(tmp_path / "saved") == "disk"
    dataset = load_image_text_dataset(tmp_path / "saved", streaming=streaming)
    assert isinstance(dataset, datasets.IterableDataset if streaming else datasets.Dataset)
    _check_pipeline(dataset, tokenizer)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_table_formats_resolve_paths_relative_to_the_file(tmp_path, tokenizer, cache_dir, fmt):
    path = _table(tmp_path, fmt)
    assert detect_format(path) == fmt
    columns = {"csv": {}, "tsv": {"image_column": "url"}, "jsonl": {"image_column": "picture"}}[fmt]
    dataset = load_image_text_dataset(path, cache_dir=cache_dir, **columns)
    assert dataset[0]["image"]["path"] == str(tmp_path / "images" / "0.png")
    assert dataset[1]["text"] == 'a "quoted" green box'  # quotes survive in every format
    _check_pipeline(dataset, tokenizer)
    streamed = load_image_text_dataset(path, cache_dir=cache_dir, streaming=True, **columns)
    assert [record["text"] for record in streamed] == [record["text"] for record in dataset]


def test_missing_column_is_a_clear_error(tmp_path, cache_dir):
    path = _table(tmp_path, "jsonl")
    with pytest.raises(ValueError, match=r"image column among \['picture', 'sentence'\]: pass image_column="):
        load_image_text_dataset(path, cache_dir=cache_dir)
    with pytest.raises(ValueError, match="'nope' is not among"):
        load_image_text_dataset(path, image_column="picture", text_column="nope", cache_dir=cache_dir)
    with pytest.raises(ValueError, match="Unknown format"):
        load_image_text_dataset(path, format="xml")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no class folders .* Pass format="):
        detect_format(tmp_path / "empty_dir")


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _img2dataset_shards(folder: Path) -> None:
    """Shards written by hand in img2dataset's layout: samples 3-5 are bad, and shard 2 is truncated."""
    folder.mkdir(parents=True)
    samples = [(f"{i // 4:05d}{i % 4:04d}", i) for i in range(8)]
    for shard in range(2):
        with tarfile.open(folder / f"{shard:06d}.tar", "w") as archive:
            for key, index in samples[shard * 4 : shard * 4 + 4]:
                image = b"garbage" if index == 3 else _encoded(_image(index), "JPEG" if index % 2 else "PNG")
                _add_member(archive, f"{key}.{'jpg' if index % 2 else 'png'}", image)
                if index != 7:  # sample 7 has no .txt: its caption comes from the .json
                    _add_member(archive, f"{key}.txt", CAPTIONS[index].encode())
                _add_member(archive, f"{key}.json", json.dumps({"caption": CAPTIONS[index], "key": key}).encode())
    # A third shard cut in the middle of its second sample: the first sample must still be read.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        _add_member(archive, "0000200000.png", _encoded(_image(0)))
        _add_member(archive, "0000200000.txt", b"from the truncated shard")
        _add_member(archive, "0000200001.png", _encoded(_image(1), "PNG") * 3)
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as archive:
        cut = archive.getmember("0000200001.png").offset_data + 10
    (folder / "000002.tar").write_bytes(buffer.getvalue()[:cut])


@pytest.mark.parametrize("streaming", [False, True])
def test_webdataset_shards(tmp_path, tokenizer, cache_dir, streaming):
    _img2dataset_shards(tmp_path / "shards" / "train")
    assert detect_format(tmp_path / "shards") == "webdataset"
    dataset = load_image_text_dataset(tmp_path / "shards", streaming=streaming, cache_dir=cache_dir)
    records = list(dataset)
    keys = [record["__key__"] for record in records]
    assert keys == [f"{i // 4:05d}{i % 4:04d}" for i in range(8)] + ["0000200000"]
    assert records[7]["text"] == "a cyan"  # from the .json
    assert records[8]["text"] == "from the truncated shard"
    assert records[0]["json"] == {"caption": CAPTIONS[0], "key": "000000000"}
    batches, stats = _collate_all(dataset, tokenizer, num_workers=0)
    # Sample 6 has a (valid) image in the shards, so it is kept; sample 3 is corrupt; 4 and 5 have empty captions.
    assert stats.as_dict() == {"seen": 9, "kept": 6, "skipped_corrupt_image": 1, "skipped_empty_caption": 2}
    pixels = torch.cat([batch["pixel_values"] for batch in batches])
    # Kept: samples 0, 1, 2, 6, 7 and the truncated shard's first; even samples are (lossless) PNGs.
    for row, index in zip([0, 2, 3, 5], [0, 2, 6, 0]):
        assert_close_to_scale(pixels[row], _reference_pixels(_image(index)), 1e-5, f"pixels of sample {index}")
    pattern = str(tmp_path / "shards" / "train" / "{000000..000001}.tar")
    assert expand_braces(pattern)[-1].endswith("000001.tar")
    assert len(list(load_image_text_dataset(pattern, streaming=True))) == 8


@pytest.mark.slow
def test_dataset_objects_streaming_with_two_workers(tokenizer):
    """Format (d): a datasets object with a decoded Image column, streamed to 2 DataLoader workers."""
    images = [_image(i) if i != 3 else None for i in range(len(CAPTIONS))]
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    table = {"picture": [_encoded(im) if im is not None else b"junk" for im in images], "caption": CAPTIONS}
    source = datasets.Dataset.from_dict(table).cast(features)
    dataset = load_image_text_dataset(datasets.DatasetDict({"train": source}), image_column="picture", streaming=True)
    assert isinstance(dataset, datasets.IterableDataset) and dataset.num_shards == len(CAPTIONS)
    batches, stats = _collate_all(dataset, tokenizer, batch_size=2, num_workers=2)
    # Workers interleave batches: compare as sets, and check that the counts reached this process.
    kept = sorted(
        round(float(batch["pixel_values"][i, 2].mean()), 4)
        for batch in batches
        for i in range(len(batch["pixel_values"]))
    )
    expected = sorted(round(float(_reference_pixels(_image(i))[2].mean()), 4) for i in GOOD + [6])
    assert kept == expected
    assert stats.as_dict() == {"seen": 8, "kept": 5, "skipped_corrupt_image": 1, "skipped_empty_caption": 2}


# ---------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------


def test_collator_tokenises_like_the_tokenizer(tokenizer):
    long_caption = " ".join(["word"] * 100)
    records = [
        {"image": {"bytes": _encoded(_image(0)), "path": None}, "text": "a red box"},
        {"image": {"bytes": _encoded(_image(1)), "path": None}, "text": ["", "  a green box  ", "other"]},
        {"image": {"bytes": _encoded(_image(2)), "path": None}, "text": long_caption},
    ]
    batch = ImageTextCollator(tokenizer, EVAL_TRANSFORM, caption_choice="first")(records)
    for row, caption in zip(range(3), ["a red box", "a green box", long_caption]):
        expected = tokenizer(caption, truncation=True, max_length=77)["input_ids"]
        length = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :length].tolist() == expected
        assert batch["input_ids"][row, length:].eq(tokenizer.pad_token_id).all()
    assert batch["input_ids"].shape == (3, 77)  # the long caption sets the width (truncated to 77)
    short = ImageTextCollator(tokenizer, EVAL_TRANSFORM)(records[:1])
    assert short["input_ids"].shape == (1, len(tokenizer("a red box")["input_ids"]))  # dynamic padding
    fixed = ImageTextCollator(tokenizer, EVAL_TRANSFORM, padding="max_length")(records[:1])
    assert fixed["input_ids"].shape == (1, 77)
    bad = [{"image": {"bytes": b"junk", "path": None}, "text": "x"}, {"image": None, "text": " "}]
    collator = ImageTextCollator(tokenizer, TrainImageTransform(8, MEAN, STD))
    empty = collator(bad)
    assert empty["input_ids"].shape == (0, 0) and empty["pixel_values"].shape == (0, 3, 8, 8)
    assert collator.stats.as_dict() == {"seen": 2, "kept": 0, "skipped_corrupt_image": 1, "skipped_empty_caption": 1}
    with pytest.raises(ValueError, match="padding"):
        ImageTextCollator(tokenizer, EVAL_TRANSFORM, padding="do_not_pad")


@pytest.mark.slow
def test_collator_with_two_workers_reports_counts_to_main_process(tmp_path, tokenizer, cache_dir):
    _imagefolder(tmp_path / "data")
    dataset = load_image_text_dataset(tmp_path / "data", split="train", cache_dir=cache_dir)
    dataset = datasets.concatenate_datasets([dataset] * 3)  # 24 records, 12 bad, 8 batches over 2 workers
    batches, stats = _collate_all(dataset, tokenizer, batch_size=3, num_workers=2)
    assert sum(len(batch["input_ids"]) for batch in batches) == 12
    assert stats.as_dict() == {"seen": 24, "kept": 12, "skipped_corrupt_image": 6, "skipped_empty_caption": 6}


def test_drop_bad_records_counts_up_front(tmp_path, cache_dir):
    _imagefolder(tmp_path / "data")
    dataset = load_image_text_dataset(tmp_path / "data", split="train", cache_dir=cache_dir)
    stats = DataStats()
    clean = drop_bad_records(dataset, stats=stats)
    assert [record["text"] for record in clean] == [CAPTIONS[i] for i in GOOD]
    assert stats.as_dict() == {"seen": 4, "kept": 0, "skipped_corrupt_image": 2, "skipped_empty_caption": 2}
    with pytest.raises(TypeError, match="a stream filters its records itself"):
        drop_bad_records(dataset.to_iterable_dataset())


def test_pre_scan_and_collator_counts_add_up_and_the_summary_never_reads_kept_0(tokenizer):
    # 13 records: 10 good, 2 corrupt images (3 and 7), 1 empty caption (11).
    images = [b"not an image" if index in (3, 7) else _encoded(_image(index)) for index in range(13)]
    captions = ["" if index == 11 else f"a red box {index}" for index in range(13)]
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": None} for data in images], "text": captions},
        features=datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string")}),
    )
    stats = DataStats()
    reasons = "(corrupt or unreadable image 2, empty caption 1)"
    clean = drop_bad_records(dataset, stats=stats)
    assert len(clean) == 10
    # The pre-scan counts what it drops; the 10 it keeps are counted when they are batched.
    assert stats.as_dict() == {"seen": 3, "kept": 0, "skipped_corrupt_image": 2, "skipped_empty_caption": 1}
    assert stats.prescan_kept == 10
    assert stats.summary() == f"data: pre-scan kept 10 of 13, skipped 3 {reasons}; none batched yet"
    collator = ImageTextCollator(tokenizer, EVAL_TRANSFORM, caption_choice="first", stats=stats)
    batches = list(torch.utils.data.DataLoader(clean, batch_size=4, collate_fn=collator))
    assert sum(len(batch["input_ids"]) for batch in batches) == 10
    counts = stats.as_dict()
    assert counts == {"seen": 13, "kept": 10, "skipped_corrupt_image": 2, "skipped_empty_caption": 1}
    assert counts["seen"] == counts["kept"] + counts["skipped_corrupt_image"] + counts["skipped_empty_caption"]
    assert stats.summary() == f"data: seen 13, kept 10, skipped 3 {reasons}"
    # Without a pre-scan, a collator that met only bad records says just that.
    collated_only = DataStats()
    collated_only.add(seen=2, skipped_corrupt_image=2)
    assert collated_only.summary() == "data: seen 2, kept 0, skipped 2 (corrupt or unreadable image 2, empty caption 0)"


def test_extract_caption_and_decode_image_edge_cases(tmp_path):
    assert extract_caption({"text": float("nan")}) is None
    assert extract_caption({"text": 42}) == "42"
    assert extract_caption({"text": None, "json": {"caption": " from json "}}) == "from json"
    assert extract_caption({"text": ["", None]}) is None
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent: composited onto white
    assert decode_image(_encoded(rgba)).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(np.zeros((3, 5), dtype=np.uint8)).size == (5, 3)
    truncated = _encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")[:300]
    with pytest.raises(OSError):
        decode_image(truncated)
    with pytest.raises(FileNotFoundError):
        decode_image(str(tmp_path / "absent.png"))


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(40, 30), (30, 37), (16, 16), (29, 50)])
def test_eval_transform_is_the_image_processor(size):
    processor = MSClipImageProcessor.from_preset(image_size=16)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    transform = ImageProcessorTransform(processor)
    pixels = transform(image)
    reference = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 16, 16) and transform.output_size == (16, 16)
    assert torch.equal(pixels, reference)
    # A collator given the processor itself uses it the same way.
    batch = ImageClassificationCollator(processor)([{"image": image, "label": 0}])
    assert torch.equal(batch["pixel_values"][0], reference)
    # And the processor is the evaluation pipeline written out by hand, including the sizes where rounding and
    # flooring the crop offset differ ((29, 50): an excess of 3 pixels over 4).
    by_hand = _reference_pixels(image, 16, processor.image_mean, processor.image_std)
    assert_close_to_scale(pixels, by_hand, 1e-5, "processor against the hand-written pipeline")


def test_train_transform_reads_the_processor_and_crops_within_bounds():
    processor = MSClipImageProcessor.from_preset(image_size=24)
    transform = TrainImageTransform.from_image_processor(processor, scale=(0.5, 0.8))
    assert transform.size == (24, 24) and transform.scale == (0.5, 0.8)
    np.testing.assert_allclose(transform.mean, processor.image_mean, rtol=1e-6)
    np.testing.assert_allclose(transform.std, processor.image_std, rtol=1e-6)
    transform.generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = transform.crop_box(100, 80)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 80
        area = (right - left) * (bottom - top) / 8000
        assert 0.5 - 0.02 <= area <= 0.8 + 0.02  # rounding to whole pixels
        assert 3 / 4 - 0.03 <= (right - left) / (bottom - top) <= 4 / 3 + 0.03
    # The default keeps 90-100% of the area like CLIP.
    assert TrainImageTransform(8, MEAN, STD).scale == (0.9, 1.0)


def test_train_transform_full_crop_equals_resize_and_normalise():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    transform = TrainImageTransform(8, MEAN, STD, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    array = np.asarray(image.resize((8, 8), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    expected = torch.tensor(((array - MEAN) / np.array(STD)).transpose(2, 0, 1), dtype=torch.float32)
    assert_close_to_scale(transform(image), expected, 1e-5, "full crop")
    # No flip by default (checked below); with flip on, about half the outputs are the mirror image.
    flipping = TrainImageTransform(
        8,
        MEAN,
        STD,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        horizontal_flip=True,
        generator=torch.Generator().manual_seed(0),
    )
    outputs = [flipping(image) for _ in range(40)]
    mirrored = sum(close_to_scale(out, expected.flip(-1), 1e-5) for out in outputs)
    unchanged = sum(close_to_scale(out, expected, 1e-5) for out in outputs)
    assert mirrored + unchanged == 40 and 8 <= mirrored <= 32
    assert all(close_to_scale(transform(image), expected, 1e-5) for _ in range(10))
    with pytest.raises(ValueError, match="scale"):
        TrainImageTransform(8, MEAN, STD, scale=(0.0, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# Webdataset writer
# ---------------------------------------------------------------------------------------------------------------


def test_write_webdataset_round_trip(tmp_path, cache_dir):
    _imagefolder(tmp_path / "data")
    source = load_image_text_dataset(tmp_path / "data", split="train", cache_dir=cache_dir)
    stats = DataStats()
    shards = write_webdataset(source, tmp_path / "shards", samples_per_shard=3, stats=stats)
    assert [shard.name for shard in shards] == ["000000.tar", "000001.tar"]
    assert stats.as_dict() == {"seen": 8, "kept": 4, "skipped_corrupt_image": 2, "skipped_empty_caption": 2}
    with tarfile.open(shards[0]) as archive:
        names = archive.getnames()
        metadata = json.loads(archive.extractfile("000000.json").read())
    assert names == [f"00000{i}.{ext}" for i in range(3) for ext in ("png", "txt", "json")]
    assert metadata == {"caption": CAPTIONS[0], "key": "000000", "extra": len(CAPTIONS[0])}
    loaded = load_image_text_dataset(tmp_path / "shards", cache_dir=cache_dir)
    assert [record["text"] for record in loaded] == [CAPTIONS[i] for i in GOOD]
    for record, index in zip(loaded, GOOD):  # PNG stays PNG: pixels are identical
        assert np.array_equal(np.asarray(decode_image(record["image"])), np.asarray(_image(index)))
    # Same input, same bytes; a non-empty folder needs overwrite, which keeps files that are not shards.
    (tmp_path / "shards" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_webdataset(source, tmp_path / "shards", samples_per_shard=3)
    first_bytes = shards[0].read_bytes()
    write_webdataset(source, tmp_path / "shards", samples_per_shard=3, overwrite=True)
    assert shards[0].read_bytes() == first_bytes and (tmp_path / "shards" / "notes.txt").read_text() == "mine"
    jpg_shards = write_webdataset(source, tmp_path / "jpg", samples_per_shard=10, image_format="jpg")
    with tarfile.open(jpg_shards[0]) as archive:
        assert sorted({name.split(".")[-1] for name in archive.getnames()}) == ["jpg", "json", "txt"]


def test_write_webdataset_script(tmp_path, capsys):
    path = _table(tmp_path, "csv")
    script = _load_script("write_webdataset")
    assert script.main(["--input", str(path), "--output", str(tmp_path / "out"), "--samples-per-shard", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000000.tar", "000001.tar"]
    assert "skipped 4 (corrupt or unreadable image 2, empty caption 2)" in capsys.readouterr().out
    assert script.main(["--input", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST recipe and class folders
# ---------------------------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_idx_parser(tmp_path):
    fashion = _load_script("fashion_mnist")
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    (tmp_path / "images.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
    assert np.array_equal(fashion.read_idx(tmp_path / "images.gz"), images)
    signed = np.array([-300, 0, 300, 32767], dtype=np.int16)
    (tmp_path / "shorts").write_bytes(_idx_bytes(signed, 0x0B))
    assert fashion.read_idx(tmp_path / "shorts").tolist() == signed.tolist()
    with pytest.raises(ValueError, match="needs 60 bytes of values, the file has 59"):
        fashion.parse_idx(_idx_bytes(images, 0x08)[:-1], "cut")
    with pytest.raises(ValueError, match="not an idx file"):
        fashion.parse_idx(b"\x01\x00\x08\x01\x00\x00\x00\x00", "bad-magic")
    with pytest.raises(ValueError, match="unknown idx type code 0x07"):
        fashion.parse_idx(b"\x00\x00\x07\x01\x00\x00\x00\x00", "bad-type")


def test_fashion_mnist_recipe(tmp_path, cache_dir):
    fashion = _load_script("fashion_mnist")
    rng = np.random.default_rng(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    arrays = {}
    for split, count in (("train", 12), ("test", 10)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        image_stem, label_stem = fashion.IDX_FILES[split]
        (raw / f"{image_stem}.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
        (raw / f"{label_stem}.gz").write_bytes(gzip.compress(_idx_bytes(labels, 0x08)))
        arrays[split] = (images, labels)
    assert fashion.main(["--input-dir", str(raw), "--output", str(tmp_path / "out"), "--limit-train", "11"]) == 0
    captions = load_image_text_dataset(tmp_path / "out", split="train", cache_dir=cache_dir)
    assert len(captions) == 11
    for index, record in enumerate(captions):
        images, labels = arrays["train"]
        class_name = fashion.FASHION_MNIST_CLASSES[labels[index]]
        assert record["class_name"] == class_name and class_name in record["text"]
        assert np.array_equal(np.asarray(Image.open(record["image"]["path"])), images[index])
    assert "a ankle" not in " ".join(captions["text"])
    classes, class_names = load_class_folder_dataset(tmp_path / "out", split="test", cache_dir=cache_dir)
    assert class_names == sorted(fashion.FASHION_MNIST_CLASSES, key=lambda name: name.replace(" ", "_"))
    assert "ankle boot" in class_names and len(classes) == 10
    for record in classes:  # the folder a file sits in is its label
        folder = Path(record["image"]["path"]).parent.name
        assert class_names[record["label"]] == folder.replace("_", " ")
        index = int(Path(record["image"]["path"]).stem)
        assert fashion.FASHION_MNIST_CLASSES[arrays["test"][1][index]] == class_names[record["label"]]
    (tmp_path / "out" / "test" / "bag" / "99999.png").write_bytes(b"broken")
    classes, _ = load_class_folder_dataset(tmp_path / "out", split="test", cache_dir=str(tmp_path / "cache2"))
    collator = ImageClassificationCollator(EVAL_TRANSFORM)
    batch = collator(list(classes))
    assert batch["pixel_values"].shape == (10, 3, 8, 8) and collator.stats.skipped_corrupt_image == 1
    assert fashion.main(["--input-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]) == 2
    # A wrong input folder with --overwrite leaves the earlier output as it was.
    before = sorted(str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*"))
    missing_input = ["--input-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"), "--overwrite"]
    assert fashion.main(missing_input) == 2
    assert sorted(str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*")) == before


def _labels_by_file(dataset, class_names) -> dict[str, tuple[int, str]]:
    return {Path(record["image"]["path"]).name: (record["label"], class_names[record["label"]]) for record in dataset}


def test_one_label_order_for_both_layouts_of_the_same_images(tmp_path, cache_dir):
    """The label-order rule of docs/data.md: the ids follow the sorted label names as the data writes them."""
    from modeling_msclip.data_msclip import load_dataset, prepare_labels
    from modeling_msclip.evaluation_msclip import class_names_from_dataset, load_eval_dataset
    from modeling_msclip.finetuning_msclip import load_classification_dataset

    # Names whose order is easy to get wrong: capitals before lower case, '-' (0x2d) before '_' (0x5f).
    folders = ["sea_lion", "sea-urchin", "Seal", "ankle_boot", "bag"]
    rows = []
    for number, folder in enumerate(folders):
        for index in range(2):
            name = f"{number}{index}.png"
            for root in (tmp_path / "classes" / folder, tmp_path / "images" / "images"):
                root.mkdir(parents=True, exist_ok=True)
                _image(number).save(root / name)
            rows.append({"file_name": f"images/{name}", "label": folder, "text": f"a {folder}"})
    (tmp_path / "images" / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected_names = ["Seal", "ankle boot", "bag", "sea-urchin", "sea lion"]  # sorted as written: "sea-" < "sea_"

    loaded = {
        "class folders": prepare_labels(load_dataset(tmp_path / "classes", task="classification", cache_dir=cache_dir)),
        "image folder": prepare_labels(load_dataset(tmp_path / "images", task="classification", cache_dir=cache_dir)),
        "load_class_folder_dataset": load_class_folder_dataset(tmp_path / "classes", cache_dir=cache_dir),
        "fine-tuning, class folders": load_classification_dataset(tmp_path / "classes"),
        "fine-tuning, image folder": load_classification_dataset(tmp_path / "images"),
        # datasets' own imagefolder on class folders (drop_labels=False), as plain transformers code reads them.
        "datasets imagefolder": (
            datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "classes"), split="train").cast_column(
                "image", datasets.Image(decode=False)
            ),
            expected_names,
        ),
    }
    for source in ("classes", "images"):
        dataset = load_eval_dataset(tmp_path / source, purpose="classification")
        loaded[f"evaluation, {source}"] = (dataset, class_names_from_dataset(dataset))
    reference = _labels_by_file(*loaded["class folders"])
    assert sorted(set(reference.values())) == list(enumerate(expected_names))
    for name, (dataset, class_names) in loaded.items():
        assert class_names == expected_names, name
        assert _labels_by_file(dataset, class_names) == reference, name

    # The Fashion-MNIST tree holds both layouts of the same images: class folders and a metadata.jsonl whose
    # class_name column spells the names with spaces. Sorted, the two give the same ids to every image.
    fashion = _load_script("fashion_mnist")
    raw = tmp_path / "raw"
    raw.mkdir()
    labels = np.arange(20, dtype=np.uint8) % 10
    for split in ("train", "test"):
        image_stem, label_stem = fashion.IDX_FILES[split]
        images = np.random.default_rng(1).integers(0, 256, (20, 28, 28), dtype=np.uint8)
        (raw / f"{image_stem}.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
        (raw / f"{label_stem}.gz").write_bytes(gzip.compress(_idx_bytes(labels, 0x08)))
    assert fashion.main(["--input-dir", str(raw), "--output", str(tmp_path / "fm")]) == 0
    by_folder = load_classification_dataset(tmp_path / "fm", split="test", format="classfolder")
    by_metadata = load_classification_dataset(tmp_path / "fm", split="test", label_column="class_name")
    assert by_folder[1] == by_metadata[1] == sorted(fashion.FASHION_MNIST_CLASSES)
    assert _labels_by_file(*by_folder) == _labels_by_file(*by_metadata)
    # Labels that are ids already (the integer fashion_mnist_label, named in Fashion-MNIST order) keep their ids:
    # other numbers, the same class name for every image.
    by_id = load_classification_dataset(
        tmp_path / "fm", split="test", label_column="fashion_mnist_label", class_names=fashion.FASHION_MNIST_CLASSES
    )
    assert by_id[1] == list(fashion.FASHION_MNIST_CLASSES)
    named = {file: name for file, (_, name) in _labels_by_file(*by_folder).items()}
    assert {file: name for file, (_, name) in _labels_by_file(*by_id).items()} == named


def test_pretraining_prescan_counts_each_bad_record_once_across_ranks(tmp_path, monkeypatch):
    # Every rank scans the whole map-style dataset; the summed per-rank counts must still count each drop once.
    from training.run_pretrain import DataArguments, build_datasets

    path = _table(tmp_path, "csv")
    kept, counts = [], []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        stats = DataStats()
        train, _ = build_datasets(DataArguments(train_data=str(path)), stats)
        kept.append(len(train))
        counts.append(stats.as_dict())
    assert kept[0] == kept[1] == len(CAPTIONS) - 4  # 2 unreadable images, 2 empty captions
    assert counts[0]["skipped_corrupt_image"] == 2 and counts[0]["skipped_empty_caption"] == 2
    assert all(value == 0 for value in counts[1].values())


def test_eval_transform_refuses_a_size_where_the_processor_goes(tokenizer):
    """A size in the processor's place failed only when called, inside the data loader workers, as "'int' object is
    not callable" on every record: the transform and the collators refuse it when built."""
    with pytest.raises(TypeError, match="takes a transformers image processor .*got 32"):
        ImageProcessorTransform(32)
    with pytest.raises(TypeError, match="image_transform must be an image processor or a callable.*got 32"):
        ImageTextCollator(tokenizer, 32)
    with pytest.raises(TypeError, match="image_transform must be an image processor or a callable"):
        ImageClassificationCollator(None)
