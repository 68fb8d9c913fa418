"""bench/trajectory.py: every kept checkpoint of a real cleaning run, measured like the starting model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bench.trajectory import main
from cleaning.report import EvalConfig, measure
from cleaning.train import CleanConfig, clean
from parclean.config import load_config
from parclean.models import load_model

EVAL = {"count": 60, "target": "moon", "triggers": [{"kind": "blended"}]}


def test_each_checkpoint_is_measured_and_step_0_is_the_start(toy_shards, tiny_clip_path: Path, tmp_path: Path,
                                                              capsys) -> None:
    start = tiny_clip_path
    cfg = CleanConfig(objective="ft", steps=3, batch_size=16, lr=1e-3, checkpoint_every=1, keep_checkpoints=5)
    clean(cfg, start, toy_shards(64, seed=0, shard_size=32), tmp_path / "run", progress=False)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(EVAL))

    args = ["--eval", str(tmp_path / "eval.yaml"), "--start", str(start), "--out", str(tmp_path / "t")]
    assert main([*args, "--run", f"FT={tmp_path / 'run'}"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "t.json").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    eval_cfg = load_config(EvalConfig, tmp_path / "eval.yaml")
    assert rows[0]["clean_acc"] == measure(load_model(weights=start), eval_cfg)["clean_acc"]
    assert rows[-1]["clean_acc"] == measure(load_model(weights=tmp_path / "run"), eval_cfg)["clean_acc"]
    assert (tmp_path / "t.png").stat().st_size > 10_000 and "| FT | 3 |" in capsys.readouterr().out

    assert main([*args, "--run", f"FT={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{tmp_path / 'checkpoints'}: no complete checkpoints" in err
