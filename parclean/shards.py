"""The shard format: WebDataset tars with img2dataset keys and stats, open_clip's sizes.json, and a manifest.

Writing goes to a local folder; reading (manifest, shard URLs, samples) also accepts fsspec URLs.
The on-disk format is described in docs/shards.md.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import posixpath
import re
import secrets
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import PIL.Image
from tqdm import tqdm

logger = logging.getLogger(__name__)

FORMAT = "parclean-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG"}
SHARD_DIGITS = 6
# Tar header fields fixed so that the same samples give the same bytes on any machine, at any time.
TAR_MTIME = 0
TAR_USER = "parclean"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Sample:
    """One caption-image pair to store; `meta` must be JSON-able (prompt_id, seed, model, ...)."""

    key: str
    image: PIL.Image.Image
    caption: str
    meta: dict


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest lists for one shard."""

    filename: str
    count: int
    sha256: str
    bytes: int
    config_sha256: str | None = None  # the config that made it (its stats say; None: not recorded)
    # Byte offset where each sample begins, then where the last one ends (None: written before offsets existed).
    offsets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.offsets is not None:  # a list when read back from JSON
            object.__setattr__(self, "offsets", tuple(self.offsets))


class ShardError(ValueError):
    """A shard set, shard or sample that cannot be written or read; the message names the file and problem."""


def shard_filename(name: str, index: int) -> str:
    """`NAME-000042.tar`: the file name of shard `index` of the set `name`."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ShardError(
            f"shard set name {name!r}: use letters, digits, '_', '.', '-' (no '/', braces or spaces), "
            "not starting with '.'"
        )
    if not 0 <= index < 10**SHARD_DIGITS:
        raise ShardError(f"{name}: shard index {index} outside 0..{10**SHARD_DIGITS - 1}")
    return f"{name}-{index:0{SHARD_DIGITS}d}.tar"


def stats_filename(name: str, index: int) -> str:
    """`NAME-000042_stats.json`: the per-shard done marker, written after the tar."""
    return shard_filename(name, index)[: -len(".tar")] + "_stats.json"


def sample_key(shard_index: int, item_index: int, items_per_shard: int) -> str:
    """img2dataset-style key: 6 shard digits, then enough index digits for `items_per_shard - 1`."""
    if items_per_shard < 1:
        raise ShardError(f"items_per_shard must be at least 1, got {items_per_shard}")
    if not 0 <= item_index < items_per_shard:
        raise ShardError(f"item index {item_index} outside 0..{items_per_shard - 1}")
    if not 0 <= shard_index < 10**SHARD_DIGITS:
        raise ShardError(f"shard index {shard_index} outside 0..{10**SHARD_DIGITS - 1}")
    index_digits = len(str(items_per_shard - 1))
    return f"{shard_index:0{SHARD_DIGITS}d}{item_index:0{index_digits}d}"


# ----------------------------------------------------------------------------------------------- writing


def write_shard(
    out_dir: str | os.PathLike,
    name: str,
    index: int,
    samples: Sequence[Sample],
    *,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    seconds: float | None = None,
    config_sha256: str | None = None,
) -> ShardRecord:
    """Write shard `index` atomically (temp file, fsync, rename), then its `_stats.json` done marker.

    `seconds` is the generation time the caller measured; it goes into the stats with images/s.
    `config_sha256` names the config that made the shard: a resume under another config redoes it.
    """
    out_dir = _local_dir(out_dir)
    filename = shard_filename(name, index)
    entries = _encode_samples(filename, samples, image_format, jpeg_quality)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / filename
    stats_path = out_dir / stats_filename(name, index)

    tmp = out_dir / f".{filename}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        digest, size = _write_tar(tmp, entries)
        with tmp.open("rb") as file:
            offsets, problem = scan_sample_offsets(file)
        if problem is not None or len(offsets) != len(samples) + 1:
            raise ShardError(f"{filename}: the tar just written reads back as {len(offsets) - 1} samples ({problem})")
        # Drop an old done marker first: a crash between the rename and the new stats must read as "not done".
        stats_path.unlink(missing_ok=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(out_dir)

    flagged = sum(1 for sample in samples if sample.meta.get("nsfw") is True)
    stats = {
        "filename": filename,
        "count": len(samples),
        "successes": len(samples) - flagged,
        "failed_to_generate": flagged,
        "seconds": seconds,
        "images_per_second": len(samples) / seconds if seconds else None,
        "image_format": image_format,
        "sha256": digest,
        "bytes": size,
        "config_sha256": config_sha256,
        "offsets": offsets,
    }
    _write_atomic(stats_path, _json_bytes(stats, indent=2))
    _remove_leftover_temps(out_dir, filename)
    logger.debug("wrote %s: %d samples (%d flagged), %d bytes", target, len(samples), flagged, size)
    return ShardRecord(filename=filename, count=len(samples), sha256=digest, bytes=size, config_sha256=config_sha256,
                       offsets=tuple(offsets))


def _encode_samples(
    filename: str, samples: Sequence[Sample], image_format: str, jpeg_quality: int
) -> list[dict[str, Any]]:
    """Check each sample and encode it as TarWriter's entries: KEY.jpg (or .png), KEY.txt, KEY.json."""
    if image_format not in IMAGE_FORMATS:
        raise ShardError(f"{filename}: image_format {image_format!r} not one of {sorted(IMAGE_FORMATS)}")
    if not 1 <= jpeg_quality <= 100:
        raise ShardError(f"{filename}: jpeg_quality {jpeg_quality} outside 1..100")
    if not samples:
        raise ShardError(f"{filename}: no samples to write")
    entries, seen = [], set()
    for sample in samples:
        _check_sample(filename, sample, seen)
        meta = dict(sample.meta)
        for field, value in (("key", sample.key), ("caption", sample.caption)):
            if meta.setdefault(field, value) != value:
                raise ShardError(f"{filename}: sample {sample.key}: meta[{field!r}] differs from the sample")
        try:
            meta_bytes = _json_bytes(meta)
        except (TypeError, ValueError) as err:
            raise ShardError(f"{filename}: sample {sample.key}: meta is not JSON-able ({err})") from None
        entries.append(
            {
                "__key__": sample.key,
                image_format: _encode_image(sample.image, image_format, jpeg_quality),
                "txt": sample.caption.encode("utf-8"),
                "json": meta_bytes,
            }
        )
    return entries


