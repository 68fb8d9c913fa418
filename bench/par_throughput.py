"""PAR training throughput with real data loading, next to the data loading rate alone.

A JPEG shard set is written with the project's shard writer (bench.data_loading.write_jpeg_set: 256 px by
default), then:

1. loading alone: the cleaning batch stream (cleaning/data.py, DataLoader workers) is iterated, nothing else;
2. PAR: the real trainer (cleaning.train.clean) runs on a model built from its open_clip config with random
   weights (no download), reading the same set through the same stream.

Both rates are steady state: the first `--warmup` steps are left out (PAR's from the trainer's own per-step log).
If (1) is well above (2), loading is not what limits training.

    python -m bench.par_throughput --arch ViT-B-32 --batch 4 --steps 2 --warmup 1 --count 64 --workers 2  # CPU check
    python -m bench.par_throughput --arch ViT-B-32 --batch 256 --steps 40 --warmup 10 --count 20000 \\
        --workers 12 --precision bf16                                                               # one GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from bench.data_loading import write_jpeg_set
from cleaning.data import batches
from cleaning.train import LOG_NAME, CleanConfig, DataConfig, clean
from parclean.models import create_model


def loading_rate(shards: str | Path, *, image_size: int, tokenizer, batch: int, workers: int, steps: int,
                 warmup: int) -> float:
    """Samples/s of the batch stream alone, after `warmup` batches."""
    with batches(str(shards), image_size=image_size, tokenizer=tokenizer, global_batch_size=batch, seed=0,
                 num_workers=workers) as stream:
        for _ in itertools.islice(stream, warmup):
            pass
        began = time.perf_counter()
        for _ in itertools.islice(stream, steps):
            pass
        return steps * batch / (time.perf_counter() - began)


def par_rate(shards: str | Path, out: Path, *, arch: str, batch: int, workers: int, steps: int, warmup: int,
             precision: str) -> float:
    """Samples/s of PAR training steps (loading included) after `warmup` steps, from the trainer's step log."""
    total = warmup + steps
    cfg = CleanConfig(steps=total, batch_size=batch, mixed_precision=precision, checkpoint_every=total, lr=1e-5,
                      data=DataConfig(num_workers=workers, verify=False))
    clean(cfg, create_model(arch, seed=0), shards, out, progress=False)
    log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    seconds = log[-1]["seconds"] - log[warmup - 1]["seconds"] if warmup else log[-1]["seconds"]
    return steps * batch / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.par_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--shards", help="an existing shard set (default: write a JPEG set in a temp folder)")
    parser.add_argument("--count", type=int, default=20000, help="samples in the written set")
    parser.add_argument("--resolution", type=int, default=256, help="pixels of the written JPEGs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    args = parser.parse_args(argv)

    model = create_model(args.arch, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or write_jpeg_set(Path(tmp) / "set", args.count, resolution=args.resolution)
        loading = loading_rate(shards, image_size=model.image_size, tokenizer=model.tokenizer, batch=args.batch,
                               workers=args.workers, steps=args.steps, warmup=args.warmup)
        par = par_rate(shards, Path(tmp) / "out", arch=args.arch, batch=args.batch, workers=args.workers,
                       steps=args.steps, warmup=args.warmup, precision=args.precision)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {where}; torch {torch.__version__}; {args.arch} {model.image_size} px, batch {args.batch}, "
          f"precision {args.precision}, {args.workers} workers, {args.steps} timed steps after {args.warmup}")
    print(f"  loading alone : {loading:10.1f} samples/s")
    print(f"  PAR (loading) : {par:10.1f} samples/s   (loading / PAR = {loading / par:.2f}x)")
    print(json.dumps({"arch": args.arch, "batch": args.batch, "workers": args.workers, "precision": args.precision,
                      "loading_samples_per_s": round(loading, 1), "par_samples_per_s": round(par, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
