"""The cleaning data stream: real toy shards read through webdataset; determinism, resume, ranks, workers, damage."""

from __future__ import annotations

import io
import itertools
import json
import logging
import multiprocessing
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from cleaning.data import Batch, DataStats, batches, sample_count
from parclean.models import register_configs
from parclean.shards import ShardError, iter_samples, read_manifest, verify_shards
from toyworld.make_shards import main as make_shards_main
from toyworld.make_shards import shard_seed, write_toy_shards
from toyworld.render import make_pairs

COUNT, SHARD_SIZE = 240, 50  # 5 shards: 50, 50, 50, 50, 40
G = 32  # 7.5 global batches per epoch: batch 7 straddles epochs 0 and 1


@pytest.fixture(scope="module")
def toy_set(toy_shards) -> Path:
    return toy_shards(COUNT, seed=0, shard_size=SHARD_SIZE)


@pytest.fixture(scope="module")
def tokenizer():
    register_configs()
    return open_clip.get_tokenizer("tiny-test")


@pytest.fixture(scope="module")
def fresh(toy_set: Path, tokenizer) -> list[Batch]:
    """Steps 0..19 of the reference stream (2.7 epochs)."""
    return take(toy_set, tokenizer, 20)


def take(location, tokenizer, n: int, **kw) -> list[Batch]:
    kw.setdefault("global_batch_size", G)
    with batches(str(location), image_size=32, tokenizer=tokenizer, seed=kw.pop("seed", 7), **kw) as stream:
        return list(itertools.islice(stream, n))


