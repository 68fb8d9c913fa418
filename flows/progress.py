"""Progress of long work, shown in the Prefect UI (a progress artifact) and the run's log (a line every so often).

The stages know nothing of Prefect: cleaning appends one JSON line per step to its train_log.jsonl, and each
generation shard task counts its images in a small file; a watcher thread here reads those and reports.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPORT_EVERY_SECONDS = 30.0
POLL_SECONDS = 2.0


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from `parts`: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def duration(seconds: float) -> str:
    """'42 s', '3 min 5 s', '2 h 10 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class Rate:
    """Units per second over the whole run so far, and the time the rest will take at that rate."""

    def __init__(self, done: float = 0.0) -> None:
        self.start_done, self.start_time = done, time.perf_counter()

    def per_second(self, done: float) -> float | None:
        elapsed = time.perf_counter() - self.start_time
        return (done - self.start_done) / elapsed if elapsed > 0 and done > self.start_done else None

    def eta(self, done: float, total: float) -> str:
        rate = self.per_second(done)
        return duration((total - done) / rate) if rate else "unknown"


class Watcher:
    """A thread that calls `poll()` every POLL_SECONDS until stopped (and once more at the end), in the Prefect
    run context it was started in, so its artifact updates and log lines belong to that run."""

    def __init__(self, key: str, description: str) -> None:
        self.key, self.description = key, description
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._artifact = None
        self._last_report = 0.0

    def __enter__(self) -> Watcher:
        from prefect.artifacts import create_progress_artifact

        self._artifact = create_progress_artifact(0.0, key=self.key, description=self.description)
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._loop,), daemon=True, name=self.key)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if exc[0] is None:
            self._safe_poll(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._safe_poll(final=False)

    def _safe_poll(self, final: bool) -> None:
        try:
            percent, line = self.poll()
        except Exception as error:  # noqa: BLE001 - a half-written file or a busy API: the next poll tries again
            logger.debug("%s: %s", self.key, error)
            return
        if percent is None:
            return
        from prefect.artifacts import update_progress_artifact

        try:
            update_progress_artifact(self._artifact, min(100.0, percent))
        except Exception as error:  # noqa: BLE001 - progress is best effort; the work goes on
            logger.debug("%s: %s", self.key, error)
        now = time.perf_counter()
        if line and (final or now - self._last_report >= REPORT_EVERY_SECONDS):
            self._last_report = now
            logger.info("%s", line)

    def poll(self) -> tuple[float | None, str]:
        """(percent done or None when nothing is known yet, the line to log)."""
        raise NotImplementedError


class TrainingWatcher(Watcher):
    """Reads the cleaning trainer's train_log.jsonl: step, loss terms, lr, samples/s and ETA."""

    def __init__(self, log_path: Path, steps: int, batch_size: int, key: str) -> None:
        super().__init__(key, f"cleaning steps of {log_path.parent}")
        self.log_path, self.steps, self.batch_size = log_path, steps, batch_size
        self.first: dict[str, Any] | None = None

    def poll(self) -> tuple[float | None, str]:
        last = _last_record(self.log_path)
        if last is None:
            return None, ""
        self.first = self.first or last
        step, terms = last["step"], _terms(last)
        steps_done, seconds = step - self.first["step"], last.get("seconds", 0) - self.first.get("seconds", 0)
        rate = steps_done / seconds if seconds > 0 and steps_done > 0 else None
        speed = f"{rate * self.batch_size:,.0f} samples/s" if rate else "samples/s unknown"
        eta = duration((self.steps - step) / rate) if rate else "unknown"
        line = (f"clean: step {step}/{self.steps} ({100 * step / self.steps:.0f}%), {terms}, lr {last['lr']:.2e}, "
                f"{speed}, ETA {eta}")
        return 100.0 * step / self.steps, line


class GenerationWatcher(Watcher):
    """Sums the images done of every shard task's counter file: images done, images/s and ETA."""

    def __init__(self, folder: Path, total: int, already: int, key: str) -> None:
        super().__init__(key, f"images of {folder.parent}")
        self.folder, self.total, self.already = folder, total, already
        self.rate = Rate(already)

    def poll(self) -> tuple[float | None, str]:
        done = min(self.total, self.already + images_counted(self.folder))
        rate = self.rate.per_second(done)
        speed = f"{rate:.1f} images/s" if rate else "images/s unknown"
        line = (f"generate: {done:,}/{self.total:,} images ({100 * done / self.total:.0f}%), {speed}, "
                f"ETA {self.rate.eta(done, self.total)}")
        return 100.0 * done / self.total, line


class ImageCounter:
    """What a shard task passes to the stage as its progress bar: each update(n) adds n to its counter file."""

    def __init__(self, folder: str | Path, index: int) -> None:
        self.path = Path(folder) / f"shard-{index:06d}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def update(self, n: int) -> None:
        self.count += n
        partial = self.path.with_suffix(".tmp")
        partial.write_text(str(self.count))
        partial.replace(self.path)


def images_counted(folder: Path) -> int:
    """Images done so far, over every shard's counter file in `folder`."""
    if not folder.is_dir():
        return 0
    return sum(int(path.read_text() or 0) for path in folder.glob("shard-*") if path.suffix != ".tmp")


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last complete JSON line of `path` (None: no file or no line yet)."""
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        handle.seek(0, 2)
        handle.seek(max(0, handle.tell() - 4096))
        lines = handle.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def _terms(record: dict[str, Any]) -> str:
    """'loss 1.234 (clip 2.1, perturbation -0.4)': the total first, then the other loss terms."""
    from cleaning.report import loss_terms

    names = [name for name in loss_terms([record]) if name != "loss"]
    inner = ", ".join(f"{name} {record[name]:.4g}" for name in names)
    total = f"loss {record['loss']:.4g}" if "loss" in record else "loss ?"
    return f"{total} ({inner})" if inner else total
