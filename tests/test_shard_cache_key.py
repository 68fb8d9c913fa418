"""The shard cache key: cheap on a hub snapshot's tens of GB, and blind to no weights swap (symlinks followed)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from flows.pipeline import shard_set_key
from generation.config import GenerateConfig

OPENED: list[str] | None = None  # while a list, every file this process opens is appended to it


def _record_opens(event: str, args: tuple) -> None:
    if OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_record_opens)  # audit hooks cannot be removed: this one records only while OPENED is a list


def key_of(model: Path) -> str:
    return shard_set_key(GenerateConfig(model=str(model), bank="toyworld", num_samples=4))


def opened_during(function, *args) -> tuple[object, list[str]]:
    global OPENED
    OPENED = []
    try:
        return function(*args), OPENED
    finally:
        OPENED = None


@pytest.fixture
def linked_model(tiny_sd_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny SD whose unet/ is a symlink into a store of UNets, as in shared model stores."""
    model = shutil.copytree(tiny_sd_dir, tmp_path / "model", ignore=shutil.ignore_patterns("unet"))
    store = tmp_path / "store"
    shutil.copytree(tiny_sd_dir / "unet", store / "unet-a")
    (model / "unet").symlink_to(store / "unet-a", target_is_directory=True)
    return model


def test_the_same_folder_gives_the_same_key(linked_model: Path) -> None:
    assert key_of(linked_model) == key_of(linked_model)


def test_weights_swapped_behind_a_symlinked_folder_change_the_key(linked_model: Path, tmp_path: Path) -> None:
    before = key_of(linked_model)
    other = shutil.copytree(tmp_path / "store" / "unet-a", tmp_path / "store" / "unet-b")
    weights = other / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other weights
    weights.write_bytes(bytes(data))
    (linked_model / "unet").unlink()
    (linked_model / "unet").symlink_to(other, target_is_directory=True)
    assert key_of(linked_model) != before


def test_weights_replaced_in_place_behind_the_symlink_change_the_key(linked_model: Path) -> None:
    before = key_of(linked_model)
    weights = linked_model / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # as a copy that keeps times would
    assert key_of(linked_model) != before


def test_the_key_reads_configs_but_never_the_weights(linked_model: Path) -> None:
    huge = linked_model / "unet" / "extra.safetensors"
    with open(huge, "wb") as file:  # 64 GiB, sparse: hashing it would take minutes
        file.truncate(64 << 30)
    key, opened = opened_during(key_of, linked_model)
    assert key == key_of(linked_model)
    names = {Path(path).name for path in opened}
    assert "model_index.json" in names and "config.json" in names
    assert not [path for path in opened if path.endswith((".safetensors", ".bin"))], opened


def test_a_config_edited_in_place_changes_the_key_even_with_the_same_size_and_time(linked_model: Path) -> None:
    before = key_of(linked_model)
    config = linked_model / "scheduler" / "scheduler_config.json"
    stat = config.stat()
    text = config.read_text()
    edited = text.replace('"steps_offset": 1', '"steps_offset": 0')
    assert edited != text and len(edited) == len(text)
    config.write_text(edited)
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert key_of(linked_model) != before


def test_a_symlink_loop_in_the_folder_is_walked_once(linked_model: Path) -> None:
    (linked_model / "unet" / "loop").symlink_to(linked_model, target_is_directory=True)
    assert key_of(linked_model) == key_of(linked_model)