def _check_sample(filename: str, sample: Sample, seen: set[str]) -> None:
    where = f"{filename}: sample {getattr(sample, 'key', sample)!r}"
    if not isinstance(sample, Sample):
        raise ShardError(f"{where}: expected a Sample, got {type(sample).__name__}")
    # webdataset splits a member name at the first '.' of its base name; '/' would make folders.
    if not sample.key or "." in sample.key or "/" in sample.key:
        raise ShardError(f"{where}: key must be non-empty without '.' or '/'")
    if sample.key in seen:
        raise ShardError(f"{where}: duplicate key in this shard")
    seen.add(sample.key)
    if not isinstance(sample.image, PIL.Image.Image) or sample.image.mode != "RGB":
        mode = getattr(sample.image, "mode", type(sample.image).__name__)
        raise ShardError(f"{where}: image must be an RGB PIL image, got {mode} (use image.convert('RGB'))")
    if not isinstance(sample.caption, str) or not isinstance(sample.meta, dict):
        raise ShardError(f"{where}: caption must be str and meta a dict")


def _encode_image(image: PIL.Image.Image, image_format: str, jpeg_quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=jpeg_quality, optimize=False, progressive=False)
    else:
        image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _write_tar(path: Path, entries: list[dict[str, Any]]) -> tuple[str, int]:
    """Write the samples with webdataset's TarWriter into `path`, fsync it; return (sha256, bytes)."""
    # Imported here: webdataset imports torch (over a second), which resume checks and verify do not need.
    from webdataset import TarWriter

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as raw:
        hashed = _HashingWriter(raw)
        options = dict(user=TAR_USER, group=TAR_USER, mode=0o444, encoder=False, mtime=TAR_MTIME)
        with TarWriter(hashed, **options) as tar:
            for entry in entries:
                tar.write(entry)
        raw.flush()
        os.fsync(raw.fileno())
    return hashed.digest.hexdigest(), hashed.size


