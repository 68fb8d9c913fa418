"""A training run's JSON-lines log: one record per line, appended as the run goes, cut back on resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_after(path: Path, step: int, belongs: Callable[[dict[str, Any]], bool] = lambda record: True) -> None:
    """Drop the records of `belongs` past `step` (logged after the checkpoint a resumed run restarts from: they are
    run again); keep every other record."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines()
                 if line and (not belongs(record := json.loads(line)) or record["step"] <= step)]
        path.write_text("".join(line + "\n" for line in lines))
