"""The cleaning stage's training data: an endless, step-indexed stream of batches read from a shard set.

The batch of step s is a function of (shard set, seed, shuffle_buffer, global_batch_size, s) only, so a resumed
run sees exactly what the interrupted one would have seen, whatever the number of processes or workers.
The pipeline, one stage per function (as open_clip_train/data.py lays it out):

    epoch e: shard order shuffled by rng(seed, e) -> each shard read by webdataset (tar -> raw samples)
          -> raw checks (fields, caption, image header) -> seeded shuffle buffer
    epochs chained -> global sample index -> global batches of G -> this rank's slice -> decode + tokenize

Contract, error policy and costs: docs/data.md.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

from parclean.shards import ShardError, read_manifest, shard_urls

logger = logging.getLogger(__name__)

ON_ERROR = ("fail", "skip")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Damage is logged for the first few events, then every Nth, and always counted in DataStats.
LOG_FIRST = 5
LOG_EVERY = 100
# What Pillow raises on bad image bytes (UnidentifiedImageError is an OSError).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)
# Streams of the seed sequence: one for the shard order, one for the sample shuffle.
_SHARD_ORDER, _SAMPLE_SHUFFLE = 0, 1


@dataclass(frozen=True)
class Batch:
    """One process's slice of a global batch: images in [0, 1] (not normalised), token ids, sample keys."""

    images: torch.Tensor  # (local_batch, 3, H, W) float32
    tokens: torch.Tensor  # (local_batch, context_length) int64
    keys: list[str]


@dataclass(frozen=True)
class DataEvent:
    """One problem met while reading: a damaged shard (key None), a skipped sample, or a replaced one."""

    kind: str  # "shard" (rest of a shard lost), "sample" (dropped before batching), "decode" (replaced in batch)
    filename: str
    key: str | None
    samples: int  # samples lost by this event
    reason: str


@dataclass
class DataStats:
    """Counts of what on_error="skip" dropped or replaced, in this process (a damaged shard counts per read)."""

    damaged_shards: int = 0
    samples_skipped: int = 0
    samples_replaced: int = 0
    events: int = 0
    by_file: dict[str, int] = field(default_factory=dict)

    def record(self, event: DataEvent) -> None:
        """Count the event and log it: the first LOG_FIRST events, then every LOG_EVERY-th."""
        self.events += 1
        if event.kind == "shard":
            self.damaged_shards += 1
        if event.kind == "decode":
            self.samples_replaced += event.samples
        else:
            self.samples_skipped += event.samples
        self.by_file[event.filename] = self.by_file.get(event.filename, 0) + event.samples
        if self.events <= LOG_FIRST or self.events % LOG_EVERY == 0:
            what = {"shard": "rest of the shard skipped", "sample": "sample skipped",
                    "decode": "image replaced by another sample of the batch"}[event.kind]
            where = event.filename if event.key is None else f"{event.filename}: sample {event.key}"
            logger.warning("%s: %s; %s (%d samples); problem %d so far, logged: first %d, then every %dth",
                           where, event.reason, what, event.samples, self.events, LOG_FIRST, LOG_EVERY)


def sample_count(location: str) -> int:
    """Samples in the shard set, from its manifest."""
    return sum(int(shard["count"]) for shard in read_manifest(location)["shards"])


