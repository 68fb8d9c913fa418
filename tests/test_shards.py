"""The shard format: real webdataset reads what write_shard writes; resume and verify catch damaged files."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import PIL.Image
import pytest
import webdataset as wds

from parclean.shards import (
    Sample,
    ShardError,
    ShardRecord,
    iter_samples,
    read_manifest,
    read_shard_record,
    sample_key,
    shard_filename,
    shard_is_complete,
    shard_urls,
    verify_shards,
    write_manifest,
    write_shard,
)

NAME = "toy"
COUNTS = (4, 4, 3)  # the last shard is short, as at the end of a real run
PER_SHARD = 4


def make_samples(shard_index: int, count: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng([seed, shard_index])
    samples = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        key = sample_key(shard_index, i, PER_SHARD)
        meta = {
            "prompt_id": shard_index * PER_SHARD + i,
            "seed": int(rng.integers(2**31)),
            "model": "toy-sd",
            "steps": 2,
            "guidance": 7.5,
            "resolution": 16,
            "nsfw": shard_index == 1 and i == 0,
        }
        caption = f"a red circle n\u00b0{i} on shard {shard_index}"
        samples.append(Sample(key=key, image=PIL.Image.fromarray(pixels, "RGB"), caption=caption, meta=meta))
    return samples


def write_set(out_dir: Path, image_format: str = "png") -> dict[str, Sample]:
    """Write COUNTS shards and the manifest; return the written samples by key."""
    records, written = [], {}
    for index, count in enumerate(COUNTS):
        samples = make_samples(index, count)
        records.append(write_shard(out_dir, NAME, index, samples, image_format=image_format, seconds=2.0))
        written.update({sample.key: sample for sample in samples})
    write_manifest(out_dir, NAME, records, config={"seed": 0, "model": "toy-sd", "count": sum(COUNTS)})
    return written


@pytest.fixture
def shard_set(tmp_path: Path) -> tuple[Path, dict[str, Sample]]:
    return tmp_path, write_set(tmp_path)


def sample_offsets_of(path: Path) -> list[int]:
    """Where each sample's first member header starts, then where the last sample's data (padded) ends."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = [member.name.split(".")[0] for member in members]
    starts = [member.offset for i, member in enumerate(members) if i == 0 or keys[i] != keys[i - 1]]
    return [*starts, members[-1].offset_data + -(-members[-1].size // 512) * 512]


def flip_member_header(path: Path, member_number: int) -> None:
    """Damage the tar header of one member in the middle of the file (webdataset then stops reading early)."""
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member_number].offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 16] = bytes(b ^ 0xFF for b in data[offset : offset + 16])
    path.write_bytes(bytes(data))


def test_sample_key_and_filename_follow_img2dataset() -> None:
    assert sample_key(3, 42, 10000) == "0000030042"
    assert sample_key(1, 99, 100) == "00000199"
    assert sample_key(1, 9, 101) == "000001009"
    assert sample_key(0, 0, 1) == "0000000"
    assert shard_filename("toy", 7) == "toy-000007.tar"
    with pytest.raises(ShardError, match="outside"):
        sample_key(0, 100, 100)
    with pytest.raises(ShardError, match="name"):
        shard_filename("bad/name", 0)


def test_plain_webdataset_reads_the_set(shard_set: tuple[Path, dict[str, Sample]]) -> None:
    out_dir, written = shard_set
    pattern = f"{out_dir}/{NAME}-{{000000..000002}}.tar"  # what a user passes to open_clip, no parclean code
    dataset = wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "txt", "json")
    rows = list(dataset)
    assert len(rows) == sum(COUNTS)
    keys = [key for key, *_ in rows]
    assert keys == list(written)  # every sample, unique, in write order
    assert all(re.fullmatch(r"\d{6}\d", key) for key in keys)
    for key, image, caption, meta in rows:
        sample = written[key]
        assert caption == sample.caption
        assert meta == {**sample.meta, "key": key, "caption": sample.caption}
        np.testing.assert_array_equal(np.asarray(image), np.asarray(sample.image))  # png is lossless