class _HashingWriter:
    """A write-only file that hashes and counts what passes through, so the tar is not read back."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


def scan_sample_offsets(file: IO[bytes]) -> tuple[list[int], str | None]:
    """Byte offsets where each sample of a tar begins, then where the last whole one ends, and the problem that
    stopped the scan (None: the tar ended cleanly).

    Reads only the member headers (512 bytes each; data is seeked over), so it costs ~1.5 kB per sample. A sample
    is the run of consecutive members that share a key, as webdataset groups them (name up to the first '.').
    """
    starts: list[int] = []
    end, key, problem = 0, None, None
    try:
        with tarfile.open(fileobj=file, mode="r:") as tar:
            for member in tar:
                name_key = posixpath.basename(member.name).split(".")[0]
                if name_key != key:
                    starts.append(member.offset)
                    key = name_key
                end = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    except (tarfile.TarError, OSError, EOFError) as err:
        problem = f"{type(err).__name__}: {err}"
    if problem is not None and starts:
        end = starts.pop()  # the sample being read when the tar broke is not whole
    return [*starts, end] if starts else [], problem


def _remove_leftover_temps(out_dir: Path, filename: str) -> None:
    """Temp files of this shard left by killed writes; they are never read, this only frees the space."""
    for leftover in out_dir.glob(f".{filename}.*.tmp"):
        logger.info("removing %s left by an interrupted write", leftover)
        leftover.unlink(missing_ok=True)


def write_manifest(out_dir: str | os.PathLike, name: str, records: Sequence[ShardRecord], config: dict,
                   config_sha256: str | None = None) -> Path:
    """Write `sizes.json` (open_clip) and then `manifest.json`, both atomically; shards listed by filename.

    With `config_sha256`, every record must have been made by that config (ShardError naming the first that
    was not)."""
    out_dir = _local_dir(out_dir)
    manifest_path = out_dir / MANIFEST_NAME
    if not records:
        raise ShardError(f"{manifest_path}: no shard records to list")
    foreign = [r.filename for r in records if config_sha256 is not None and r.config_sha256 != config_sha256]
    if foreign:
        raise ShardError(f"{out_dir / foreign[0]}: made by another config (config sha256 "
                         f"{str(_record_of(records, foreign[0]).config_sha256)[:12]}, this one {config_sha256[:12]}); "
                         "delete it and rerun to regenerate it")
    records = sorted(records, key=lambda record: record.filename)
    pattern = re.compile(re.escape(name) + rf"-\d{{{SHARD_DIGITS}}}\.tar")
    for previous, record in zip([None, *records], records, strict=False):
        if not pattern.fullmatch(record.filename):
            raise ShardError(f"{manifest_path}: {record.filename} is not a shard of the set {name!r}")
        if previous is not None and previous.filename == record.filename:
            raise ShardError(f"{manifest_path}: {record.filename} listed twice")
        path = out_dir / record.filename
        if not path.is_file() or path.stat().st_size != record.bytes:
            raise ShardError(f"{path}: missing or not {record.bytes} bytes; write shards before the manifest")
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "total_samples": sum(record.count for record in records),
        "num_shards": len(records),
        "shards": [_manifest_entry(record) for record in records],
        "config": config,
        "config_sha256": config_sha256,
    }
    try:
        manifest_bytes = _json_bytes(manifest, indent=2)
    except (TypeError, ValueError) as err:
        raise ShardError(f"{manifest_path}: config is not JSON-able ({err})") from None
    _write_atomic(out_dir / SIZES_NAME, _json_bytes({r.filename: r.count for r in records}, indent=2))
    _write_atomic(manifest_path, manifest_bytes)
    logger.info("wrote %s: %d shards, %d samples", manifest_path, len(records), manifest["total_samples"])
    return manifest_path


def _manifest_entry(record: ShardRecord) -> dict[str, Any]:
    entry = {"filename": record.filename, "count": record.count, "sha256": record.sha256, "bytes": record.bytes}
    return entry if record.offsets is None else {**entry, "offsets": list(record.offsets)}


def _record_of(records: Sequence[ShardRecord], filename: str) -> ShardRecord:
    return next(record for record in records if record.filename == filename)


def _local_dir(out_dir: str | os.PathLike) -> Path:
    if "://" in str(out_dir):
        raise ShardError(f"{out_dir}: shards are written to a local folder; copy the finished set to remote storage")
    return Path(out_dir)


def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    # sort_keys for byte-stable output; allow_nan=False because NaN is not JSON and other readers reject it.
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False, indent=indent).encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; a no-op where directories cannot be opened (Windows)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- resume


def read_shard_record(out_dir: str | os.PathLike, name: str, index: int) -> ShardRecord:
    """The ShardRecord of a finished shard, from its `_stats.json` (for the manifest after a resume)."""
    path = _local_dir(out_dir) / stats_filename(name, index)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
        return ShardRecord(
            filename=shard_filename(name, index),
            count=int(stats["count"]),
            sha256=str(stats["sha256"]),
            bytes=int(stats["bytes"]),
            config_sha256=stats.get("config_sha256"),
            offsets=stats.get("offsets"),
        )
    except FileNotFoundError:
        raise ShardError(f"{path}: missing; the shard is not finished") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{path}: not a valid stats file ({err!r})") from None


def shard_is_complete(out_dir: str | os.PathLike, name: str, index: int, expected_count: int | None = None,
                      config_sha256: str | None = None) -> bool:
    """True iff the tar and its `_stats.json` exist, the count is as expected and the tar's sha256 matches
    (and, with `config_sha256`, the stats name that config)."""
    try:
        record = read_shard_record(out_dir, name, index)
    except ShardError:
        return False
    path = Path(out_dir) / record.filename
    if config_sha256 is not None and record.config_sha256 != config_sha256:
        logger.info("%s: made by another config: redo", path)
        return False
    if expected_count is not None and record.count != expected_count:
        logger.info("%s: %d samples, expected %d: redo", path, record.count, expected_count)
        return False
    try:
        if path.stat().st_size != record.bytes:
            return False
        with path.open("rb") as file:
            return _sha256(file) == record.sha256
    except FileNotFoundError:
        return False


def _sha256(file: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- reading


def read_manifest(out_dir: str | os.PathLike) -> dict:
    """Load and check `manifest.json` from a folder or fsspec URL."""
    path, data = _manifest_bytes(out_dir)
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    _check_manifest(path, manifest)
    return manifest


def manifest_sha256(out_dir: str | os.PathLike) -> str:
    """sha256 of the set's `manifest.json`, which lists every shard's sha256: one hash names the whole set."""
    return hashlib.sha256(_manifest_bytes(out_dir)[1]).hexdigest()


def absolute_location(location: str | os.PathLike) -> str:
    """A shard set's location as recorded: a local folder made absolute, an fsspec URL as it is."""
    location = str(location)
    return location if "://" in location else str(Path(location).expanduser().resolve())