def batches(
    location: str,
    *,
    image_size: int,
    tokenizer: Callable[[list[str]], Any],
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    on_error: str = "fail",
    shuffle_buffer: int = 2000,
    stats: DataStats | None = None,
) -> BatchStream:
    """The endless batch stream from `start_step` on; this rank's contiguous slice of each global batch.

    `stats` (or the returned stream's `.stats`) counts what on_error="skip" dropped.
    """
    _check_arguments(image_size, global_batch_size, seed, start_step, rank, world_size, num_workers, on_error,
                     shuffle_buffer)
    manifest = read_manifest(location)
    shards = [_Shard(url, entry["filename"], int(entry["count"]))
              for url, entry in zip(shard_urls(location), manifest["shards"], strict=True)]
    if sum(shard.count for shard in shards) == 0:
        raise ShardError(f"{location}: the manifest lists no samples")
    local = global_batch_size // world_size
    producer = _Producer(
        location=str(location), shards=shards, image_size=image_size, tokenizer=tokenizer,
        global_batch_size=global_batch_size, seed=seed, start_step=start_step, first=rank * local,
        last=(rank + 1) * local, on_error=on_error, shuffle_buffer=shuffle_buffer,
    )
    return BatchStream(producer, num_workers, stats if stats is not None else DataStats())