def test_jpg_shard_decodes_with_the_right_size(tmp_path: Path) -> None:
    # Smooth pictures (4x4 colours blown up), as a generator makes; JPEG's 4:2:0 chroma would smear pure noise.
    samples = [
        Sample(s.key, s.image.resize((4, 4), PIL.Image.NEAREST).resize((16, 16), PIL.Image.BILINEAR), s.caption, {})
        for s in make_samples(0, 3)
    ]
    record = write_shard(tmp_path, NAME, 0, samples, image_format="jpg", jpeg_quality=95)
    dataset = wds.WebDataset(str(tmp_path / record.filename), shardshuffle=False).decode("pil")
    rows = list(dataset.to_tuple("__key__", "jpg", "txt"))
    assert [key for key, *_ in rows] == [sample.key for sample in samples]
    for (_, image, caption), sample in zip(rows, samples, strict=True):
        assert image.size == (16, 16) and image.mode == "RGB"
        assert caption == sample.caption
        error = np.abs(np.asarray(image, dtype=float) - np.asarray(sample.image, dtype=float)).mean()
        assert error < 12  # lossy but the same picture: another such picture differs by about 60


def test_sizes_manifest_and_stats_match_the_files(shard_set: tuple[Path, dict[str, Sample]]) -> None:
    out_dir, _ = shard_set
    filenames = [shard_filename(NAME, index) for index in range(len(COUNTS))]
    sizes = json.loads((out_dir / "sizes.json").read_text())
    assert sizes == dict(zip(filenames, COUNTS, strict=True))
    # open_clip's get_dataset_size: expand the braces, look each shard's basename up in sizes.json.
    urls = braceexpand.braceexpand(f"{out_dir}/{NAME}-{{000000..000002}}.tar")
    assert sum(sizes[Path(url).name] for url in urls) == sum(COUNTS)

    manifest = read_manifest(out_dir)
    assert manifest["total_samples"] == sum(COUNTS) and manifest["config"]["model"] == "toy-sd"
    for shard, filename, count in zip(manifest["shards"], filenames, COUNTS, strict=True):
        data = (out_dir / filename).read_bytes()
        assert shard == {
            "filename": filename,
            "count": count,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "offsets": sample_offsets_of(out_dir / filename),
        }

    stats = json.loads((out_dir / f"{NAME}-000001_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_generate"]) == (4, 3, 1)
    assert stats["seconds"] == 2.0 and stats["images_per_second"] == 2.0
    assert read_shard_record(out_dir, NAME, 1) == ShardRecord(**manifest["shards"][1])
    assert shard_urls(out_dir) == [str(out_dir.resolve() / filename) for filename in filenames]


def test_same_samples_give_byte_identical_tars(tmp_path: Path) -> None:
    for image_format in ("jpg", "png"):
        first = write_shard(tmp_path / "a", NAME, 5, make_samples(5, 3), image_format=image_format)
        second = write_shard(tmp_path / "b", NAME, 5, make_samples(5, 3), image_format=image_format)
        assert first == second
        assert (tmp_path / "a" / first.filename).read_bytes() == (tmp_path / "b" / second.filename).read_bytes()
    other = write_shard(tmp_path / "c", NAME, 5, make_samples(5, 3, seed=1), image_format="png")
    assert other.sha256 != second.sha256
    # Two writes a second apart, or by another user, must agree too: no clock or account in the headers.
    with tarfile.open(tmp_path / "a" / first.filename) as tar:
        owners = {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tar.getmembers()}
    assert owners == {(0, 0, 0, "parclean", "parclean")}