def assert_same(got: list[Batch], want: list[Batch]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.keys == b.keys, f"batch {step}"
        assert torch.equal(a.images, b.images), f"batch {step}"
        assert torch.equal(a.tokens, b.tokens), f"batch {step}"


def all_keys(location: Path) -> set[str]:
    return {key for key, *_ in iter_samples(location)}


def copy_set(toy_set: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(toy_set, tmp_path / "copy"))


def rewrite_member(tar_path: Path, name: str, data: bytes) -> None:
    """Replace one member's bytes, keeping every other member and the order."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, content in members:
            content = data if member.name == name else content
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))


# ----------------------------------------------------------------------------------------------- contents


def test_batch_shapes_dtypes_and_range(toy_set: Path, tokenizer, fresh: list[Batch]) -> None:
    assert sample_count(str(toy_set)) == COUNT
    batch = fresh[0]
    assert batch.images.shape == (G, 3, 32, 32) and batch.images.dtype == torch.float32
    assert batch.tokens.shape == (G, 24) and batch.tokens.dtype == torch.int64
    assert 0.0 <= batch.images.min() and batch.images.max() <= 1.0
    assert batch.images.std() > 0.1  # real pictures, not a constant
    assert len(set(batch.keys)) == G and set(batch.keys) <= all_keys(toy_set)


def test_images_and_tokens_are_the_stored_pairs(toy_set: Path, tokenizer, fresh: list[Batch]) -> None:
    stored = {key: (np.asarray(image), caption) for key, image, caption, _ in iter_samples(toy_set)}
    for batch in fresh[:2]:
        pixels = np.stack([stored[key][0] for key in batch.keys])
        # 32x32 stored, 32x32 asked: resize and crop are no-ops, so the tensors are the png bytes / 255 exactly.
        assert torch.equal(batch.images, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
        assert torch.equal(batch.tokens, tokenizer([stored[key][1] for key in batch.keys]))


def test_resize_and_centre_crop_follow_open_clip(toy_set: Path, tokenizer) -> None:
    stored = {key: image for key, image, *_ in iter_samples(toy_set)}
    with batches(str(toy_set), image_size=20, tokenizer=tokenizer, global_batch_size=4, seed=7) as stream:
        batch = next(stream)
    reference = open_clip.image_transform(20, is_train=False, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert batch.images.shape == (4, 3, 20, 20)
    assert torch.equal(batch.images, torch.stack([reference(stored[key]) for key in batch.keys]))


# ----------------------------------------------------------------------------------------------- determinism


def test_same_stream_on_every_call_with_epochs(toy_set: Path, tokenizer, fresh: list[Batch]) -> None:
    assert_same(take(toy_set, tokenizer, 9), fresh[:9])
    keys = [key for batch in fresh for key in batch.keys]
    epochs = [keys[0:COUNT], keys[COUNT : 2 * COUNT]]
    for epoch in epochs:  # each epoch is every sample exactly once, batch 7 holding the end of 0 and start of 1
        assert sorted(epoch) == sorted(all_keys(toy_set))
    assert epochs[0] != epochs[1]  # a new order every epoch
    other_seed = take(toy_set, tokenizer, 1, seed=8)[0]
    assert other_seed.keys != fresh[0].keys


@pytest.mark.parametrize("start", [3, 7, 15, 16])  # mid epoch 0, straddling 0/1, epoch 2 start, mid epoch 2
def test_resume_gives_exactly_the_later_steps(toy_set: Path, tokenizer, fresh: list[Batch], start: int) -> None:
    assert_same(take(toy_set, tokenizer, 3, start_step=start), fresh[start : start + 3])


def test_far_resume_skips_whole_epochs_unread(toy_set: Path, tokenizer) -> None:
    began = time.perf_counter()
    # 48 divides 240: step 5 * 10**7 starts epoch 10**7; reading the epochs before it would take days.
    far = take(toy_set, tokenizer, 5, global_batch_size=48, start_step=5 * 10**7)
    assert time.perf_counter() - began < 10
    keys = [key for batch in far for key in batch.keys]
    assert sorted(keys) == sorted(all_keys(toy_set))
    assert keys != [key for batch in take(toy_set, tokenizer, 5, global_batch_size=48) for key in batch.keys]


def test_resume_does_not_decode_skipped_samples(toy_set: Path, tokenizer, fresh: list[Batch], tmp_path: Path) -> None:
    damaged = copy_set(toy_set, tmp_path)
    victim = fresh[0].keys[5]
    shard = damaged / f"toy-{victim[:6]}.tar"
    with tarfile.open(shard) as tar:
        png = tar.extractfile(f"{victim}.png").read()
    rewrite_member(shard, f"{victim}.png", png[: len(png) // 2])  # header intact, pixel data cut
    with pytest.raises(ShardError, match=rf"toy-{victim[:6]}\.tar: sample {victim}: cannot decode"):
        take(damaged, tokenizer, 1)
    # From step 1 the damaged sample is read (it sits in step 0) but never decoded.
    assert_same(take(damaged, tokenizer, 6, start_step=1), fresh[1:7])
    # With skip, the undecodable image is replaced by its neighbour in the batch, and counted.
    stats = DataStats()
    replaced = take(damaged, tokenizer, 1, on_error="skip", stats=stats)[0]
    assert stats.samples_replaced == 1 and stats.samples_skipped == 0
    assert replaced.keys[5] == fresh[0].keys[4] and torch.equal(replaced.images[5], fresh[0].images[4])
    assert torch.equal(replaced.images[6:], fresh[0].images[6:])


# ----------------------------------------------------------------------------------------------- processes


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_concatenate_to_the_global_batch(toy_set: Path, tokenizer, fresh: list[Batch],
                                                     world_size: int) -> None:
    slices = [take(toy_set, tokenizer, 3, start_step=6, rank=r, world_size=world_size) for r in range(world_size)]
    for step, parts in enumerate(zip(*slices, strict=True)):
        assert all(part.images.shape[0] == G // world_size for part in parts)
        gathered = Batch(torch.cat([p.images for p in parts]), torch.cat([p.tokens for p in parts]),
                         [key for p in parts for key in p.keys])
        assert_same([gathered], [fresh[6 + step]])


def test_workers_give_the_single_process_stream(toy_set: Path, tokenizer, fresh: list[Batch]) -> None:
    # start 3: worker 1 owns the first step, so the main process must put the workers' results back in order.
    assert_same(take(toy_set, tokenizer, 8, start_step=3, num_workers=2), fresh[3:11])
    assert multiprocessing.active_children() == []  # closing the stream stopped its workers


def test_each_process_and_worker_reads_only_its_share(toy_set: Path, tokenizer) -> None:
    from bench.data_loading import measure

    single = measure(toy_set, 1, 0, steps=40, global_batch_size=16, image_size=32, tokenizer=tokenizer)
    spread = measure(toy_set, 2, 2, steps=40, global_batch_size=16, image_size=32, tokenizer=tokenizer)
    set_bytes = sum(path.stat().st_size for path in toy_set.glob("*.tar")) / COUNT
    # One reader reads each sample's bytes once; 2 ranks x 2 workers together read about the same, not 4x
    # (a little more: each DataLoader worker prefetches a few steps past the last one consumed).
    assert 0.9 * set_bytes < single.bytes_per_sample < 1.1 * set_bytes
    # Not less either: the workers' reads are counted (a count that missed them would pass the bound above).
    assert single.bytes_per_sample <= spread.bytes_per_sample <= 1.2 * single.bytes_per_sample


# ----------------------------------------------------------------------------------------------- damage


def cut_at_sample(shard: Path, index: int, inside_image: bool = False) -> list[str]:
    """Truncate the tar where sample `index` begins (or inside its png's data); return the keys lost."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    keys = sorted({m.name.split(".")[0] for m in members})
    if inside_image:
        cut = next(m.offset_data + m.size // 2 for m in members if m.name == f"{keys[index]}.png")
    else:
        cut = min(m.offset for m in members if m.name.startswith(keys[index] + "."))
    with shard.open("r+b") as file:
        file.truncate(cut)
    return keys[index:]


@pytest.mark.parametrize("damage", ["cut mid-member", "cut at a sample", "missing file"])
def test_damaged_shard_fails_naming_the_file(toy_set: Path, tokenizer, tmp_path: Path, damage: str) -> None:
    damaged = copy_set(toy_set, tmp_path)
    shard = damaged / "toy-000002.tar"
    if damage == "cut mid-member":
        cut_at_sample(shard, 25, inside_image=True)
    elif damage == "cut at a sample":
        cut_at_sample(shard, 20)
    else:
        shard.unlink()
    with pytest.raises(ShardError) as caught:
        take(damaged, tokenizer, 10)
    message = str(caught.value)
    assert message.startswith("toy-000002.tar: damaged shard at ") and "\n" not in message
    if damage == "cut at a sample":
        assert "20 samples, the manifest lists 50" in message
    if damage == "cut mid-member":
        assert "unreadable after 25 samples (ReadError: unexpected end of data)" in message
        # From a DataLoader worker: the same one line.
        with pytest.raises(ShardError) as caught:
            take(damaged, tokenizer, 10, num_workers=2)
        assert str(caught.value) == message
        assert multiprocessing.active_children() == []  # the workers stopped with the error


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_continues_counts_and_logs(toy_set: Path, tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                        num_workers: int) -> None:
    damaged = copy_set(toy_set, tmp_path)
    lost = cut_at_sample(damaged / "toy-000002.tar", 20)
    stats = DataStats()
    with caplog.at_level(logging.WARNING, logger="cleaning.data"):
        # 210 readable samples: 7 batches of 30 are exactly epoch 0 of the damaged set.
        got = take(damaged, tokenizer, 7, global_batch_size=30, num_workers=num_workers, on_error="skip",
                   stats=stats)
    keys = [key for batch in got for key in batch.keys]
    assert sorted(keys) == sorted(all_keys(toy_set) - set(lost)) and len(lost) == 30
    assert (stats.damaged_shards, stats.samples_skipped, stats.by_file) == (1, 30, {"toy-000002.tar": 30})
    assert any("toy-000002.tar" in record.getMessage() for record in caplog.records)
    if num_workers:
        reference = DataStats()
        single = take(damaged, tokenizer, 7, global_batch_size=30, on_error="skip", stats=reference)
        assert_same(got, single)
        assert reference == stats


def test_unreadable_image_is_replaced_or_fails(toy_set: Path, tokenizer, tmp_path: Path) -> None:
    damaged = copy_set(toy_set, tmp_path)
    rewrite_member(damaged / "toy-000001.tar", "00000107.png", b"not an image")
    # One batch of COUNT is all of epoch 0, so it holds the damaged sample.
    with pytest.raises(ShardError, match=r"toy-000001\.tar: sample 00000107: unreadable image"):
        take(damaged, tokenizer, 1, global_batch_size=COUNT)
    stats = DataStats()
    got = take(damaged, tokenizer, 1, global_batch_size=COUNT, on_error="skip", stats=stats)[0]
    assert stats.samples_replaced == 1 and stats.samples_skipped == 0 and stats.by_file == {"toy-000001.tar": 1}
    # Only the reader of that sample sees it is bad, so it keeps its place and takes its neighbour's pair.
    where = take(toy_set, tokenizer, 1, global_batch_size=COUNT)[0].keys.index("00000107")
    neighbour = where - 1 if where else 1
    assert got.keys[where] == got.keys[neighbour] and torch.equal(got.images[where], got.images[neighbour])
    assert set(got.keys) == all_keys(toy_set) - {"00000107"}


def test_missing_location_names_it(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(ShardError, match=str(tmp_path / "nowhere")):
        batches(str(tmp_path / "nowhere"), image_size=32, tokenizer=tokenizer, global_batch_size=4, seed=0)
    with pytest.raises(ShardError, match="no manifest"):
        sample_count(str(tmp_path))


def test_fsspec_url_reads_the_same(toy_set: Path, tokenizer, fresh: list[Batch]) -> None:
    assert_same(take(f"file://{toy_set}", tokenizer, 1), fresh[:1])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"global_batch_size": 30, "world_size": 4}, "does not divide by world_size 4"),
        ({"rank": 2, "world_size": 2}, "rank 2 outside 0..1"),
        ({"on_error": "ignore"}, "on_error 'ignore'"),
        ({"start_step": -1}, "start_step must be"),
    ],
)
def test_bad_arguments_are_refused(toy_set: Path, tokenizer, kw: dict, message: str) -> None:
    kw = {"global_batch_size": 32, **kw}
    with pytest.raises(ValueError, match=message):
        batches(str(toy_set), image_size=32, tokenizer=tokenizer, seed=0, **kw)