def _manifest_bytes(out_dir: str | os.PathLike) -> tuple[str, bytes]:
    path = _join(str(out_dir), MANIFEST_NAME)
    try:
        with fsspec.open(path, "rb") as file:
            return path, file.read()
    except FileNotFoundError:
        raise ShardError(
            f"{path}: no manifest; not a shard set, or its generation has not finished (rerun it to complete)"
        ) from None
    except (OSError, ImportError, ValueError) as err:  # fsspec: unknown protocol or missing s3fs/gcsfs
        raise ShardError(f"{path}: cannot read the manifest ({type(err).__name__}: {err})") from None


def _check_manifest(path: str, manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest")
    if not isinstance(manifest.get("name"), str):
        raise ShardError(f"{path}: 'name' must be the shard set's name")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {manifest.get('format_version')!r}, this parclean reads {FORMAT_VERSION}"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"{path}: 'shards' must be a list")
    for shard in shards:
        fields = ("filename", "count", "sha256", "bytes")
        if not isinstance(shard, dict) or any(field not in shard for field in fields):
            raise ShardError(f"{path}: shard entry {shard!r} lacks one of {fields}")
        filename = shard["filename"]
        # Shard URLs are built from these names: a name with a folder in it could point outside the set.
        plain = isinstance(filename, str) and posixpath.basename(filename) == filename
        if not plain or filename in ("", ".."):
            raise ShardError(f"{path}: shard filename {filename!r} must be a plain file name")
        if "offsets" in shard:
            _check_offsets(path, shard)


def _check_offsets(path: str, shard: dict) -> None:
    """Readers seek to these offsets: they must be count + 1 ascending integers within the file."""
    offsets, count, size = shard["offsets"], shard["count"], shard["bytes"]
    good = (isinstance(offsets, list) and len(offsets) == count + 1
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and all(0 <= a < b for a, b in itertools.pairwise(offsets)) and offsets[-1] <= size)
    if not good:
        raise ShardError(f"{path}: {shard['filename']}: 'offsets' must be {count + 1} ascending byte offsets "
                         f"within its {size} bytes (one per sample, then the end of the last)")


def shard_urls(location: str | os.PathLike) -> list[str]:
    """The tar URLs of a shard set (folder or fsspec URL), in manifest order, for webdataset or open_clip."""
    return _urls(str(location), read_manifest(location))


def _urls(location: str, manifest: dict) -> list[str]:
    if "://" not in location:
        location = str(Path(location).resolve())
    return [_join(location, shard["filename"]) for shard in manifest["shards"]]


def iter_samples(location: str | os.PathLike) -> Iterator[tuple[str, PIL.Image.Image, str, dict]]:
    """Yield (key, RGB image, caption, meta) for every sample, in order, read with webdataset.

    A shard that cannot be read, or holds fewer or more samples than the manifest says, raises ShardError.
    """
    import webdataset as wds  # imported here: it imports torch (see _write_tar)

    manifest = read_manifest(location)
    for url, shard in zip(_urls(str(location), manifest), manifest["shards"], strict=True):
        filename = shard["filename"]
        # One dataset per shard, so that an error names the shard it came from.
        dataset = wds.WebDataset([url], shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        dataset = dataset.decode("pil").to_tuple("__key__", "jpg;png", "txt", "json")
        count = 0
        try:
            for key, image, caption, meta in dataset:
                count += 1
                yield key, image, caption, meta
        except Exception as err:  # a damaged file fails in tarfile, PIL, json or webdataset: name the shard
            # webdataset's DecodingError has an empty message; the reason is in its cause.
            reason = err.__cause__ if not str(err) and err.__cause__ is not None else err
            raise ShardError(f"{filename}: damaged shard at {url} ({type(reason).__name__}: {reason})") from err
        if count != shard["count"]:
            listed = shard["count"]
            raise ShardError(f"{filename}: damaged shard at {url}: {count} samples, manifest lists {listed}")


def _join(location: str, filename: str) -> str:
    return location.rstrip("/") + "/" + filename if "://" in location else str(Path(location) / filename)


# ----------------------------------------------------------------------------------------------- verify


def verify_shards(out_dir: str | os.PathLike, *, deep: bool = False) -> list[str]:
    """Compare the manifest with the files; return one line per problem (file and problem), [] when all good.

    Checks each shard's presence, size and sha256, and sizes.json; `deep` also reads every tar and checks
    its sample count, that each sample has an image, txt and json, and that keys are unique across the set.
    """
    location = str(out_dir)
    manifest = read_manifest(location)
    fs, root = fsspec.core.url_to_fs(location)
    problems = _check_sizes(fs, root, manifest)
    problems += _unlisted_shards(fs, root, manifest)
    keys_seen: dict[str, str] = {}
    for shard in tqdm(manifest["shards"], desc="verify shards", unit="shard", disable=None):
        filename, path = shard["filename"], posixpath.join(root, shard["filename"])
        if not fs.exists(path):
            problems.append(f"{filename}: missing")
            continue
        size = fs.size(path)
        if size != shard["bytes"]:
            problems.append(f"{filename}: {size} bytes, the manifest lists {shard['bytes']}")
        else:
            with fs.open(path, "rb") as file:
                digest = _sha256(file)
            if digest != shard["sha256"]:
                problems.append(f"{filename}: sha256 {digest[:12]}... differs from the manifest's")
        problems += _check_stats_config(fs, root, shard["filename"], manifest.get("config_sha256"))
        if deep:
            problems += _check_tar_contents(fs, path, shard, keys_seen)
    return problems


def _check_stats_config(fs: Any, root: str, filename: str, config_sha256: str | None) -> list[str]:
    """A shard's done marker must name the manifest's config (sets whose manifest names none: not checked)."""
    if config_sha256 is None:
        return []
    stats = posixpath.join(root, filename[: -len(".tar")] + "_stats.json")
    try:
        with fs.open(stats, "rb") as file:
            recorded = json.loads(file.read()).get("config_sha256")
    except (FileNotFoundError, ValueError, AttributeError):
        return []  # a set copied without its stats still verifies by the manifest's sha256s
    if recorded != config_sha256:
        return [f"{filename}: its stats name another config ({str(recorded)[:12]}) than the manifest's"]
    return []


def _check_sizes(fs: Any, root: str, manifest: dict) -> list[str]:
    path = posixpath.join(root, SIZES_NAME)
    try:
        with fs.open(path, "rb") as file:
            sizes = json.loads(file.read())
    except FileNotFoundError:
        return [f"{SIZES_NAME}: missing (open_clip needs it to know the dataset size)"]
    except ValueError as err:
        return [f"{SIZES_NAME}: not valid JSON ({err})"]
    expected = {shard["filename"]: shard["count"] for shard in manifest["shards"]}
    return [] if sizes == expected else [f"{SIZES_NAME}: counts differ from the manifest's"]


def _unlisted_shards(fs: Any, root: str, manifest: dict) -> list[str]:
    listed = {shard["filename"] for shard in manifest["shards"]}
    on_disk = {posixpath.basename(p) for p in fs.glob(posixpath.join(root, f"{manifest['name']}-*.tar"))}
    return [f"{filename}: on disk but not in the manifest" for filename in sorted(on_disk - listed)]


def _check_tar_contents(fs: Any, path: str, shard: dict, keys_seen: dict[str, str]) -> list[str]:
    """Group the tar's members by key the way webdataset does (consecutive, split at the first '.')."""
    filename = shard["filename"]
    problems: list[str] = []
    groups: list[tuple[str, dict[str, bytes]]] = []
    try:
        with fs.open(path, "rb") as file, tarfile.open(fileobj=file, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    problems.append(f"{filename}: {member.name} is not a regular file")
                    continue
                key, _, ext = member.name.partition(".")
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][ext] = tar.extractfile(member).read() if ext == "json" else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{filename}: not a readable tar ({type(err).__name__}: {err})")
    if len(groups) != shard["count"]:
        problems.append(f"{filename}: {len(groups)} samples in the tar, the manifest lists {shard['count']}")
    for key, parts in groups:
        if key in keys_seen:
            problems.append(f"{filename}: key {key} repeats (also in {keys_seen[key]})")
        keys_seen.setdefault(key, filename)
        problems += _check_sample_parts(filename, key, parts)
    return problems


def _check_sample_parts(filename: str, key: str, parts: dict[str, bytes]) -> list[str]:
    problems = []
    images = [ext for ext in parts if ext in IMAGE_FORMATS]
    if len(images) != 1 or "txt" not in parts or "json" not in parts:
        problems.append(f"{filename}: sample {key} has {sorted(parts)}, expected one image, txt and json")
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError:
            return [*problems, f"{filename}: sample {key}: json is not valid JSON"]
        if not isinstance(meta, dict) or meta.get("key") != key:
            problems.append(f"{filename}: sample {key}: json does not name the sample's key")
    return problems