def test_verify_and_resume_accept_a_good_set(shard_set: tuple[Path, dict[str, Sample]]) -> None:
    out_dir, _ = shard_set
    assert verify_shards(out_dir) == []
    assert verify_shards(out_dir, deep=True) == []
    assert all(shard_is_complete(out_dir, NAME, i, expected_count=n) for i, n in enumerate(COUNTS))
    assert not shard_is_complete(out_dir, NAME, 0, expected_count=5)  # the config now asks for more
    assert not shard_is_complete(out_dir, NAME, 3)  # never written


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_shard_is_reported_and_redone(shard_set: tuple[Path, dict[str, Sample]], damage: str) -> None:
    out_dir, _ = shard_set
    path = out_dir / shard_filename(NAME, 1)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))

    problems = verify_shards(out_dir)
    assert len(problems) == 1 and problems[0].startswith(f"{NAME}-000001.tar: ")
    assert ("sha256" if damage == "flip" else "bytes") in problems[0]
    assert not shard_is_complete(out_dir, NAME, 1)
    assert shard_is_complete(out_dir, NAME, 0) and shard_is_complete(out_dir, NAME, 2)
    if damage == "truncate":
        deep = verify_shards(out_dir, deep=True)
        assert any("000001.tar" in p and "samples in the tar" in p for p in deep)

    write_shard(out_dir, NAME, 1, make_samples(1, COUNTS[1]), image_format="png")  # the rerun
    assert shard_is_complete(out_dir, NAME, 1) and verify_shards(out_dir, deep=True) == []


def test_missing_stats_means_not_done(shard_set: tuple[Path, dict[str, Sample]]) -> None:
    out_dir, _ = shard_set
    (out_dir / f"{NAME}-000002_stats.json").unlink()  # killed after the rename, before the done marker
    assert not shard_is_complete(out_dir, NAME, 2)
    (out_dir / f"{NAME}-000002_stats.json").write_text("{not json")
    assert not shard_is_complete(out_dir, NAME, 2)


def test_leftover_temp_file_is_not_a_shard(shard_set: tuple[Path, dict[str, Sample]]) -> None:
    out_dir, written = shard_set
    leftover = out_dir / f".{NAME}-000001.tar.4242.deadbeef.tmp"
    leftover.write_bytes(b"half a tar")
    (out_dir / shard_filename(NAME, 1)).unlink()  # the killed write never got to the rename
    (out_dir / f"{NAME}-000001_stats.json").unlink()

    assert not shard_is_complete(out_dir, NAME, 1)
    assert verify_shards(out_dir) == [f"{NAME}-000001.tar: missing"]
    assert sorted(p.name for p in out_dir.glob(f"{NAME}-*.tar")) == [f"{NAME}-000000.tar", f"{NAME}-000002.tar"]

    write_shard(out_dir, NAME, 1, make_samples(1, COUNTS[1]), image_format="png")
    assert not leftover.exists()
    assert verify_shards(out_dir, deep=True) == []
    assert [key for key, *_ in iter_samples(out_dir)] == list(written)


def test_iter_samples_yields_the_set_in_order(shard_set: tuple[Path, dict[str, Sample]]) -> None:
    out_dir, written = shard_set
    rows = list(iter_samples(f"file://{out_dir}"))  # an fsspec URL reads the same as the folder
    assert [key for key, *_ in rows] == list(written)
    key, image, caption, meta = rows[5]
    assert caption == written[key].caption and meta["prompt_id"] == written[key].meta["prompt_id"]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(written[key].image))
    assert all(url.startswith("file://") for url in shard_urls(f"file://{out_dir}/"))
    assert verify_shards(f"file://{out_dir}", deep=True) == []


@pytest.mark.parametrize("damage", ["header", "truncate", "image"])
def test_iter_samples_names_the_damaged_shard(shard_set: tuple[Path, dict[str, Sample]], damage: str) -> None:
    out_dir, _ = shard_set
    path = out_dir / shard_filename(NAME, 1)
    if damage == "header":
        flip_member_header(path, member_number=6)  # the third sample's first file
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:1500])
    else:
        with tarfile.open(path) as tar:
            png = [member for member in tar.getmembers() if member.name.endswith(".png")][1]
        data = bytearray(path.read_bytes())
        middle = png.offset_data + png.size // 2
        data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])  # PNG's CRC catches it
        path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{NAME}-000001.tar"):
        list(iter_samples(out_dir))


