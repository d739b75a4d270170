"""Streamed image-text training data that is correct on many ranks: sharded, shuffled, resampled, mixed, always full.

`ImageTextStream` is a `torch.utils.data.IterableDataset` that yields whole training batches. It is built from one or
more `StreamSource` objects (webdataset shards, local or fsspec URLs; any `datasets` dataset, streamed or not) and
does, in each `DataLoader` worker of each rank (a *slot*; there are ``world_size x num_workers`` of them):

1. **Sharding**: in every pass over a source the shards are shuffled with a seed shared by all slots (a new order
   each epoch and pass), and slot ``s`` reads the shards ``s, s + slots, ...`` of that order. A source with fewer
   shards than slots is split record by record instead (each slot reads every shard and keeps every ``slots``-th
   record; correct, but every slot pays the reading; a warning says so).
2. **Resampling** (``resampled=True``, open_clip's ``--dataset-resampled``): each slot draws shards with
   replacement from its own seeded generator, without end.
3. **Mixing**: with several sources each record comes from source ``i`` with probability ``weight_i / sum(weights)``
   (a seeded draw per record); the achieved shares are counted in the batches' `STREAM_INFO_KEY`.
4. **Shuffling**: a buffer of ``shuffle_buffer`` records; it is emptied at the end of each pass over a source, so a
   pass is never mixed with the next one.
5. **Filtering before batching**: each record is decoded and transformed (with a random generator seeded by
   ``(seed, epoch, slot, position)``, so the same record gets the same augmentation after a resume); a record with an
   empty caption or an unreadable image is skipped, named and counted, and the batch is refilled from the stream.
   Every batch has exactly ``batch_size`` pairs.

**Epochs** are defined by a sample count ``num_samples`` (the whole run's, over all ranks): each rank yields
``num_samples // (world_size * batch_size)`` batches per epoch (the stream's ``len``), spread over its workers. A
source's pass wraps into the next pass when a slot needs more records. When the shards divide evenly over the slots,
every shard holds the same number of records and none is bad, an epoch shows every record exactly once over all
ranks. Otherwise an epoch is approximately one pass: a slot with more records than its share leaves the rest of its
pass unseen that epoch (records are reshuffled into other slots the next epoch), a slot with fewer starts its next
pass early.

**Resume**: every batch carries its position (epoch, worker, batch number, records drawn). The trainer keeps the
position of the last consumed batch of each worker and saves it with each checkpoint (`save_stream_state`). A resumed
stream (`resume_from`) re-reads the records drawn before that position *without decoding them* (the order does not
depend on decoding), yields one empty marker per batch already trained (the Trainer's own skip discards them) and
continues exactly where the interrupted run stopped.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch

from .records_msclip import EMPTY_CAPTION, DataStats, record_name
from .transforms_msclip import seeded_global_rng
from .webdataset_msclip import find_webdataset_shards, iter_webdataset_shard, open_shard, split_member_name

logger = logging.getLogger(__name__)

STREAM_INFO_KEY = "stream_info"
RESUME_MARKER_KEY = "stream_resume_marker"
STREAM_STATE_FILE = "stream_state_rank{rank}.json"
SOURCE_SEPARATOR = "::"
_PASS_END = object()


# --------------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSource:
    """One source of a stream: its shards, how to read one, and (when known) how many records it holds.

    ``reader(shard)`` yields records with an ``image`` (undecoded) and a ``text`` field, and ideally ``__key__``; it
    must be picklable (DataLoader workers receive it).
    """

    name: str
    shards: tuple[Any, ...]
    reader: Callable[[Any], Iterator[Mapping[str, Any]]]
    num_samples: int | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError(f"the stream source {self.name!r} has no shards")
        if not self.weight > 0:
            raise ValueError(f"the weight of the stream source {self.name!r} must be positive, got {self.weight}")


class _WebDatasetReader:
    def __init__(self, image_field: str | None, text_field: str | None) -> None:
        self.image_field, self.text_field = image_field, text_field

    def __call__(self, shard: str) -> Iterator[Mapping[str, Any]]:
        return iter_webdataset_shard(shard, self.image_field, self.text_field)


def webdataset_shard_list(location: str, split: str | None = None) -> list[str]:
    """The shards of a webdataset location: a local shard, folder or pattern, or fsspec URLs (``s3://b/{000..009}.tar``,
    ``file:///data/shards/*.tar``; a pattern with braces is expanded, a glob is listed through fsspec)."""
    if "://" not in location:
        splits = find_webdataset_shards(location)
        if split is None:
            if len(splits) > 1 and "train" not in splits:
                raise ValueError(f"{location} has the splits {sorted(splits)}: name one")
            split = "train" if "train" in splits else next(iter(splits))
        if split not in splits:
            raise ValueError(f"{location} has no split {split!r}; it has {sorted(splits)}")
        return splits[split]
    import fsspec

    from .webdataset_msclip import expand_braces

    shards: list[str] = []
    for pattern in expand_braces(location):
        if any(character in pattern for character in "*?["):
            filesystem, path = fsspec.core.url_to_fs(pattern)
            protocol = pattern.split("://", 1)[0]
            shards.extend(f"{protocol}://{match}" for match in sorted(filesystem.glob(path)))
        else:
            shards.append(pattern)
    if not shards:
        raise FileNotFoundError(f"No shard matches {location!r}")
    return shards


def _declared_shard_sizes(shard: str) -> int | None:
    """The record count declared next to a shard: webdataset's ``sizes.json``, img2dataset's ``<shard>_stats.json``."""
    folder, name = os.path.split(shard)
    sizes = Path(folder) / "sizes.json"
    if sizes.is_file():
        declared = json.loads(sizes.read_text())
        if name in declared:
            return int(declared[name])
    stats = Path(folder) / (name.split(".", 1)[0] + "_stats.json")
    if stats.is_file():
        return int(json.loads(stats.read_text())["successes"])
    return None


def count_webdataset_samples(shards: Sequence[str]) -> int:
    """Records in shards: from ``sizes.json`` / img2dataset ``*_stats.json`` where a folder has them, else by reading
    the tar headers (no image is decoded; a remote shard is downloaded for that, so give ``num_samples`` instead)."""
    total = 0
    for shard in shards:
        declared = None if "://" in shard else _declared_shard_sizes(shard)
        if declared is not None:
            total += declared
            continue
        keys = set()
        try:
            with open_shard(shard) as handle, tarfile.open(fileobj=handle, mode="r|*") as archive:
                for member in archive:
                    key, _ = split_member_name(member.name) if member.isfile() else (None, None)
                    if key is not None:
                        keys.add(key)
        except (tarfile.TarError, EOFError, OSError) as error:
            logger.warning("Counting %s stopped at damage (%r): %d records before it", shard, error, len(keys))
        total += len(keys)
    return total


def webdataset_source(
    location: str,
    *,
    name: str | None = None,
    weight: float = 1.0,
    split: str | None = None,
    image_field: str | None = None,
    text_field: str | None = None,
    count: bool = True,
) -> StreamSource:
    """A source of webdataset shards (img2dataset layout) at a local or fsspec location (see `webdataset_shard_list`).

    ``count`` fills ``num_samples`` (see `count_webdataset_samples`); pass False for remote shards.
    """
    shards = webdataset_shard_list(location, split)
    num_samples = count_webdataset_samples(shards) if count else None
    return StreamSource(
        name=name or location,
        shards=tuple(shards),
        reader=_WebDatasetReader(image_field, text_field),
        num_samples=num_samples,
        weight=weight,
    )


class _DatasetShardReader:
    """Reads one shard of a `datasets` dataset: a contiguous row range of a map-style one, a source shard of a
    streamed one (through ``.iter``, which does not split the data among DataLoader workers by itself)."""

    def __init__(self, dataset: datasets.Dataset | datasets.IterableDataset) -> None:
        self.dataset = dataset

    def __call__(self, shard: Any) -> Iterator[Mapping[str, Any]]:
        if isinstance(self.dataset, datasets.Dataset):
            start, stop = shard
            part = self.dataset.select(range(start, stop))
        else:
            part = self.dataset.shard(num_shards=self.dataset.num_shards, index=shard, contiguous=True)
        for batch in part.iter(batch_size=64):
            columns = list(batch)
            for row in range(len(batch[columns[0]])):
                yield {column: batch[column][row] for column in columns}


def dataset_source(
    dataset: datasets.Dataset | datasets.IterableDataset,
    *,
    name: str = "dataset",
    weight: float = 1.0,
    num_samples: int | None = None,
    rows_per_shard: int = 1000,
) -> StreamSource:
    """A source over a `datasets` dataset with ``image`` and ``text`` columns (`data_msclip.load_image_text_dataset`).

    A map-style dataset is cut into shards of ``rows_per_shard`` rows; a streamed one keeps its own shards (its files).
    ``num_samples`` defaults to the map-style length, else to the split size the dataset's info declares.
    """
    if isinstance(dataset, datasets.Dataset):
        shards = tuple(
            (start, min(start + rows_per_shard, len(dataset))) for start in range(0, len(dataset), rows_per_shard)
        )
        num_samples = len(dataset) if num_samples is None else num_samples
    else:
        shards = tuple(range(dataset.num_shards))
        if num_samples is None and dataset.info.splits and dataset.split is not None:
            declared = dataset.info.splits.get(str(dataset.split))
            num_samples = declared.num_examples if declared is not None and declared.num_examples else None
    return StreamSource(
        name=name, shards=shards, reader=_DatasetShardReader(dataset), num_samples=num_samples, weight=weight
    )


def count_records(source: StreamSource) -> int:
    """Records of a source: its declared count, else one read over every local shard (no image is decoded).

    Raises:
        ValueError: for shards at URLs without a declared count (counting would download them all).
    """
    if source.num_samples is not None:
        return source.num_samples
    if any("://" in str(shard) for shard in source.shards):
        raise ValueError(
            f"{source.name} is remote and declares no record count: give the epoch length (--train_num_samples)"
        )
    logger.warning("Counting the records of %s by reading it once (pass num_samples to avoid this)", source.name)
    return sum(1 for shard in source.shards for _ in source.reader(shard))


# --------------------------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------------------------


def _random(*parts: Any) -> random.Random:
    # Seeding from a string goes through SHA-512: the same sequence in every process (str hashes are salted).
    return random.Random(":".join(str(part) for part in parts))


@dataclass
class StreamPosition:
    """Where one worker of one rank stands: ``batches`` yielded in ``epoch`` after drawing ``records`` records."""

    epoch: int
    batches: int
    records: int


class ImageTextStream(torch.utils.data.IterableDataset):
    """Full, shuffled, rank- and worker-sharded training batches from one or more sources (see the module docstring).

    Use it with ``DataLoader(stream, batch_size=None, num_workers=...)`` (the stream batches itself); the trainer does
    that (`MSClipTrainer.get_train_dataloader`). Call `set_epoch` before each epoch.
    """

    def __init__(
        self,
        sources: Sequence[StreamSource],
        collator: Any,
        *,
        batch_size: int,
        num_samples: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        resampled: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        max_consecutive_skips: int = 10_000,
    ) -> None:
        """Configure the stream.

        Args:
            sources: the sources; their ``weight`` sets the mixing proportions.
            collator: an `ImageTextCollator` (``decode_record`` and ``collate_decoded`` are used).
            batch_size: pairs per batch (per device).
            num_samples: records per epoch over all ranks; default: the sources' record counts summed (`count_records`).
                Required in resampled mode.
            seed: seeds shard order, mixing, the shuffle buffer and augmentation.
            shuffle_buffer: records held in the shuffle buffer (0 or 1: no sample shuffling).
            shuffle_shards: shuffle the shard order of each pass (else every pass reads the shards in order).
            resampled: draw shards with replacement (no passes; an epoch is ``num_samples`` records).
            rank: this process's rank; world_size: the number of ranks.
            num_workers: the `DataLoader` workers that will read the stream (0: the main process); every worker
                yields the same number of batches, so that a slot's share of an epoch is a whole number of batches.
            max_consecutive_skips: stop with an error when this many records in a row are bad (a broken source).
        """
        super().__init__()
        if not sources:
            raise ValueError("a stream needs at least one source")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within a world of {world_size}")
        if num_samples is None:
            if resampled:
                raise ValueError("a resampled stream needs num_samples (the records of one epoch, over all ranks)")
            num_samples = sum(count_records(source) for source in sources)
        self.sources = list(sources)
        self.collator = collator
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.resampled = resampled
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        self.max_consecutive_skips = max_consecutive_skips
        self.epoch = 0
        self._resume: dict[int, StreamPosition] = {}
        if len(self) < 1:
            raise ValueError(
                f"an epoch of {num_samples} records is less than one batch of {batch_size} for each of "
                f"{world_size} rank(s) x {max(1, num_workers)} worker(s): give more data or a larger num_samples"
            )

    @property
    def batches_per_slot(self) -> int:
        """Batches each worker of each rank yields per epoch."""
        return self.num_samples // (self.world_size * max(1, self.num_workers) * self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.batches_per_slot * max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the shard order, mixing and shuffling of each epoch differ, reproducibly from the seed."""
        self.epoch = int(epoch)

    @property
    def source_names(self) -> list[str]:
        """Names of the sources, in the order of the per-source counts in `STREAM_INFO_KEY`."""
        return [source.name for source in self.sources]

    def fingerprint(self) -> dict[str, Any]:
        """What a saved position depends on; a resume with another fingerprint is refused."""
        return {
            "sources": [[source.name, len(source.shards), source.weight] for source in self.sources],
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle_shards": self.shuffle_shards,
            "resampled": self.resampled,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
        }

    def resume_from(self, state: Mapping[str, Any] | None) -> None:
        """Continue from a state saved by `save_stream_state` (``None``: start the epoch afresh)."""
        self._resume = {}
        if state is None:
            return
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(
                "the checkpoint's data stream was set up differently "
                f"(saved {state['fingerprint']}, now {self.fingerprint()}); resume with the same data, batch size, "
                "seed and world size"
            )
        self._resume = {int(worker): StreamPosition(**position) for worker, position in state["workers"].items()}
        for worker, position in sorted(self._resume.items()):
            logger.warning(
                "rank %d worker %d: the data stream resumes in epoch %d after batch %d, re-reading %d records "
                "without decoding them",
                self.rank,
                worker,
                position.epoch,
                position.batches,
                position.records,
            )

    # ------------------------------------------------------------------ records

    def _source_records(self, index: int, slot: int, slots: int) -> Iterator[Any]:
        """Records of one source for one slot, with `_PASS_END` after each pass (none in resampled mode)."""
        source = self.sources[index]
        if self.resampled:
            generator = _random("resample", self.seed, self.epoch, index, slot)
            empty_draws = 0
            while empty_draws < 10 * len(source.shards) + 10:
                empty_draws += 1
                for record in source.reader(generator.choice(source.shards)):
                    empty_draws = 0
                    yield record
            raise ValueError(f"the stream source {source.name!r} gave no record in {empty_draws} shard draws")
        for pass_index in itertools.count():
            order = list(source.shards)
            if self.shuffle_shards:
                _random("shards", self.seed, self.epoch, pass_index, index).shuffle(order)
            yielded = 0
            if len(order) >= slots:
                for shard in order[slot::slots]:
                    for record in source.reader(shard):
                        yielded += 1
                        yield record
            else:
                if pass_index == 0 and slot == 0:
                    logger.warning(
                        "%s has %d shard(s) for %d slots (ranks x DataLoader workers): every slot reads every shard "
                        "and keeps its share of the records; write more shards to read each once",
                        source.name,
                        len(order),
                        slots,
                    )
                position = 0
                for shard in order:
                    for record in source.reader(shard):
                        if position % slots == slot:
                            yielded += 1
                            yield record
                        position += 1
            if yielded == 0:
                raise ValueError(
                    f"the stream source {source.name!r} gave slot {slot} of {slots} no record in a whole pass"
                )
            yield _PASS_END

    def _mixed_records(self, slot: int, slots: int) -> Iterator[Any]:
        """``(source index, record)`` pairs (and `_PASS_END`) drawn from the sources by weight."""
        streams = [self._source_records(index, slot, slots) for index in range(len(self.sources))]
        if len(streams) == 1:
            for record in streams[0]:
                yield record if record is _PASS_END else (0, record)
            return
        weights = [source.weight for source in self.sources]
        generator = _random("mix", self.seed, self.epoch, slot)
        indices = list(range(len(streams)))
        while True:
            index = generator.choices(indices, weights)[0]
            record = next(streams[index])
            if record is _PASS_END:
                yield _PASS_END
                record = next(streams[index])
            yield index, record

    def _shuffled_records(self, slot: int, slots: int) -> Iterator[tuple[int, Mapping[str, Any]]]:
        """The mixed records through the shuffle buffer (emptied at each pass end), without end."""
        generator = _random("buffer", self.seed, self.epoch, slot)
        buffer: list[tuple[int, Mapping[str, Any]]] = []
        for item in self._mixed_records(slot, slots):
            if item is _PASS_END:
                generator.shuffle(buffer)
                yield from buffer
                buffer = []
                continue
            if self.shuffle_buffer <= 1:
                yield item
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            position = generator.randrange(self.shuffle_buffer)
            buffer[position], item = item, buffer[position]
            yield item

    # ------------------------------------------------------------------ batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 0)
        if num_workers != self.num_workers:
            raise RuntimeError(
                f"the stream was built for {self.num_workers} DataLoader worker(s) but is read by {num_workers}"
            )
        num_workers = max(1, num_workers)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        batches = self.batches_per_slot
        resume = self._resume.get(worker)
        if resume is not None and resume.epoch != self.epoch:
            resume = None
        first_batch, drawn = (resume.batches, resume.records) if resume is not None else (0, 0)
        for _ in range(min(first_batch, batches)):
            yield {RESUME_MARKER_KEY: torch.ones(1)}
        records = self._shuffled_records(slot, slots)
        for _ in range(drawn):  # re-read without decoding: the order depends on the records' sequence only
            next(records)
        for batch_index in range(first_batch, batches):
            pixel_values, captions, keys, skipped = [], [], [], []
            source_counts = [0] * len(self.sources)
            consecutive_skips = 0
            while len(captions) < self.batch_size:
                source_index, record = next(records)
                drawn += 1
                with seeded_global_rng(hash((self.seed, self.epoch, slot, drawn))):
                    caption, pixels, problem, detail = self.collator.decode_record(record)
                if problem is not None:
                    skipped.append([problem, record_name(record), detail])
                    consecutive_skips += 1
                    if consecutive_skips >= self.max_consecutive_skips:
                        raise RuntimeError(
                            f"{consecutive_skips} records in a row were bad (last: {detail}); is the source broken?"
                        )
                    continue
                consecutive_skips = 0
                pixel_values.append(pixels)
                captions.append(caption)
                keys.append(record_name(record))
                source_counts[source_index] += 1
            batch = self.collator.collate_decoded(pixel_values, captions)
            batch[STREAM_INFO_KEY] = {
                "position": [self.epoch, worker, batch_index + 1, drawn],
                "keys": keys,
                "skipped": skipped,
                "sources": source_counts,
            }
            yield batch


# --------------------------------------------------------------------------------------------------------------------
# The main process's side: accounting, seen-sample log, saved positions
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StreamMonitor:
    """Accounts for the batches a rank consumes from an `ImageTextStream` (in the main process, so each batch counts
    once however many workers made it, and batches prefetched but never trained do not count).

    It adds kept and skipped records to ``stats``, logs the first ``max_named`` skipped records of the rank by key and
    reason, counts records per source and keeps the position of each worker for `save_stream_state`.
    """

    stream: ImageTextStream
    stats: DataStats
    max_named: int = 20
    named: list[list[str]] = field(default_factory=list)
    source_counts: list[int] = field(default_factory=list)
    positions: dict[int, StreamPosition] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.source_counts:
            self.source_counts = [0] * len(self.stream.sources)

    def consume(self, info: Mapping[str, Any]) -> None:
        """Account for one consumed batch's `STREAM_INFO_KEY` entry."""
        epoch, worker, batches, drawn = (int(value) for value in info["position"])
        if any(position.epoch != epoch for position in self.positions.values()):
            self.positions = {}
        self.positions[worker] = StreamPosition(epoch=epoch, batches=batches, records=drawn)
        skipped = info["skipped"]
        empty = sum(1 for reason, _, _ in skipped if reason == EMPTY_CAPTION)
        kept = len(info["keys"])
        self.stats.add(
            seen=kept + len(skipped),
            kept=kept,
            skipped_empty_caption=empty,
            skipped_corrupt_image=len(skipped) - empty,
        )
        for reason, name, detail in skipped:
            if len(self.named) < self.max_named:
                self.named.append([reason, name])
                logger.warning("Skipping a record (%s): %s", reason, detail)
        for index, count in enumerate(info["sources"]):
            self.source_counts[index] += int(count)

    def mixture(self) -> dict[str, float]:
        """Achieved share of each source among the records consumed on this rank."""
        total = sum(self.source_counts) or 1
        return {name: count / total for name, count in zip(self.stream.source_names, self.source_counts, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        """Positions, counts and the stream's fingerprint, for a checkpoint."""
        return {
            "fingerprint": self.stream.fingerprint(),
            "workers": {str(worker): vars(position) for worker, position in self.positions.items()},
            "stats": self.stats.as_dict(),
            "source_counts": self.source_counts,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the counts and positions of a checkpoint and hand the positions to the stream."""
        self.stream.resume_from(state)
        self.positions = dict(self.stream._resume)
        self.stats.reset()
        self.stats.add(**{key: int(value) for key, value in state["stats"].items()})
        self.source_counts = [int(count) for count in state["source_counts"]]


def save_stream_state(monitor: StreamMonitor, checkpoint: str | os.PathLike, rank: int) -> Path:
    """Write this rank's stream state into a checkpoint folder (every rank writes its own file)."""
    path = Path(checkpoint) / STREAM_STATE_FILE.format(rank=rank)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(monitor.state_dict()))
    temporary.replace(path)
    return path


def load_stream_state(checkpoint: str | os.PathLike, rank: int) -> dict[str, Any] | None:
    """This rank's saved stream state (``None`` when the checkpoint has none, e.g. a map-style run)."""
    path = Path(checkpoint) / STREAM_STATE_FILE.format(rank=rank)
    return json.loads(path.read_text()) if path.is_file() else None


def parse_weighted_sources(data: str, weights: str | None) -> list[tuple[str, float]]:
    """Split ``"a::b"`` and ``"3::1"`` into ``[("a", 3.0), ("b", 1.0)]`` (equal weights when ``weights`` is None)."""
    locations = [part for part in data.split(SOURCE_SEPARATOR) if part]
    if weights is None:
        return [(location, 1.0) for location in locations]
    values = [float(part) for part in weights.split(SOURCE_SEPARATOR) if part]
    if len(values) != len(locations):
        raise ValueError(f"{len(values)} weights ({weights!r}) for {len(locations)} sources ({data!r})")
    return list(zip(locations, values, strict=True))


def build_stream_sources(
    data: str,
    weights: str | None = None,
    *,
    format: str = "auto",
    split: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
) -> list[StreamSource]:
    """Sources for ``--train_data a::b`` with ``--train_data_weights 3::1``: webdataset locations (local, or any URL
    with ``://``) read as shards, anything else through `data_msclip.load_dataset` (streamed)."""
    from .data_msclip import detect_format, load_dataset

    sources = []
    for location, weight in parse_weighted_sources(data, weights):
        remote = "://" in location
        kind = format if format != "auto" else ("webdataset" if remote else detect_format(location, split=split))
        if kind == "webdataset":
            sources.append(
                webdataset_source(
                    location,
                    weight=weight,
                    split=split,
                    image_field=image_column,
                    text_field=text_column,
                    count=not remote,
                )
            )
            continue
        dataset = load_dataset(
            location,
            format=kind,
            task="image-text",
            split=split,
            image_column=image_column,
            text_column=text_column,
            streaming=True,
        )
        sources.append(dataset_source(dataset, name=location, weight=weight))
    return sources


__all__ = [
    "ImageTextStream",
    "StreamMonitor",
    "StreamSource",
    "count_records",
    "count_webdataset_samples",
    "dataset_source",
    "load_stream_state",
    "parse_weighted_sources",
    "save_stream_state",
    "webdataset_source",
    "webdataset_shard_list",
]