def _check_arguments(image_size: int, global_batch_size: int, seed: int, start_step: int, rank: int,
                     world_size: int, num_workers: int, on_error: str, shuffle_buffer: int) -> None:
    for name, value, low in (("image_size", image_size, 1), ("global_batch_size", global_batch_size, 1),
                             ("seed", seed, 0), ("start_step", start_step, 0), ("world_size", world_size, 1),
                             ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if global_batch_size % world_size:
        raise ValueError(f"global_batch_size {global_batch_size} does not divide by world_size {world_size}: "
                         f"each process takes an equal slice; use a multiple of {world_size}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank!r} outside 0..{world_size - 1}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error {on_error!r} not one of {ON_ERROR}")


class BatchStream(Iterator[Batch]):
    """Iterator over Batch with the DataStats it fills; close() (or `with`, or dropping it) stops its workers."""

    def __init__(self, producer: _Producer, num_workers: int, stats: DataStats):
        self.stats = stats
        # A module-level generator, not a method: no reference cycle, so dropping the stream stops the workers.
        self._batches = _in_step_order(producer, num_workers, stats)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        return next(self._batches)

    def close(self) -> None:
        self._batches.close()

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _in_step_order(producer: _Producer, num_workers: int, stats: DataStats) -> Iterator[Batch]:
    """Yield batches in step order, recording each batch's events as it is handed out."""
    items = producer.run(0, 1) if num_workers == 0 else _from_workers(producer, num_workers)
    waiting: dict[int, _Item] = {}
    step = producer.start_step
    try:
        for item in items:
            if item.failure is not None:
                raise ShardError(item.failure)
            waiting[item.step] = item
            # Workers own steps step % num_workers; their results may arrive out of step order: reorder.
            while step in waiting:
                ready = waiting.pop(step)
                for event in ready.events:
                    stats.record(event)
                yield ready.batch
                step += 1
    finally:
        items.close()  # stop the workers now, also when raising (a traceback would keep them alive)


def _from_workers(producer: _Producer, num_workers: int) -> Iterator[_Item]:
    loader = torch.utils.data.DataLoader(
        _WorkerSteps(producer), batch_size=None, num_workers=num_workers, collate_fn=_as_is
    )
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        del iterator  # shuts the workers down now, not at garbage collection


def _as_is(item: _Item) -> _Item:
    return item


class _WorkerSteps(torch.utils.data.IterableDataset):
    """A DataLoader worker's share: every worker reads the raw stream, decodes only the steps it owns."""

    def __init__(self, producer: _Producer):
        super().__init__()
        self.producer = producer

    def __iter__(self) -> Iterator[_Item]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        try:
            yield from self.producer.run(worker, num_workers)
        except ShardError as err:
            # Handed to the main process as data: the DataLoader would re-raise it with a traceback in the message.
            yield _Item(step=-1, batch=None, events=(), failure=str(err))


@dataclass(frozen=True)
class _Shard:
    url: str
    filename: str
    count: int


@dataclass(frozen=True)
class _Raw:
    """A sample as read from the tar, not decoded: what the shuffle buffer holds."""

    key: str
    filename: str
    image: bytes
    caption: str


@dataclass(frozen=True)
class _Item:
    step: int
    batch: Batch | None
    events: tuple[DataEvent, ...]
    failure: str | None = None


class _Producer:
    """Turns the shard set into (step, local batch) items; pure given its settings, so workers can share it."""

    def __init__(self, *, location: str, shards: list[_Shard], image_size: int, tokenizer: Callable[[list[str]], Any],
                 global_batch_size: int, seed: int, start_step: int, first: int, last: int, on_error: str,
                 shuffle_buffer: int):
        import open_clip  # imported when a stream is made: it pulls in timm and more

        self.location = location
        self.shards = shards
        self.total = sum(shard.count for shard in shards)
        self.tokenizer = tokenizer
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.start_step = start_step
        self.first, self.last = first, last
        self.on_error = on_error
        self.shuffle_buffer = shuffle_buffer
        # open_clip's val transform (resize shorter side, bicubic; centre crop; to tensor) with an identity
        # normalisation: the trainer augments and normalises.
        self.transform = open_clip.image_transform(image_size, is_train=False, mean=(0.0,) * 3, std=(1.0,) * 3)
        self._pending: list[DataEvent] = []

    # ------------------------------------------------------------------------------------------- batching

    def run(self, worker: int, num_workers: int) -> Iterator[_Item]:
        """Items of the steps this worker owns (step % num_workers == worker), from start_step on, forever."""
        size, step, index = self.global_batch_size, self.start_step, 0
        local: list[_Raw] = []
        events: list[DataEvent] = []
        for raw in self._samples_from(step * size):
            owned = step % num_workers == worker
            if owned:
                events += self._pending
                if self.first <= index < self.last:
                    local.append(raw)
            self._pending.clear()
            index += 1
            if index == size:
                if owned:
                    batch, replaced = self._decode(local)
                    yield _Item(step, batch, (*events, *replaced))
                    events = []
                local, index, step = [], 0, step + 1

    def _samples_from(self, position: int) -> Iterator[_Raw]:
        """The endless raw stream from global sample index `position`: whole epochs before it are not read."""
        epoch, offset = divmod(position, self.total)
        while True:
            seen = 0
            for raw in itertools.islice(self._epoch(epoch), offset, None):
                seen += 1
                yield raw
            if seen == 0 and offset == 0:
                raise ShardError(f"{self.location}: no readable sample in any shard of the set (all damaged?)")
            epoch, offset = epoch + 1, 0

    def _epoch(self, epoch: int) -> Iterator[_Raw]:
        import webdataset as wds  # imports torch; see parclean.shards

        shard_rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, _SHARD_ORDER]))
        order = shard_rng.permutation(len(self.shards))
        shuffle_seed = int(np.random.SeedSequence([self.seed, epoch, _SAMPLE_SHUFFLE]).generate_state(1)[0])
        source = (raw for index in order for raw in self._read_shard(self.shards[index]))
        # webdataset's buffer shuffle, driven by our own seeded rng (its default seeds from pid and time).
        size = self.shuffle_buffer
        return wds.shuffle(size, size, rng=random.Random(shuffle_seed))(source)

    # ------------------------------------------------------------------------------------------- reading

    def _read_shard(self, shard: _Shard) -> Iterator[_Raw]:
        """The shard's samples through webdataset; damage raises (fail) or ends the shard with an event (skip)."""
        import webdataset as wds

        # One dataset per shard, so that a failure names its shard; we order shards ourselves (no shardshuffle)
        # and every process and worker reads every shard (no node or worker splitting).
        dataset = wds.WebDataset([shard.url], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False)
        samples = iter(dataset)
        count = 0
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except Exception as err:  # noqa: BLE001 - tarfile, gopen and webdataset raise many types
                self._shard_damage(shard, count, f"unreadable after {count} samples ({_reason(err)})")
                return
            count += 1
            if count > shard.count:
                self._shard_damage(shard, count, f"holds more samples than the manifest's {shard.count}")
                return
            raw = self._check_sample(shard, sample)
            if raw is not None:
                yield raw
        if count < shard.count:
            self._shard_damage(shard, count, f"{count} samples, the manifest lists {shard.count}")

    def _shard_damage(self, shard: _Shard, count: int, reason: str) -> None:
        if self.on_error == "fail":
            raise ShardError(f"{shard.filename}: damaged shard at {shard.url}: {reason}; regenerate the shard "
                             "(verify_shards lists damage) or pass on_error='skip'")
        self._pending.append(DataEvent("shard", shard.filename, None, max(shard.count - count, 0), reason))

    def _check_sample(self, shard: _Shard, sample: dict[str, Any]) -> _Raw | None:
        """Cheap checks on the raw sample (fields, UTF-8 caption, image header): no pixel is decoded here."""
        key = sample["__key__"]
        images = [ext for ext in IMAGE_EXTENSIONS if ext in sample]
        problem = None
        if len(images) != 1 or "txt" not in sample:
            fields = sorted(name for name in sample if not name.startswith("__"))
            problem = f"has {fields}, expected one image ({'/'.join(IMAGE_EXTENSIONS)}) and a txt"
        else:
            try:
                caption = sample["txt"].decode("utf-8")
                with PIL.Image.open(io.BytesIO(sample[images[0]])):
                    pass
            except UnicodeDecodeError:
                problem = "caption is not UTF-8"
            except _IMAGE_ERRORS as err:
                problem = f"unreadable image ({type(err).__name__}: {err})"
        if problem is None:
            return _Raw(key, shard.filename, sample[images[0]], caption)
        if self.on_error == "fail":
            raise ShardError(f"{shard.filename}: sample {key}: {problem} (at {shard.url}); pass on_error='skip' "
                             "to skip such samples")
        self._pending.append(DataEvent("sample", shard.filename, key, 1, problem))
        return None

    # ------------------------------------------------------------------------------------------- decoding

    def _decode(self, raws: list[_Raw]) -> tuple[Batch, list[DataEvent]]:
        """Decode and tokenize this process's slice. With skip, an image that fails to decode is replaced by
        the nearest decodable sample of the slice, because every rank's batch must keep its size."""
        images: list[torch.Tensor | None] = []
        events = []
        for raw in raws:
            try:
                with PIL.Image.open(io.BytesIO(raw.image)) as image:
                    images.append(self.transform(image.convert("RGB")))
            except _IMAGE_ERRORS as err:
                reason = f"cannot decode the image ({type(err).__name__}: {err})"
                if self.on_error == "fail":
                    raise ShardError(f"{raw.filename}: sample {raw.key}: {reason}; pass on_error='skip' to replace "
                                     "such samples") from None
                events.append(DataEvent("decode", raw.filename, raw.key, 1, reason))
                images.append(None)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise ShardError(f"{raws[0].filename}: no image of a batch slice could be decoded ({events[0].reason})")
        # Nearest good sample, earlier one on ties: deterministic, and stays within this rank's slice.
        chosen = [i if images[i] is not None else min(good, key=lambda g, i=i: (abs(g - i), g))
                  for i in range(len(raws))]
        tokens = torch.as_tensor(self.tokenizer([raws[i].caption for i in chosen]), dtype=torch.int64)
        batch = Batch(images=torch.stack([images[i] for i in chosen]), tokens=tokens,
                      keys=[raws[i].key for i in chosen])
        return batch, events


def _reason(err: BaseException) -> str:
    """One line from errors that webdataset has decorated with streams and URLs in their args."""
    if isinstance(err, OSError) and err.strerror:
        return f"{type(err).__name__}: {err.strerror}"
    first = err.args[0] if err.args else ""
    text = str(first).split(" @ ")[0] if isinstance(first, str) else str(err)
    return f"{type(err).__name__}: {text}".replace("\n", " ")