def test_deep_verify_finds_repeated_keys_and_missing_parts(tmp_path: Path) -> None:
    records = [write_shard(tmp_path, NAME, index, make_samples(0, 2)) for index in range(2)]  # same keys
    bad = tmp_path / shard_filename(NAME, 2)
    with wds.TarWriter(str(bad)) as tar:
        tar.write({"__key__": "0000020", "png": b"not an image", "json": b"{}"})  # no txt
    data = bad.read_bytes()
    records.append(ShardRecord(bad.name, 1, hashlib.sha256(data).hexdigest(), len(data)))
    write_manifest(tmp_path, NAME, records, config={})

    assert verify_shards(tmp_path) == []  # files match the manifest byte for byte
    problems = verify_shards(tmp_path, deep=True)
    assert sum("repeats" in p for p in problems) == 2
    assert any(p.startswith(f"{NAME}-000002.tar: sample 0000020 has ['json', 'png']") for p in problems)


def test_write_shard_rejects_bad_samples(tmp_path: Path) -> None:
    good = make_samples(0, 2)
    rgba = Sample(good[0].key, good[0].image.convert("RGBA"), "c", {})
    cases = {
        "RGB": [rgba],
        "duplicate key": [good[0], good[0]],
        "without '.'": [Sample("a.b", good[0].image, "c", {})],
        "JSON-able": [Sample("k", good[0].image, "c", {"bad": {1, 2}})],
        "no samples": [],
    }
    for problem, samples in cases.items():
        with pytest.raises(ShardError, match=re.escape(problem)) as info:
            write_shard(tmp_path, NAME, 0, samples)
        assert f"{NAME}-000000.tar" in str(info.value)
    with pytest.raises(ShardError, match="image_format"):
        write_shard(tmp_path, NAME, 0, good, image_format="webp")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_manifest_errors_name_the_location(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    with pytest.raises(ShardError, match=f"{missing}/manifest.json: no manifest"):
        read_manifest(missing)
    with pytest.raises(ShardError, match=str(missing)):
        shard_urls(missing)
    with pytest.raises(ShardError, match="not valid JSON"):
        (tmp_path / "manifest.json").write_text('{"format": ')
        read_manifest(tmp_path)
    with pytest.raises(ShardError, match="local folder"):
        write_shard("s3://bucket/set", NAME, 0, make_samples(0, 1))
    with pytest.raises(ShardError, match="write shards before the manifest"):
        write_manifest(tmp_path, NAME, [ShardRecord(shard_filename(NAME, 0), 1, "0" * 64, 10)], config={})


@pytest.mark.parametrize("offsets", [[0, 512], [0, 2048, 1024, 3072], [0, "512", 1024, 2048], [0, 1024, 2048, 10**9]])
def test_manifest_with_bad_sample_offsets_is_refused(shard_set: tuple[Path, dict[str, Sample]], offsets) -> None:
    out_dir, _ = shard_set
    manifest = json.loads((out_dir / "manifest.json").read_text())
    manifest["shards"][2]["offsets"] = offsets  # shard 2 holds 3 samples: 4 ascending offsets within its bytes
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"manifest.json: toy-000002.tar: 'offsets' must be 4 ascending"):
        read_manifest(out_dir)


def test_verify_command_checks_a_set_from_the_command_line(shard_set: tuple[Path, dict[str, Sample]],
                                                           capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main

    folder, _ = shard_set
    assert main(["verify", str(folder), "--deep"]) == 0
    assert capsys.readouterr().out.strip() == f"{folder}: 3 shards, 11 samples: every shard matches the manifest"
    flip_member_header(folder / shard_filename(NAME, 1), 2)
    assert main(["verify", str(folder)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"{folder}: toy-000001.tar: sha256") and lines[-1] == f"{folder}: 1 problem"
    assert main(["verify", str(folder / "nothing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
