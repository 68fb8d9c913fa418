"""The cleaning stage's training data: an endless, step-indexed stream of batches read from a shard set.

The batch of step s is a function of (shard set, seed, shuffle_buffer, global_batch_size, s) only, so a resumed
run sees exactly what the interrupted one would have seen, whatever the number of processes or workers.
The pipeline, one stage per function (as open_clip_train/data.py lays it out):

    index (once per process): each shard's sample byte ranges, from the manifest (or its tar headers)
    epoch e: shard order shuffled by rng(seed, e) -> sample ids in shard order -> seeded shuffle buffer
    epochs chained -> global sample index -> global batches of G -> this rank's slice -> this worker's steps
          -> only those samples' byte ranges read -> parsed, checked, decoded, tokenized

Why a global order over sample ids, not shards split between readers: the tests (and resume across a change of
world size) pin that the global batch does not depend on the number of processes or workers, and that rank r
holds a contiguous slice of every global batch. A split by shards makes each reader's samples, and so every
batch, depend on how many readers there are. Here the order is computed from the index alone (webdataset's
shuffle buffer run over sample ids rather than over the samples: its picks depend only on the rng and the
count), so every process and worker knows which samples each step holds without reading any, and reads only
the byte ranges of its own: about 1x the set's bytes per epoch in total, whatever processes x workers is.
The cost is one ranged read per sample, in place of a streamed read per shard: cheap on a local disk,
latency-bound on object storage (see docs/data.md).

Contract, error policy and costs: docs/data.md.
"""

from __future__ import annotations

import io
import logging
import posixpath
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import PIL.Image
import torch

from parclean.loader_workers import worker_context
from parclean.shards import ShardError, read_manifest, scan_sample_offsets, shard_urls

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
    """One problem met while reading: a damaged shard (key None), or a bad sample replaced in its batch."""

    # "shard": a shard missing, cut short or overfull (its lost samples leave the stream);
    # "sample": a sample's fields or caption are bad, "decode": its image is (both replaced in the batch).
    kind: str
    filename: str
    key: str | None
    samples: int  # samples lost by this event
    reason: str


