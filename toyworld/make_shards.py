"""Write real toy-world caption-image pairs as a shard set: the clean pairs of cleaning experiments.

    python -m toyworld.make_shards --count 30000 --seed 0 --out out/toy-pairs [--shard-size 1000] [--resolution 32] \
        [--jobs 8]

Shard i holds `make_pairs(len(shard i), shard_seed(seed, i), resolution)`, so each shard is generated alone
(memory stays at one shard per job) and a rerun skips the shards that are already complete. The shards are the
same bytes whatever --jobs is. The data-free runs use
shards from the diffusion generator (generation/) instead; both sets have the same format (docs/shards.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import PIL.Image
from tqdm import tqdm

from parclean.command import run_command
from parclean.shards import (
    MANIFEST_NAME,
    Sample,
    ShardRecord,
    read_shard_record,
    sample_key,
    shard_is_complete,
    write_manifest,
    write_shard,
)
from toyworld.render import make_pairs

logger = logging.getLogger(__name__)

NAME = "toy"
CONFIG_NAME = "config.json"


def shard_seed(seed: int, index: int) -> int:
    """The make_pairs seed of shard `index`: derived from (run seed, shard index), independent of the count."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_toy_shards(
    out_dir: str | Path, count: int, seed: int, shard_size: int = 1000, resolution: int = 32, *, progress: bool = True,
    jobs: int = 1,
) -> Path:
    """Write `count` toy pairs (lossless png) as shards of `shard_size` plus the manifest; return the manifest path.

    Resumable: shards that are complete (stats written, sha256 matching) are kept, the rest are (re)written, by
    `jobs` processes.
    """
    _check_arguments(count, seed, shard_size, resolution, jobs)
    out_dir = Path(out_dir)
    config = {"source": "toyworld", "count": count, "seed": seed, "resolution": resolution, "shard_size": shard_size}
    _claim_folder(out_dir, config)
    sizes = [min(shard_size, count - start) for start in range(0, count, shard_size)]
    shards = partial(_shard, out_dir, seed=seed, shard_size=shard_size, resolution=resolution)
    with ProcessPoolExecutor(jobs) if jobs > 1 else nullcontext() as pool:
        in_order = (pool.map if pool else map)(shards, range(len(sizes)), sizes)
        records = list(tqdm(in_order, total=len(sizes), desc="toy shards", unit="shard",
                            disable=not progress or None))
    return write_manifest(out_dir, NAME, records, config=config)


def _shard(out_dir: Path, index: int, size: int, *, seed: int, shard_size: int, resolution: int) -> ShardRecord:
    if shard_is_complete(out_dir, NAME, index, size):
        return read_shard_record(out_dir, NAME, index)
    return _write_one(out_dir, index, size, seed, shard_size, resolution)


def _write_one(out_dir: Path, index: int, size: int, seed: int, shard_size: int, resolution: int) -> ShardRecord:
    images, captions, labels = make_pairs(size, shard_seed(seed, index), resolution)
    samples = []
    for item, (pixels, caption, label) in enumerate(zip(images, captions, labels, strict=True)):
        meta = {
            "label": int(label),
            "source": "toyworld",
            "seed": seed,
            "shard_seed": shard_seed(seed, index),
            "index": index * shard_size + item,
            "resolution": resolution,
        }
        key = sample_key(index, item, shard_size)
        samples.append(Sample(key=key, image=PIL.Image.fromarray(pixels, "RGB"), caption=caption, meta=meta))
    return write_shard(out_dir, NAME, index, samples, image_format="png")


def _check_arguments(count: int, seed: int, shard_size: int, resolution: int, jobs: int) -> None:
    for name, value, low in (("count", count, 1), ("seed", seed, 0), ("shard_size", shard_size, 1),
                             ("resolution", resolution, 8), ("jobs", jobs, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _claim_folder(out_dir: Path, config: dict) -> None:
    """Record the settings beside the shards; refuse a folder whose shards were made with other settings."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir}: not a folder")
    path = out_dir / CONFIG_NAME
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != config:
            changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
            detail = ", ".join(f"{k}: {previous.get(k)!r} -> {config.get(k)!r}" for k in changed)
            raise ValueError(f"{out_dir}: its shards were made with other settings ({detail}); use a new --out")
    elif (out_dir / MANIFEST_NAME).is_file() or any(out_dir.glob("*.tar")):
        raise ValueError(f"{out_dir}: holds shards but no {CONFIG_NAME}; use a new --out folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.make_shards", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True, help="number of pairs")
    parser.add_argument("--seed", type=int, required=True, help="run seed (shard i uses a seed derived from it)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--shard-size", type=int, default=1000, help="pairs per shard (default 1000)")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--jobs", type=int, default=1, help="processes writing shards (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command("python -m toyworld.make_shards", lambda: write_and_log(args))


def write_and_log(args: argparse.Namespace) -> int:
    manifest = write_toy_shards(args.out, args.count, args.seed, args.shard_size, args.resolution, jobs=args.jobs)
    logger.info("toy shard set ready: %s", manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
