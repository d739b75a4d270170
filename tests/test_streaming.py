"""`ImageTextStream` read in this process as each rank and DataLoader worker of a run would read it: every record once
per epoch over all ranks, a new order each epoch, full batches around bad records, weighted mixing, resampling, and
resume from a saved position without decoding the records already trained on.

The multi-process runs (real `accelerate launch`, gloo) are in tests/test_streaming_runs.py."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from conftest import TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE
from PIL import Image

from modeling_msclip import MSClipImageProcessor, train_msclip_tokenizer
from modeling_msclip.collators_msclip import ImageTextCollator
from modeling_msclip.records_msclip import DataStats
from modeling_msclip.streaming_msclip import (
    RESUME_MARKER_KEY,
    STREAM_INFO_KEY,
    ImageTextStream,
    StreamMonitor,
    build_stream_sources,
    count_webdataset_samples,
    dataset_source,
    parse_weighted_sources,
    webdataset_source,
)
from modeling_msclip.webdataset_msclip import WebDatasetShardWriter


def png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def write_shards(folder: Path, count: int, per_shard: int, prefix: str = "a") -> Path:
    with WebDatasetShardWriter(folder, samples_per_shard=per_shard) as writer:
        for index in range(count):
            writer.write(png(index), "png", f"a photo of a red cat {prefix}{index}")
    return folder


@pytest.fixture(scope="module")
def collator():
    tokenizer = train_msclip_tokenizer(TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE)
    return ImageTextCollator(tokenizer, MSClipImageProcessor.from_preset("msclip", image_size=8))


class CountingCollator(ImageTextCollator):
    """The real collator, counting in shared memory (a `DataStats`, visible across workers) the records it decodes."""

    decoded = DataStats()

    def decode_record(self, record):
        CountingCollator.decoded.add(seen=1)
        return super().decode_record(record)


def read_epoch(stream: ImageTextStream, epoch: int, num_workers: int) -> list[dict]:
    stream.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    return list(loader)


def keys_of(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch[STREAM_INFO_KEY]["keys"]]


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 0), (3, 0), (2, 2)])
def test_every_record_once_per_epoch_over_ranks_in_a_new_order(tmp_path, collator, world_size, num_workers):
    slots = world_size * max(1, num_workers)
    shards = write_shards(tmp_path / "shards", count=12 * slots, per_shard=12)  # one shard per slot
    source = webdataset_source(str(shards))
    assert source.num_samples == 12 * slots and len(source.shards) == slots
    orders = {}
    for epoch in range(2):
        per_rank = []
        for rank in range(world_size):
            stream = ImageTextStream(
                [source], collator, batch_size=4, rank=rank, world_size=world_size, num_workers=num_workers, seed=7
            )
            assert len(stream) == 3 * max(1, num_workers)
            batches = read_epoch(stream, epoch, num_workers)
            assert len(batches) == len(stream)
            assert all(batch["pixel_values"].shape == (4, 3, 8, 8) for batch in batches)
            assert all(batch["input_ids"].shape[0] == 4 for batch in batches)
            per_rank.append(keys_of(batches))
        everything = [key for keys in per_rank for key in keys]
        assert sorted(everything) == sorted(f"{shard:05d}{index:02d}" for shard in range(slots) for index in range(12))
        orders[epoch] = per_rank
    assert all(orders[0][rank] != orders[1][rank] for rank in range(world_size))  # a new order each epoch
    again = ImageTextStream(
        [source], collator, batch_size=4, rank=0, world_size=world_size, num_workers=num_workers, seed=7
    )
    assert keys_of(read_epoch(again, 1, num_workers)) == orders[1][0]  # reproducible from the seed
    other = ImageTextStream(
        [source], collator, batch_size=4, rank=0, world_size=world_size, num_workers=num_workers, seed=8
    )
    assert keys_of(read_epoch(other, 1, num_workers)) != orders[1][0]


def test_the_shuffle_buffer_mixes_shards_within_a_batch(tmp_path, collator):
    source = webdataset_source(str(write_shards(tmp_path / "shards", count=64, per_shard=16)))
    stream = ImageTextStream([source], collator, batch_size=8, shuffle_buffer=32, seed=0)
    shards_per_batch = [len({key[:5] for key in batch[STREAM_INFO_KEY]["keys"]}) for batch in read_epoch(stream, 0, 0)]
    assert max(shards_per_batch) > 1
    unshuffled = ImageTextStream([source], collator, batch_size=8, shuffle_buffer=0, seed=0)
    assert all(len({k[:5] for k in b[STREAM_INFO_KEY]["keys"]}) == 1 for b in read_epoch(unshuffled, 0, 0))


def test_fewer_shards_than_slots_still_splits_every_record_once(tmp_path, collator, caplog):
    source = webdataset_source(str(write_shards(tmp_path / "shards", count=24, per_shard=24)))
    assert len(source.shards) == 1
    keys = []
    for rank in range(2):
        stream = ImageTextStream([source], collator, batch_size=4, rank=rank, world_size=2, num_workers=0)
        keys += keys_of(read_epoch(stream, 0, 0))
    assert sorted(keys) == sorted(f"00000{index:02d}" for index in range(24))
    assert "every slot reads every shard" in caplog.text


def test_a_streamed_jsonl_table_is_split_by_record(tmp_path, collator):
    (tmp_path / "images").mkdir()
    rows = []
    for index in range(16):
        (tmp_path / "images" / f"{index}.png").write_bytes(png(index))
        rows.append({"file_name": f"images/{index}.png", "caption": f"a small red cat {index}"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    [source] = build_stream_sources(str(tmp_path / "pairs.jsonl"))
    seen = []
    for rank in range(2):
        stream = ImageTextStream([source], collator, batch_size=4, rank=rank, world_size=2, num_samples=16)
        seen += keys_of(read_epoch(stream, 0, 0))
    assert sorted(seen) == sorted(f"{index}.png" for index in range(16))


def test_bad_records_are_skipped_named_and_counted_and_batches_stay_full(tmp_path, collator, caplog):
    import tarfile

    shard = tmp_path / "shards" / "000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as archive:

        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        for index in range(20):
            key = f"k{index:03d}"
            if index == 5:
                add(f"{key}.png", png(index)[:40])  # truncated image
            elif index == 9:
                pass  # no image at all
            else:
                add(f"{key}.png", png(index))
            add(f"{key}.txt", b"   " if index == 13 else f"a red cat {index}".encode())
    source = webdataset_source(str(shard.parent))
    assert count_webdataset_samples(list(source.shards)) == 20
    stream = ImageTextStream([source], collator, batch_size=4, num_samples=16)
    monitor = StreamMonitor(stream, DataStats())
    batches = read_epoch(stream, 0, 0)
    assert [batch["pixel_values"].shape[0] for batch in batches] == [4, 4, 4, 4]
    for batch in batches:
        monitor.consume(batch[STREAM_INFO_KEY])
    assert monitor.stats.as_dict() == {"seen": 19, "kept": 16, "skipped_corrupt_image": 2, "skipped_empty_caption": 1}
    assert sorted(name for _, name in monitor.named) == ["k005", "k009", "k013"]
    assert "k005 in" in caplog.text and "empty caption" in caplog.text


def test_weighted_mixing_lands_near_the_asked_proportions(tmp_path, collator):
    first = webdataset_source(str(write_shards(tmp_path / "a", count=40, per_shard=10, prefix="a")), name="a", weight=3)
    second = webdataset_source(
        str(write_shards(tmp_path / "b", count=40, per_shard=10, prefix="b")), name="b", weight=1
    )
    stream = ImageTextStream([first, second], collator, batch_size=8, num_samples=400, shuffle_buffer=0, seed=3)
    monitor = StreamMonitor(stream, DataStats())
    for batch in read_epoch(stream, 0, 0):
        monitor.consume(batch[STREAM_INFO_KEY])
    share = monitor.mixture()["a"]
    # 400 draws at p = 3/4: four standard deviations is 0.087
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 400), share
    assert sum(monitor.source_counts) == 400


def test_resampled_epochs_are_a_sample_count(tmp_path, collator):
    source = webdataset_source(str(write_shards(tmp_path / "shards", count=30, per_shard=10)))
    with pytest.raises(ValueError, match="needs num_samples"):
        ImageTextStream([source], collator, batch_size=4, resampled=True)
    counts = Counter()
    for rank in range(2):
        stream = ImageTextStream(
            [source], collator, batch_size=4, num_samples=96, resampled=True, rank=rank, world_size=2
        )
        keys = keys_of(read_epoch(stream, 0, 0))
        assert len(keys) == 48
        counts.update(keys)
    assert sum(counts.values()) == 96 and max(counts.values()) > 1  # drawn with replacement


def test_a_resumed_stream_continues_exactly_without_decoding_again(tmp_path, collator):
    source = webdataset_source(str(write_shards(tmp_path / "shards", count=64, per_shard=8)))
    counting = CountingCollator(collator.tokenizer, collator.image_transform)

    def stream():
        return ImageTextStream([source], counting, batch_size=4, num_workers=2, shuffle_buffer=6, seed=1)

    full = read_epoch(stream(), 1, 2)
    interrupted = stream()
    monitor = StreamMonitor(interrupted, DataStats())
    interrupted.set_epoch(1)
    for batch in list(torch.utils.data.DataLoader(interrupted, batch_size=None, num_workers=2))[:5]:
        monitor.consume(batch[STREAM_INFO_KEY])
    state = json.loads(json.dumps(monitor.state_dict()))  # as saved in a checkpoint

    resumed = stream()
    resumed_monitor = StreamMonitor(resumed, DataStats())
    resumed_monitor.load_state_dict(state)
    CountingCollator.decoded.reset()
    batches = read_epoch(resumed, 1, 2)
    assert all(RESUME_MARKER_KEY in batch for batch in batches[:5]) and RESUME_MARKER_KEY not in batches[5]
    assert keys_of(batches[5:]) == keys_of(full[5:])
    for got, expected in zip(batches[5:], full[5:], strict=True):
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert CountingCollator.decoded.seen == 4 * (len(full) - 5)  # the 5 trained batches were not decoded again
    assert resumed_monitor.stats.kept == 20

    other = ImageTextStream([source], counting, batch_size=8, num_workers=2, shuffle_buffer=6, seed=1)
    with pytest.raises(ValueError, match="set up differently"):
        StreamMonitor(other, DataStats()).load_state_dict(state)


def test_parse_weighted_sources():
    assert parse_weighted_sources("a::b", "3::1") == [("a", 3.0), ("b", 1.0)]
    assert parse_weighted_sources("a", None) == [("a", 1.0)]
    with pytest.raises(ValueError, match="2 weights"):
        parse_weighted_sources("a::b::c", "3::1")


def test_a_map_style_dataset_as_a_source(collator):
    images = [{"bytes": png(index), "path": None} for index in range(12)]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "text": [f"a red cat {index}" for index in range(12)]},
        features=datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string")}),
    )
    source = dataset_source(dataset, rows_per_shard=3)
    assert source.num_samples == 12 and len(source.shards) == 4
    keys = []
    for rank in range(2):
        keys += keys_of(read_epoch(ImageTextStream([source], collator, batch_size=3, rank=rank, world_size=2), 0, 0))
    assert sorted(keys) == sorted(f"a red cat {index}" for index in range(12))


def test_map_style_batches_of_bad_records_are_refilled_to_full_size(collator):
    from modeling_msclip.collators_msclip import IndexedDataset

    images = [{"bytes": png(index) if index % 3 else b"broken", "path": None} for index in range(12)]
    dataset = IndexedDataset(
        datasets.Dataset.from_dict(
            {"image": images, "text": [f"a red cat {index}" for index in range(12)]},
            features=datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string")}),
        )
    )
    bad = [dataset[index] for index in (0, 3, 6, 9)]  # every record of the batch is bad
    refilling = ImageTextCollator(
        collator.tokenizer, collator.image_transform, refill_from=dataset, augmentation_seed=0, stats=DataStats()
    )
    batch = refilling(bad)
    assert batch["pixel_values"].shape[0] == 4 and batch["input_ids"].shape[0] == 4
    counts = refilling.stats.as_dict()
    assert counts["kept"] == 4 and counts["seen"] == counts["kept"] + counts["skipped_corrupt_image"] >= 8
    again = ImageTextCollator(collator.tokenizer, collator.image_transform, refill_from=dataset, augmentation_seed=0)
    assert torch.equal(again(bad)["input_ids"], batch["input_ids"])  # the same replacements every time
    plain = ImageTextCollator(collator.tokenizer, collator.image_transform)
    assert plain(bad)["input_ids"].shape[0] == 0  # without a dataset to draw from, the batch is empty
    hopeless = IndexedDataset(dataset.dataset.select([0, 3, 6, 9]))
    with pytest.raises(RuntimeError, match="were bad too"):
        ImageTextCollator(collator.tokenizer, collator.image_transform, refill_from=hopeless)([hopeless[0]])


def test_a_sharded_iterable_dataset_is_split_by_shard(collator):
    images = [{"bytes": png(index), "path": None} for index in range(16)]
    dataset = datasets.Dataset.from_dict(
        {"image": images, "text": [f"a red cat {index}" for index in range(16)]},
        features=datasets.Features({"image": datasets.Image(decode=False), "text": datasets.Value("string")}),
    ).to_iterable_dataset(num_shards=4)
    source = dataset_source(dataset, num_samples=16)
    assert source.shards == (0, 1, 2, 3)
    per_rank = []
    for rank in range(2):
        stream = ImageTextStream([source], collator, batch_size=4, rank=rank, world_size=2, shuffle_buffer=0)
        per_rank.append(keys_of(read_epoch(stream, 0, 0)))
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"a red cat {index}" for index in range(16))
    shards_of = [{int(key.split()[-1]) // 4 for key in keys} for keys in per_rank]
    assert len(shards_of[0]) == len(shards_of[1]) == 2 and not shards_of[0] & shards_of[1]  # whole shards per rank


def test_shards_at_an_fsspec_url(tmp_path, collator):
    shards = write_shards(tmp_path / "shards", count=16, per_shard=8)
    url = f"file://{shards}/{{000000..000001}}.tar"
    source = webdataset_source(url, count=False)
    assert source.shards == (f"file://{shards}/000000.tar", f"file://{shards}/000001.tar")
    assert source.num_samples is None
    globbed = webdataset_source(f"file://{shards}/*.tar", count=False)
    assert globbed.shards == source.shards
    keys = []
    for rank in range(2):
        stream = ImageTextStream([source], collator, batch_size=4, rank=rank, world_size=2, num_samples=16)
        keys += keys_of(read_epoch(stream, 0, 0))
    assert sorted(keys) == sorted(f"{shard:05d}{index}" for shard in range(2) for index in range(8))
    with pytest.raises(ValueError, match="remote and declares no record count"):
        ImageTextStream([source], collator, batch_size=4)  # counting would download every shard
    with pytest.raises(FileNotFoundError, match="No shard matches"):
        webdataset_source(f"file://{tmp_path}/nothing/*.tar", count=False)


def test_mixing_without_streaming_is_refused_with_a_message():
    from training.run_pretrain import DataArguments, build_datasets

    with pytest.raises(ValueError, match="needs --streaming"):
        build_datasets(DataArguments(train_data="a::b"), DataStats())