@dataclass
class DataStats:
    """Counts of what on_error="skip" dropped or replaced, in this process (damaged shards: once per stream)."""

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
            self.samples_skipped += event.samples
        else:
            self.samples_replaced += event.samples
        self.by_file[event.filename] = self.by_file.get(event.filename, 0) + event.samples
        if self.events <= LOG_FIRST or self.events % LOG_EVERY == 0:
            what = "rest of the shard skipped" if event.kind == "shard" else "replaced by another sample of the batch"
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

    `stats` (or the returned stream's `.stats`) counts what on_error="skip" dropped. The set is indexed here:
    a damaged shard raises (fail) or is counted (skip) before the first batch.
    """
    _check_arguments(image_size, global_batch_size, seed, start_step, rank, world_size, num_workers, on_error,
                     shuffle_buffer)
    stats = stats if stats is not None else DataStats()
    index = _index_set(str(location), on_error, stats)
    local = global_batch_size // world_size
    producer = _Producer(
        index=index, image_size=image_size, tokenizer=tokenizer, global_batch_size=global_batch_size, seed=seed,
        start_step=start_step, first=rank * local, last=(rank + 1) * local, on_error=on_error,
        shuffle_buffer=shuffle_buffer,
    )
    return BatchStream(producer, num_workers, stats)


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
        _WorkerSteps(producer), batch_size=None, num_workers=num_workers, collate_fn=_as_is,
        multiprocessing_context=worker_context(),
    )
    iterator = iter(loader)
    try:
        yield from iterator
    finally:
        del iterator  # shuts the workers down now, not at garbage collection


def _as_is(item: _Item) -> _Item:
    return item


class _WorkerSteps(torch.utils.data.IterableDataset):
    """A DataLoader worker's share: the steps it owns, of which it reads only this rank's samples."""

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
class _Item:
    step: int
    batch: Batch | None
    events: tuple[DataEvent, ...]
    failure: str | None = None


# ----------------------------------------------------------------------------------------------- the index


@dataclass(frozen=True)
class _Index:
    """Every readable sample of the set as a byte range of its shard; sample ids run shard by shard."""

    location: str
    fs: Any  # the fsspec filesystem of the set
    paths: list[str]  # per shard, in manifest order
    urls: list[str]
    filenames: list[str]
    first: np.ndarray  # (shards + 1,) id of each shard's first sample; first[-1] is the total
    starts: np.ndarray  # (total,) int64
    ends: np.ndarray  # (total,) int64

    @property
    def total(self) -> int:
        return int(self.first[-1])

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.first, ids, side="right") - 1


def _index_set(location: str, on_error: str, stats: DataStats) -> _Index:
    """Index the set: sample offsets from the manifest, or from the tar headers where the manifest has none or
    the file's size is not the manifest's (then the scan finds what is still readable)."""
    manifest = read_manifest(location)
    fs, root = fsspec.core.url_to_fs(location)
    urls = shard_urls(location)
    paths = [posixpath.join(root, shard["filename"]) for shard in manifest["shards"]]
    offsets = [_shard_offsets(fs, path, url, shard, on_error, stats)
               for path, url, shard in zip(paths, urls, manifest["shards"], strict=True)]
    counts = [len(o) - 1 if len(o) else 0 for o in offsets]
    if sum(counts) == 0:
        listed = sum(int(shard["count"]) for shard in manifest["shards"])
        what = "no readable sample in any shard of the set (all damaged?)" if listed else \
            "the manifest lists no samples"
        raise ShardError(f"{location}: {what}")
    return _Index(
        location=location, fs=fs, paths=paths, urls=urls, filenames=[s["filename"] for s in manifest["shards"]],
        first=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        starts=np.concatenate([o[:-1] for o in offsets if len(o)]).astype(np.int64),
        ends=np.concatenate([o[1:] for o in offsets if len(o)]).astype(np.int64),
    )


def _shard_offsets(fs: Any, path: str, url: str, shard: dict, on_error: str, stats: DataStats) -> list[int]:
    """The shard's sample offsets (count + 1 of them when whole); damage raises (fail) or is counted (skip)."""
    count, filename = int(shard["count"]), shard["filename"]
    try:
        size = fs.size(path)
    except FileNotFoundError:
        _shard_damage(url, filename, count, 0, "missing", on_error, stats)
        return []
    if "offsets" in shard and size == shard["bytes"]:
        return shard["offsets"]
    if size != shard["bytes"]:
        logger.info("%s: %d bytes, the manifest lists %d: reading its tar headers", url, size, shard["bytes"])
    with fs.open(path, "rb") as file:
        offsets, problem = scan_sample_offsets(file)
    found = max(len(offsets) - 1, 0)
    if problem is not None:
        _shard_damage(url, filename, count, found, f"unreadable after {found} samples ({problem})", on_error, stats)
    elif found < count:
        _shard_damage(url, filename, count, found, f"{found} samples, the manifest lists {count}", on_error, stats)
    elif found > count:
        _shard_damage(url, filename, count, count, f"holds more samples than the manifest's {count}", on_error,
                      stats)
        offsets = offsets[: count + 1]
    return offsets


def _shard_damage(url: str, filename: str, count: int, found: int, reason: str, on_error: str,
                  stats: DataStats) -> None:
    if on_error == "fail":
        raise ShardError(f"{filename}: damaged shard at {url}: {reason}; regenerate the shard "
                         "(verify_shards lists damage) or pass on_error='skip'")
    stats.record(DataEvent("shard", filename, None, max(count - found, 0), reason))


# ----------------------------------------------------------------------------------------------- the order


class _Producer:
    """Turns the index into (step, local batch) items; pure given its settings, so workers can share it."""

    def __init__(self, *, index: _Index, image_size: int, tokenizer: Callable[[list[str]], Any],
                 global_batch_size: int, seed: int, start_step: int, first: int, last: int, on_error: str,
                 shuffle_buffer: int):
        import open_clip  # imported when a stream is made: it pulls in timm and more

        self.index = index
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
        self._orders: dict[int, np.ndarray] = {}

    def run(self, worker: int, num_workers: int) -> Iterator[_Item]:
        """Items of the steps this worker owns (step % num_workers == worker), from start_step on, forever."""
        step = self.start_step + (worker - self.start_step) % num_workers
        while True:
            positions = np.arange(step * self.global_batch_size + self.first, step * self.global_batch_size + self.last)
            batch, events = self._decode(self._read(self._sample_ids(positions)))
            yield _Item(step, batch, tuple(events))
            step += num_workers

    def _sample_ids(self, positions: np.ndarray) -> np.ndarray:
        """The sample ids at these global stream positions (epoch = position // total)."""
        epochs, offsets = np.divmod(positions, self.index.total)
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets, strict=True)], dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s sample ids in stream order; the last two epochs used are kept."""
        if epoch not in self._orders:
            import webdataset as wds  # imports torch; see parclean.shards

            shard_rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, _SHARD_ORDER]))
            first = self.index.first.tolist()
            source = [i for s in shard_rng.permutation(len(first) - 1).tolist() for i in range(first[s], first[s + 1])]
            shuffle_seed = int(np.random.SeedSequence([self.seed, epoch, _SAMPLE_SHUFFLE]).generate_state(1)[0])
            # webdataset's buffer shuffle, driven by our own seeded rng (its default seeds from pid and time).
            size = self.shuffle_buffer
            order = wds.shuffle(size, size, rng=random.Random(shuffle_seed))(iter(source))
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = np.fromiter(order, dtype=np.int64, count=len(source))
        return self._orders[epoch]

    # ------------------------------------------------------------------------------------------- reading

    def _read(self, ids: np.ndarray) -> list[_Raw]:
        """Read these samples' byte ranges (one ranged read each; concurrent on async filesystems) and parse."""
        index = self.index
        shards = index.shard_of(ids)
        data = index.fs.cat_ranges([index.paths[s] for s in shards], index.starts[ids].tolist(),
                                   index.ends[ids].tolist(), on_error="return")
        return [_parse(index.filenames[s], index.urls[s], content) for s, content in zip(shards, data, strict=True)]

    # ------------------------------------------------------------------------------------------- decoding

    def _decode(self, raws: list[_Raw]) -> tuple[Batch, list[DataEvent]]:
        """Check, decode and tokenize this process's slice. With skip, a bad sample is replaced by the nearest
        good sample of the slice, because every rank's batch must keep its size (and the other readers never
        see this sample, so it cannot leave the global order)."""
        images: list[torch.Tensor | None] = []
        events = []
        for raw in raws:
            kind, problem = ("sample", raw.problem) if raw.problem else ("decode", None)
            if problem is None:
                try:
                    with PIL.Image.open(io.BytesIO(raw.image)) as image:
                        try:
                            images.append(self.transform(image.convert("RGB")))
                            continue
                        except _IMAGE_ERRORS as err:
                            problem = f"cannot decode the image ({type(err).__name__}: {err})"
                except _IMAGE_ERRORS as err:
                    problem = f"unreadable image ({type(err).__name__}: {err})"
            if self.on_error == "fail":
                raise ShardError(f"{raw.filename}: sample {raw.key}: {problem} (at {raw.url}); pass "
                                 "on_error='skip' to replace such samples")
            events.append(DataEvent(kind, raw.filename, raw.key, 1, problem))
            images.append(None)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise ShardError(f"{raws[0].filename}: no sample of a batch slice could be used ({events[0].reason})")
        # Nearest good sample, earlier one on ties: deterministic, and stays within this rank's slice.
        chosen = [i if images[i] is not None else min(good, key=lambda g, i=i: (abs(g - i), g))
                  for i in range(len(raws))]
        tokens = torch.as_tensor(self.tokenizer([raws[i].caption for i in chosen]), dtype=torch.int64)
        batch = Batch(images=torch.stack([images[i] for i in chosen]), tokens=tokens,
                      keys=[raws[i].key for i in chosen])
        return batch, events


