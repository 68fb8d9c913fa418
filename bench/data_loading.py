"""Bytes read from the shard files per sample consumed by the cleaning data stream, at processes x workers.

Each process (rank) and each DataLoader worker should read only the samples it yields, so the bytes read per
sample consumed stay at about the set's bytes per sample whatever processes x workers is (not N times it).
The shard files are read through `counted://`, a local filesystem that counts every byte its files return
(shared by the forked DataLoader workers); ranks run one after another in this process, each with real
DataLoader workers. A JPEG set is written first with the project's shard writer (toy-world pictures with
noise, so that the JPEGs are about the size of generated ones).

    python -m bench.data_loading                                   # 1x0 and 4x4 on a 2,000-sample 256 px set
    python -m bench.data_loading --shards DIR --configs 1x0 2x2    # an existing set
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import PIL.Image
import webdataset  # noqa: F401 - registers webdataset.gopen, patched below
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from parclean.loader_workers import START_METHOD_VARIABLE
from parclean.shards import Sample, read_manifest, sample_key, write_manifest, write_shard

PROTOCOL = "counted"
_BYTES = multiprocessing.Value("q", 0)  # created before any fork: DataLoader workers add to the same counter


class CountingFileSystem(LocalFileSystem):
    """The local filesystem under `counted://`; reads from `.tar` files are added to a process-shared counter."""

    protocol = PROTOCOL

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, **kwargs: Any) -> LocalFileOpener:
        return _CountingFile(self._strip_protocol(path), mode, fs=self, **kwargs)


class _CountingFile(LocalFileOpener):
    def read(self, *args: Any) -> bytes:
        data = self.f.read(*args)
        if self.path.endswith(".tar"):
            with _BYTES.get_lock():
                _BYTES.value += len(data)
        return data


def _webdataset_open(url: str, mode: str = "rb", bufsize: int = 8192) -> Any:
    return fsspec.open(url, mode).open()


fsspec.register_implementation(PROTOCOL, CountingFileSystem, clobber=True)
# So that a reader that opens tars through webdataset (the loader before issue 19) is counted the same way.
sys.modules["webdataset.gopen"].gopen_schemes[PROTOCOL] = _webdataset_open


def tar_bytes_read() -> int:
    """Bytes returned so far by reads of `.tar` files opened through `counted://`, in this process and its forks."""
    return _BYTES.value


@dataclass(frozen=True)
class Reading:
    processes: int
    workers: int
    steps: int
    samples: int  # consumed, over all processes
    bytes_read: int  # from the shard files, over all processes and workers
    seconds: float

    @property
    def bytes_per_sample(self) -> float:
        return self.bytes_read / self.samples


@contextlib.contextmanager
def forked_workers() -> Iterator[None]:
    """DataLoader workers forked, so they add to this process's counter (the loader's default start method,
    forkserver, shares no memory with them); the setting is restored after."""
    previous = os.environ.get(START_METHOD_VARIABLE)
    os.environ[START_METHOD_VARIABLE] = "fork"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[START_METHOD_VARIABLE]
        else:
            os.environ[START_METHOD_VARIABLE] = previous


def measure(folder: str | Path, processes: int, workers: int, *, steps: int, global_batch_size: int,
            image_size: int, tokenizer: Callable, seed: int = 0) -> Reading:
    """Consume `steps` batches on each of `processes` ranks (one after another), counting the shard bytes read."""
    from cleaning.data import batches

    before, began = tar_bytes_read(), time.perf_counter()
    for rank in range(processes):
        with forked_workers(), batches(f"{PROTOCOL}://{Path(folder).resolve()}", image_size=image_size,
                                       tokenizer=tokenizer, global_batch_size=global_batch_size, seed=seed,
                                       rank=rank, world_size=processes, num_workers=workers) as stream:
            for _ in itertools.islice(stream, steps):
                pass
    return Reading(processes, workers, steps, steps * global_batch_size, tar_bytes_read() - before,
                   time.perf_counter() - began)


def write_jpeg_set(out: str | Path, count: int, *, shard_size: int = 500, resolution: int = 256,
                   seed: int = 0) -> Path:
    """A set of `count` toy-world pictures with noise as JPEG (quality 95) at `resolution`; returns its folder."""
    from toyworld.render import make_pairs

    out = Path(out)
    if (out / "manifest.json").exists():
        return out
    records = []
    for index, start in enumerate(range(0, count, shard_size)):
        size = min(shard_size, count - start)
        images, captions, _ = make_pairs(size, seed + index, resolution)
        rng = np.random.default_rng([seed, index])
        noisy = np.clip(images.astype(np.int16) + rng.normal(0, 6, images.shape), 0, 255).astype(np.uint8)
        samples = [Sample(sample_key(index, i, shard_size), PIL.Image.fromarray(noisy[i]), captions[i], {"i": i})
                   for i in range(size)]
        records.append(write_shard(out, "bench", index, samples, image_format="jpg"))
    write_manifest(out, "bench", records, config={"source": "bench.data_loading", "count": count,
                                                  "resolution": resolution, "seed": seed})
    return out


def set_bytes_per_sample(folder: str | Path) -> float:
    shards = read_manifest(folder)["shards"]
    return sum(shard["bytes"] for shard in shards) / sum(shard["count"] for shard in shards)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="an existing shard set (default: write a JPEG set in a temp folder)")
    parser.add_argument("--count", type=int, default=2000, help="samples in the written set")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--steps", type=int, default=50, help="batches consumed by each process")
    parser.add_argument("--configs", nargs="+", default=["1x0", "4x4"], help="PROCESSESxWORKERS")
    args = parser.parse_args(argv)

    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.shards or write_jpeg_set(Path(tmp) / "set", args.count, resolution=args.resolution)
        per_sample = set_bytes_per_sample(folder)
        print(f"set: {folder}, {per_sample:.0f} bytes per sample; batch {args.batch}, {args.steps} steps per "
              f"process; {platform.processor() or platform.machine()}")
        print("| processes x workers | bytes read per sample consumed | x set bytes per sample |")
        print("|---|---|---|")
        for config in args.configs:
            processes, workers = (int(n) for n in config.split("x"))
            reading = measure(folder, processes, workers, steps=args.steps, global_batch_size=args.batch,
                              image_size=args.image_size, tokenizer=tokenizer)
            print(f"| {processes} x {workers} | {reading.bytes_per_sample:.0f} | "
                  f"{reading.bytes_per_sample / per_sample:.2f} |")
            print(json.dumps({**asdict(reading), "set_bytes_per_sample": per_sample}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
