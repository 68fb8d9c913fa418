"""What a cleaning run started from, recorded in start.json and in the cleaned model's metadata: the source model
(absolute path and the sha256 of its weights file, or the open_clip architecture and pretrained tag) and the shard
set (absolute location and the sha256 of its manifest, which lists every shard's sha256)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from parclean.models import LoadedModel, checkpoint_file
from parclean.shards import absolute_location, manifest_sha256


def provenance(model: str | Path | LoadedModel, architecture: str, pretrained: str | None,
               shards: str) -> dict[str, str | None]:
    """source, source_sha256, architecture (as built), pretrained, shards, manifest_sha256.

    A pretrained tag names its weights (source is then the architecture given, source_sha256 None); a model
    passed in memory has no file (source "memory").
    """
    if isinstance(model, LoadedModel):
        source, digest = "memory", None
    elif pretrained is not None:
        source, digest = str(model), None
    else:
        path = Path(model).expanduser().resolve()
        source, digest = str(path), file_sha256(checkpoint_file(path))
    return {"source": source, "source_sha256": digest, "architecture": architecture, "pretrained": pretrained,
            "shards": absolute_location(shards), "manifest_sha256": manifest_sha256(shards)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
