"""Output folders: one run at a time (a lock naming its holder), and no silent overwrite of another run's output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time\nfrom parclean.outputs import output_lock\n"
        "with output_lock(sys.argv[1], 'holder-under-test'):\n    print('held', flush=True)\n    time.sleep(600)\n")


@pytest.fixture(scope="module")
def small_shards(toy_shards) -> Path:
    """40 toy pairs in two shards."""
    return toy_shards(40, seed=5, shard_size=20)


def hold(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock, until it is killed."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline().strip() == "held"
    return child


def commands(small_shards: Path, tiny_clip_path: Path, out: Path) -> dict[str, list[str]]:
    return {
        "generate": ["generate", "--config", str(REPO / "configs/generate/tiny-cpu.yaml"), "--out", str(out),
                     "--num-samples", "2", "--set", "model=nowhere"],
        "clean": ["clean", "--config", str(REPO / "configs/clean/toy-cpu.yaml"), "--model", str(tiny_clip_path),
                  "--shards", str(small_shards), "--out", str(out), "--set", "steps=40", "--set", "batch_size=4"],
        "poison": ["poison", "--shards", str(small_shards), "--out", str(out), "--trigger", "badnet"],
        "tiny-sd": ["tiny-sd", "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["generate", "clean", "poison", "tiny-sd"])
def test_a_second_run_into_a_held_folder_fails_at_once_naming_the_holder(command, small_shards, tiny_clip_path,
                                                                         tmp_path, capsys):
    out = tmp_path / "out"
    child = hold(out)
    try:
        start = time.perf_counter()
        assert main(commands(small_shards, tiny_clip_path, out)[command]) == 2
        assert time.perf_counter() - start < 5
    finally:
        child.kill()
        child.wait()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{out}: in use by pid {child.pid}" in err and "holder-under-test" in err
    assert sorted(p.name for p in out.iterdir()) == [".parclean.lock"]  # nothing written


def test_the_lock_goes_with_its_process_and_is_reentrant_within_one(tmp_path):
    from parclean.outputs import FolderLocked, output_lock

    child = hold(tmp_path)
    with pytest.raises(FolderLocked, match=f"in use by pid {child.pid}"), output_lock(tmp_path, "second"):
        pass
    os.kill(child.pid, signal.SIGKILL)  # no clean-up runs: the kernel drops the lock with the process
    child.wait()
    with output_lock(tmp_path, "first"), output_lock(tmp_path, "nested"):
        assert "first" in (tmp_path / ".parclean.lock").read_text()


@pytest.mark.parametrize("held", ["out", "shard set"])
def test_a_pipeline_run_into_a_held_folder_fails_before_it_starts(held, tiny_clip_path, tiny_sd_dir, tmp_path,
                                                                   capsys):
    import yaml

    from flows.config import PipelineConfig
    from flows.pipeline import shard_set_folder
    from parclean.config import load_config

    settings = {"model": str(tiny_clip_path), "out": str(tmp_path / "run"), "shard_cache": str(tmp_path / "cache"),
                "generate": {"model": str(tiny_sd_dir), "bank": "toyworld", "num_samples": 4}}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(settings))
    folder = Path(settings["out"]) if held == "out" else shard_set_folder(load_config(PipelineConfig, config).generate,
                                                                          settings["shard_cache"])
    child = hold(folder)
    try:
        assert main(["run", "--config", str(config)]) == 2
    finally:
        child.kill()
        child.wait()
    assert f"{folder}: in use by pid {child.pid}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "pipeline.yaml").exists()


def test_a_child_process_shares_its_parents_lock_and_no_one_else_does(tmp_path):
    from parclean.outputs import HELD_VARIABLE, output_lock

    take = ("import sys\nfrom parclean.outputs import output_lock\n"
            "with output_lock(sys.argv[1], 'child'):\n    print('in')")
    with output_lock(tmp_path, "parent"):
        env = {**os.environ, "PYTHONPATH": str(REPO)}  # as flows/clean.py passes it to `accelerate launch`
        child = subprocess.run([sys.executable, "-c", take, str(tmp_path)], capture_output=True, text=True, env=env)
        assert child.returncode == 0 and child.stdout.strip() == "in"  # `accelerate launch` under `parclean run`
    stranger = hold(tmp_path)  # holds the lock, and is no ancestor of the next process
    try:
        forged = {**env, HELD_VARIABLE: str(tmp_path.resolve())}
        child = subprocess.run([sys.executable, "-c", take, str(tmp_path)], capture_output=True, text=True, env=forged)
        assert child.returncode != 0 and f"in use by pid {stranger.pid}" in child.stderr
    finally:
        stranger.kill()
        stranger.wait()


# ------------------------------------------------------------------------------------------ overwrites


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".parclean.lock"}


def test_evaluate_out_never_replaces_a_file_of_another_kind(tiny_clip_path, tmp_path, capsys):
    target = tmp_path / "model.safetensors"
    target.write_bytes(tiny_clip_path.read_bytes())
    evaluate = ["evaluate", "--model", str(tiny_clip_path), "--set", "count=8"]
    assert main([*evaluate, "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(target) in err and "--overwrite" in err
    assert target.read_bytes() == tiny_clip_path.read_bytes()
    result = tmp_path / "result.json"
    assert main([*evaluate, "--out", str(result)]) == 0
    assert main([*evaluate, "--out", str(result)]) == 0  # its own kind: a rerun replaces it
    assert main([*evaluate, "--out", str(target), "--overwrite"]) == 0
    assert "clean_acc" in target.read_text()


def test_tiny_sd_never_replaces_a_pipeline(tmp_path, capsys):
    out = tmp_path / "sd"
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    (out / "README.md").write_text("a trained pipeline's card")
    assert main(["tiny-sd", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: not empty" in err and "--overwrite" in err
    assert snapshot(out) == {"model_index.json": b"{}", "README.md": b"a trained pipeline's card"}


@pytest.mark.parametrize("command", ["clean", "generate"])
def test_a_run_into_another_kind_of_output_is_refused_and_writes_nothing(command, small_shards, tiny_clip_path,
                                                                          tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    if command == "clean":  # clean --out onto a shard set
        shutil.copytree(small_shards, out)
    else:  # generate --out onto a cleaning run
        out.mkdir()
        (out / "start.json").write_text('{"weights_sha256": "0"}\n')
        (out / "config.yaml").write_text("objective: par\n")
    before = snapshot(out)
    assert main(commands(small_shards, tiny_clip_path, out)[command]) == 2
    err = capsys.readouterr().err.strip()
    kind = "shard set" if command == "clean" else "cleaning run"
    assert err.count("\n") == 0 and f"{out}: holds a {kind}" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_a_refused_pipeline_run_leaves_pipeline_yaml_alone(tiny_clip_path, tiny_sd_dir, tmp_path, capsys):
    import yaml

    from cleaning.train import CleanConfig
    from parclean.config import write_resolved

    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    write_resolved(CleanConfig(tau=1.0), out / "config.yaml")  # a run of another recipe, stopped at step 1
    (out / "pipeline.yaml").write_text("the earlier run's\n")
    settings = {"model": str(tiny_clip_path), "out": str(out), "shard_cache": str(tmp_path / "cache"),
                "generate": {"model": str(tiny_sd_dir), "bank": "toyworld", "num_samples": 4}}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert main(["run", "--config", str(config)]) == 2
    assert "tau: 1.0 -> 2.15" in capsys.readouterr().err
    assert (out / "pipeline.yaml").read_text() == "the earlier run's\n"
