"""flows/progress.py: what the progress lines say, read from the files the stages write."""

from __future__ import annotations

import json
from pathlib import Path

from flows.progress import GenerationWatcher, ImageCounter, TrainingWatcher, artifact_key, duration, images_counted


def test_training_progress_names_step_terms_lr_throughput_and_eta(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    records = [{"step": 10, "lr": 3e-4, "clip": 2.0, "pert": -0.5, "d_img": 0.2, "loss": 1.5, "seconds": 5.0},
               {"step": 30, "lr": 2e-4, "clip": 1.8, "pert": -0.7, "d_img": 0.4, "loss": 1.1, "seconds": 15.0}]
    watcher = TrainingWatcher(log, steps=100, batch_size=128, key="x")
    assert watcher.poll() == (None, "")  # no log yet
    log.write_text(json.dumps(records[0]) + "\n")
    watcher.poll()
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 31, "lr"')  # a line half-written
    percent, line = watcher.poll()
    assert percent == 30.0
    # 20 steps in 10 s at batch 128: 256 samples/s; 70 steps left at 2 steps/s: 35 s.
    assert line == ("clean: step 30/100 (30%), loss 1.1 (clip 1.8, pert -0.7), lr 2.00e-04, 256 samples/s, "
                    "ETA 35 s")


def test_generation_progress_sums_the_image_counters_of_every_shard(tmp_path: Path) -> None:
    folder = tmp_path / ".progress"
    first, second = ImageCounter(folder, 0), ImageCounter(folder, 1)
    first.update(4)
    first.update(4)
    second.update(3)
    assert images_counted(folder) == 11 and (folder / "shard-000000").read_text() == "8"
    percent, line = GenerationWatcher(folder, total=40, already=9, key="x").poll()
    assert percent == 50.0 and line.startswith("generate: 20/40 images (50%), ")


def test_artifact_keys_and_durations_read_well() -> None:
    assert artifact_key("Nightly_v2", "cleaning-report") == "nightly-v2-cleaning-report"
    assert [duration(s) for s in (4.6, 185, 7800)] == ["5 s", "3 min 5 s", "2 h 10 min"]