@dataclass(frozen=True)
class _Raw:
    """A sample as read from its byte range, not decoded; `problem` says why it cannot be used."""

    key: str
    filename: str
    url: str
    image: bytes = b""
    caption: str = ""
    problem: str | None = None


def _parse(filename: str, url: str, content: bytes | Exception) -> _Raw:
    """The sample's tar members (webdataset's grouping: key up to the first '.', extension lower-cased)."""
    if isinstance(content, Exception):
        return _Raw("?", filename, url, problem=f"cannot be read ({_reason(content)})")
    fields: dict[str, bytes] = {}
    keys = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(content), mode="r:") as tar:
            for member in tar:
                key, _, ext = posixpath.basename(member.name).partition(".")
                keys.add(key)
                fields[ext.lower()] = tar.extractfile(member).read() if member.isfile() else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        return _Raw("?", filename, url, problem=f"its tar members do not parse ({_reason(err)})")
    key = "/".join(sorted(keys)) or "?"
    images = [ext for ext in IMAGE_EXTENSIONS if ext in fields]
    if len(keys) != 1 or len(images) != 1 or "txt" not in fields:
        return _Raw(key, filename, url, problem=f"has {sorted(fields)}, expected one image "
                                                f"({'/'.join(IMAGE_EXTENSIONS)}) and a txt")
    try:
        caption = fields["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return _Raw(key, filename, url, problem="caption is not UTF-8")
    return _Raw(key, filename, url, fields[images[0]], caption)


def _reason(err: BaseException) -> str:
    """One line from errors that fsspec or tarfile may have decorated with streams and URLs in their args."""
    if isinstance(err, OSError) and err.strerror:
        return f"{type(err).__name__}: {err.strerror}"
    first = err.args[0] if err.args else ""
    text = str(first).split(" @ ")[0] if isinstance(first, str) else str(err)
    return f"{type(err).__name__}: {text}".replace("\n", " ")