# ----------------------------------------------------------------------------------------------- toy shards


def test_toy_shards_hold_make_pairs_output(toy_set: Path) -> None:
    manifest = read_manifest(toy_set)
    assert [s["count"] for s in manifest["shards"]] == [50, 50, 50, 50, 40]
    assert manifest["config"] == {"source": "toyworld", "count": COUNT, "seed": 0, "resolution": 32,
                                  "shard_size": SHARD_SIZE}
    assert verify_shards(toy_set, deep=True) == []
    images, captions, labels = make_pairs(40, shard_seed(0, 4), 32)
    last = [sample for sample in iter_samples(toy_set) if sample[0].startswith("000004")]
    for (_, image, caption, meta), pixels, text, label in zip(last, images, captions, labels, strict=True):
        assert np.array_equal(np.asarray(image), pixels) and caption == text  # png: lossless
        assert meta["label"] == label and meta["source"] == "toyworld" and meta["seed"] == 0


def test_toy_shards_resume_and_refuse_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    assert make_shards_main(["--count", "12", "--seed", "3", "--out", str(out), "--shard-size", "5"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    sha = json.loads((out / "manifest.json").read_text())["shards"][1]["sha256"]
    (out / "toy-000001_stats.json").unlink()  # shard 1 not done any more
    write_toy_shards(out, 12, 3, shard_size=5, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert [name for name in before if before[name] != after[name]] == ["toy-000001.tar"]
    assert json.loads((out / "manifest.json").read_text())["shards"][1]["sha256"] == sha  # same bytes again
    with pytest.raises(ValueError, match=r"seed: 3 -> 4"):
        write_toy_shards(out, 12, 4, shard_size=5, progress=False)


def test_toy_shards_in_parallel_are_the_same_bytes(tmp_path: Path) -> None:
    write_toy_shards(tmp_path / "one", 12, 3, shard_size=5, progress=False)
    assert make_shards_main(["--count", "12", "--seed", "3", "--out", str(tmp_path / "two"), "--shard-size", "5",
                             "--jobs", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir()) and len(names) == 9
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    with pytest.raises(ValueError, match="jobs must be"):
        write_toy_shards(tmp_path / "three", 12, 3, shard_size=5, progress=False, jobs=0)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # a worker that died at shutdown
def test_loader_workers_give_the_stream_after_a_prefect_flow_ran_in_this_process(prefect_harness, toy_set: Path,
                                                                                 tokenizer, fresh: list[Batch]) -> None:
    # The data-free flow cleans inside a Prefect flow run, whose services leave exit hooks that fail in a forked
    # child (tests/test_evaluate.py has the same check for the eval loader).
    from prefect import flow

    @flow
    def any_flow() -> int:
        return 1

    assert any_flow() == 1
    assert_same(take(toy_set, tokenizer, 8, num_workers=2), fresh[:8])


def test_the_loader_start_method_is_forkserver_unless_the_variable_names_another(monkeypatch) -> None:
    from parclean.loader_workers import START_METHOD_VARIABLE, worker_context

    monkeypatch.delenv(START_METHOD_VARIABLE, raising=False)
    assert worker_context().get_start_method() == "forkserver"
    monkeypatch.setenv(START_METHOD_VARIABLE, "spawn")
    assert worker_context().get_start_method() == "spawn"
    monkeypatch.setenv(START_METHOD_VARIABLE, "frok")
    with pytest.raises(ValueError, match="PARCLEAN_LOADER_START_METHOD='frok': use one of"):
        worker_context()
