"""A training checkpoint as one file: a dict of state dicts and numbers, written to a temporary name and moved
into place (a killed run leaves the previous checkpoint whole), read back without executing pickled code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_checkpoint_file(state: dict[str, Any], path: Path) -> None:
    """torch.save `state` to `path` through `path`.tmp."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """The checkpoint at `path`, on the CPU; tensors and plain values only (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
