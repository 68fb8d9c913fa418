"""The Prefect flows on real Prefect (a throwaway server), a tiny random Stable Diffusion and a tiny CLIP; no mocks."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateName,
)
from prefect.client.schemas.sorting import ArtifactSort

from flows.clean import clean_model_flow
from flows.config import PipelineConfig
from flows.generate import generate_shards_flow, is_transient
from flows.pipeline import data_free_clean_flow, shard_set_folder, shard_set_key
from flows.serve import build_deployment
from generation.config import GenerateConfig
from parclean.config import ConfigError, load_config
from parclean.shards import read_manifest, verify_shards

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("prefect_harness")


def generate_settings(model: Path, **changes) -> dict:
    """A tiny GenerateConfig as plain settings: 10 captions in shards of 4 (3 shards), 2 steps, 32 px."""
    settings = dict(model=str(model), bank="toyworld", seed=3, num_samples=10, shard_size=4, batch_size=4, steps=2,
                    height=32, width=32, device="cpu", dtype="fp32", image_format="png")
    return {**settings, **changes}


def shard_files(folder: Path) -> dict[str, tuple[str, int]]:
    """tar name -> (sha256, mtime in ns)."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.glob("*.tar"))}


def flow_run_id(state) -> str:
    return state.state_details.flow_run_id


def task_runs_of(flow_run: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))


def latest_artifact(key: str):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    return found[0] if found else None


@pytest.fixture(scope="module")
def finished_set(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A shard set made by one completed local run of the generate flow."""
    out = tmp_path_factory.mktemp("flow-shards")
    state = generate_shards_flow(generate_settings(tiny_sd_dir), str(out), return_state=True)
    assert state.is_completed(), state.message
    return {"out": out, "summary": state.result(), "files": shard_files(out), "flow_run": flow_run_id(state)}




# ------------------------------------------------------------------------------------------ generate flow


def test_generate_flow_writes_every_shard_once_and_reports_progress(finished_set: dict) -> None:
    out, summary = finished_set["out"], finished_set["summary"]
    assert (summary["shards"], summary["shards_written"], summary["shards_skipped"]) == (3, 3, 0)
    assert summary["images_generated"] == 10
    assert verify_shards(out, deep=True) == []
    assert [s["count"] for s in read_manifest(out)["shards"]] == [4, 4, 2]
    runs = sorted(task_runs_of(finished_set["flow_run"]), key=lambda run: run.start_time)
    assert [run.name for run in runs] == ["shard-0", "shard-1", "shard-2", "write-manifest"]  # no random suffixes
    # One pipeline in this process: each shard task is submitted when the last one is done, so its run time in
    # the UI is its own work, not a wait for the pipeline.
    assert all(later.start_time >= earlier.end_time for earlier, later in zip(runs, runs[1:], strict=False))
    progress = latest_artifact(f"{out.name}-generation-progress")
    assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0
    assert not (out / ".progress").exists()  # the per-shard image counters are gone


def test_rerun_of_a_finished_flow_regenerates_nothing(finished_set: dict, tiny_sd_dir: Path) -> None:
    out = finished_set["out"]
    state = generate_shards_flow(generate_settings(tiny_sd_dir), str(out), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary["shards_written"], summary["shards_skipped"], summary["images_generated"]) == (0, 3, 0)
    assert shard_files(out) == finished_set["files"]  # same bytes, same mtimes: nothing rewritten
    assert verify_shards(out) == []


def test_a_flow_result_survives_a_retried_final_state_request(finished_set: dict, tiny_sd_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load Prefect's client can resend a state request whose response it lost; the server then rejects the
    duplicate and answers with the stored state, so the result must be readable from the server's copy."""
    from prefect.client.orchestration import SyncPrefectClient

    request = SyncPrefectClient.request

    def final_state_response_lost_then_resent(self, method, path, *args, **kwargs):
        if path.endswith("/set_state") and kwargs["json"]["state"]["type"] == "COMPLETED":
            request(self, method, path, *args, **kwargs)  # committed; its response never arrives
        return request(self, method, path, *args, **kwargs)

    monkeypatch.setattr(SyncPrefectClient, "request", final_state_response_lost_then_resent)
    state = generate_shards_flow(generate_settings(tiny_sd_dir), str(finished_set["out"]), return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["shards_skipped"] == 3


def test_bad_config_fails_with_the_config_error_and_loses_no_shard(finished_set: dict, tiny_sd_dir: Path) -> None:
    out = str(finished_set["out"])
    bad_value = generate_settings(tiny_sd_dir, steps=0)
    with pytest.raises(ConfigError, match=r"steps=0: must be >= 1"):
        generate_shards_flow(bad_value, out)
    state = generate_shards_flow(generate_settings(tiny_sd_dir, stepz=2), out, return_state=True)
    assert state.is_failed()
    assert "unknown setting(s) stepz" in state.message  # the run's state in the UI says what is wrong
    # A valid config that differs from the one the shards were made with is refused, naming the setting.
    with pytest.raises(ValueError, match=r"different config \(seed: 3 -> 4\)"):
        generate_shards_flow(generate_settings(tiny_sd_dir, seed=4), out)
    assert shard_files(Path(out)) == finished_set["files"]
    assert verify_shards(out) == []


def test_transient_errors_are_retried_and_others_are_not() -> None:
    assert is_transient(PermissionError(13, "Permission denied"))
    assert is_transient(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_transient(FileNotFoundError("model 'x': no such folder"))
    assert not is_transient(ValueError("steps=0: must be >= 1"))


@contextmanager
def read_only(folder: Path):
    """Make `folder` refuse new files (chattr +i as root, who ignores modes; else chmod); yield its undo."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("running as root without chattr: cannot make a folder unwritable")
        lock, unlock = ["chattr", "+i", str(folder)], ["chattr", "-i", str(folder)]
        subprocess.run(lock, check=True, capture_output=True)

        def undo() -> None:
            subprocess.run(unlock, check=True, capture_output=True)
    else:
        folder.chmod(0o555)

        def undo() -> None:
            folder.chmod(0o755)
    try:
        probe = folder / ".probe"
        try:
            probe.touch()
        except PermissionError:
            pass
        else:
            probe.unlink()
            undo()
            pytest.skip(f"{folder}: this filesystem would not make the folder read-only")
        yield undo
    finally:
        undo()


def test_a_shard_that_fails_on_a_transient_error_is_retried_and_the_run_completes(tiny_sd_dir: Path,
                                                                                  tmp_path: Path) -> None:
    settings = generate_settings(tiny_sd_dir, num_samples=4)  # one shard
    out = tmp_path / "shards"
    out.mkdir()
    # The flow writes config.yaml before any shard task runs: an existing file stays writable in a read-only
    # folder, so only the shard's first attempt fails (PermissionError creating its temporary file).
    from parclean.config import write_resolved

    write_resolved(GenerateConfig(**settings), out / "config.yaml")
    with read_only(out) as undo:
        retried = threading.Event()

        def make_writable_when_awaiting_retry() -> None:
            waiting = TaskRunFilter(state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["AwaitingRetry"])))
            deadline = time.monotonic() + 120
            with get_client(sync_client=True) as client:
                while time.monotonic() < deadline:
                    if any(run.name == "shard-0" for run in client.read_task_runs(task_run_filter=waiting)):
                        undo()
                        retried.set()
                        return
                    time.sleep(0.1)

        watcher = threading.Thread(target=make_writable_when_awaiting_retry, daemon=True)
        watcher.start()
        state = generate_shards_flow(settings, str(out), retry_delay_seconds=3, return_state=True)
        watcher.join(timeout=5)
    assert retried.is_set(), "the shard task never waited for a retry"
    assert state.is_completed(), state.message
    (run,) = [r for r in task_runs_of(flow_run_id(state)) if r.name == "shard-0"]
    assert run.run_count == 2 and run.state.is_completed()
    assert state.result()["shards_written"] == 1
    assert verify_shards(out, deep=True) == []


def test_shards_hold_a_slot_of_the_gpu_limit_and_a_missing_limit_fails_loudly(tiny_sd_dir: Path,
                                                                             tmp_path: Path) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    settings = generate_settings(tiny_sd_dir, num_samples=4)
    # A misspelt limit must not mean "no limit": the shard fails at once (not a transient error: no retry).
    state = generate_shards_flow(settings, str(tmp_path / "a"), gpu_limit="gpu-typo", return_state=True)
    assert state.is_failed() and "['gpu-typo'] must be created before acquiring slots" in state.message
    from prefect.concurrency.sync import concurrency

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="gpu-test", limit=1))
    held, released = threading.Event(), []

    def hold_the_only_slot() -> None:  # another GPU job holds the one slot for 3 s
        with concurrency("gpu-test", occupy=1, strict=True):
            held.set()
            time.sleep(3)
            released.append(datetime.now(timezone.utc))

    holder = threading.Thread(target=hold_the_only_slot)
    holder.start()
    assert held.wait(timeout=30)
    state = generate_shards_flow(settings, str(tmp_path / "b"), gpu_limit="gpu-test", return_state=True)
    holder.join()
    assert state.is_completed(), state.message
    assert state.result()["shards_written"] == 1
    (run,) = [r for r in task_runs_of(flow_run_id(state)) if r.name == "shard-0"]
    assert run.end_time > released[0]  # the shard waited for the slot
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu-test").active_slots == 0


@pytest.mark.slow
def test_dask_workers_write_the_same_shards_as_the_local_runner(finished_set: dict, tiny_sd_dir: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "dask-shards"
    state = generate_shards_flow(generate_settings(tiny_sd_dir), str(out), runner="dask", n_workers=2,
                                 return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["shards_written"] == 3
    dask_hashes = {name: sha for name, (sha, _) in shard_files(out).items()}
    local_hashes = {name: sha for name, (sha, _) in finished_set["files"].items()}
    assert dask_hashes == local_hashes
    assert read_manifest(out)["shards"] == read_manifest(finished_set["out"])["shards"]


@pytest.mark.slow
def test_local_runner_with_two_devices_runs_one_worker_each_and_writes_the_same_shards(finished_set: dict,
                                                                                      tiny_sd_dir: Path,
                                                                                      tmp_path: Path) -> None:
    out = tmp_path / "two-devices"
    state = generate_shards_flow(generate_settings(tiny_sd_dir), str(out), devices=["cpu", "cpu"],
                                 return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["shards_written"] == 3
    assert shard_files(out).keys() == finished_set["files"].keys()
    assert {name: sha for name, (sha, _) in shard_files(out).items()} == \
        {name: sha for name, (sha, _) in finished_set["files"].items()}
    assert read_manifest(out)["shards"] == read_manifest(finished_set["out"])["shards"]


# ------------------------------------------------------------------------------------------ clean flow


CLEAN = {"steps": 2, "batch_size": 4, "lr": 1e-4, "schedule": "constant", "checkpoint_every": 2,
         "data": {"shuffle_buffer": 8}}
EVAL = {"data": "toyworld", "count": 40, "target": "moon", "triggers": [{"kind": "badnet", "patch_size": 8}]}


def test_clean_flow_evaluates_cleans_and_publishes_the_report(finished_set: dict, tiny_clip_path: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "cleaned"
    state = clean_model_flow(str(tiny_clip_path), str(finished_set["out"]), CLEAN, EVAL, str(out), return_state=True)
    assert state.is_completed(), state.message
    report_md = Path(state.result())
    assert report_md == out / "report.md" and (out / "model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert set(report["before"]["asr"]) == set(report["after"]["asr"]) == {"badnet"}
    assert report["settings"]["data size (pairs)"] == 10 and report["settings"]["steps"] == 2
    assert set(report["timings"]) == {"evaluate before", "clean", "evaluate after"}
    markdown = latest_artifact("cleaned-cleaning-report")  # keyed by the output folder's name
    assert markdown is not None and "| clean accuracy (%) |" in markdown.data
    assert "data:image/png;base64," in markdown.data  # the training plot, embedded
    table = latest_artifact("cleaned-cleaning-report-table")
    assert table is not None and "ASR badnet (%)" in str(table.data)
    assert all(isinstance(row["after"], float) and row["after"] == round(row["after"], 1)
               for row in json.loads(table.data))
    progress = latest_artifact("cleaned-cleaning-progress")
    assert progress is not None and float(progress.data) == 100.0


def test_clean_flow_reads_both_scans_against_the_reference_it_scans_once(finished_set: dict, tiny_clip_path: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "cleaned"
    scan = {"steps": 3, "images_per_class": 1, "reference": str(tiny_clip_path)}  # the model itself: nothing stands out
    state = clean_model_flow(str(tiny_clip_path), str(finished_set["out"]), CLEAN, EVAL, str(out), scan_config=scan,
                             return_state=True)
    assert state.is_completed(), state.message
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"]["scan"], report["after"]["scan"]
    assert before["reference"] == after["reference"] == str(tiny_clip_path) and before["threshold"] == 1.0
    assert before["suspicious"] is False and before["score"] == 0.0  # the model is its own reference
    assert {"suspicious", "score", "classes"} <= before["scan"].keys()  # the model's own verdict rides along
    assert "scan reference" in report["timings"] and "scan before" in report["timings"]
    assert "- before: no backdoor found (score " in (out / "report.md").read_text()
    assert " <= 1, most anomalous class" in (out / "report.md").read_text()
    assert f"against the reference {tiny_clip_path}" in (out / "report.md").read_text()


def test_published_report_keeps_the_damaged_data_section(tmp_path: Path) -> None:
    from prefect import flow

    from cleaning.report import Report
    from flows.clean import publish_report_task

    Report(before={"clean_acc": 72.5, "asr": {"badnet": 100.0}}, after={"clean_acc": 70.1, "asr": {"badnet": 2.0}},
           data_errors={"shards_failing_sha256": 1, "samples_skipped": 3}).write(tmp_path)

    @flow(name="publish-only")
    def publish_only() -> None:
        publish_report_task(str(tmp_path), "damaged")

    publish_only()
    markdown = latest_artifact("damaged-cleaning-report")
    assert markdown is not None and "## Damaged data" in markdown.data and "samples skipped: 3" in markdown.data


@pytest.mark.slow
def test_clean_flow_launches_accelerate_over_two_processes(finished_set: dict, tiny_clip_path: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # two CPU processes over gloo, as on a machine without GPUs
    out = tmp_path / "cleaned"
    bare = tmp_path / "bare.safetensors"  # no metadata: the launched processes need the architecture named
    save_file(load_file(tiny_clip_path), str(bare))
    launch = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    state = clean_model_flow(str(bare), str(finished_set["out"]), CLEAN, EVAL, str(out), launcher="accelerate",
                             num_processes=2, accelerate_args=launch, architecture="tiny-test", return_state=True)
    assert state.is_completed(), state.message
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["processes"] == 2 and (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ pipeline flow


def pipeline_settings(tmp_path: Path, tiny_sd: Path, clip: Path) -> dict:
    return {"model": str(clip), "out": str(tmp_path / "run"), "shard_cache": str(tmp_path / "cache"),
            "generate": generate_settings(tiny_sd), "clean": CLEAN, "eval": EVAL, "sample_grid": 4,
            "scan": {"steps": 3, "images_per_class": 1}}  # a short scan: its verdict on a random CLIP means nothing


def test_shard_set_folder_is_keyed_on_the_generation_settings(tiny_sd_dir: Path, tmp_path: Path) -> None:
    cfg = GenerateConfig(**generate_settings(tiny_sd_dir))
    same = GenerateConfig(**generate_settings(tiny_sd_dir))
    assert shard_set_folder(cfg, tmp_path) == shard_set_folder(same, tmp_path)
    assert shard_set_folder(cfg, tmp_path).name == f"synth-{shard_set_key(cfg)}"
    keys = {shard_set_key(GenerateConfig(**generate_settings(tiny_sd_dir, **change)))
            for change in ({}, {"seed": 4}, {"bank": "general"}, {"steps": 3}, {"num_samples": 11})}
    assert len(keys) == 5
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd_dir, copy)
    weights = next(copy.glob("unet/*.safetensors"))
    assert shard_set_key(GenerateConfig(**generate_settings(copy))) != shard_set_key(cfg)  # other path
    before = shard_set_key(GenerateConfig(**generate_settings(copy)))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # same path, other weights
    assert shard_set_key(GenerateConfig(**generate_settings(copy))) != before


def test_sample_grid_enlarges_small_samples_and_numbers_them() -> None:
    from PIL import Image

    from flows.pipeline import GRID_GAP, THUMBNAIL, _grid_png

    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "lime", "blue")]
    grid = Image.open(io.BytesIO(_grid_png(images)))
    assert grid.size == (3 * (THUMBNAIL + GRID_GAP), THUMBNAIL + GRID_GAP)
    step = THUMBNAIL + GRID_GAP
    # Each 32 px sample fills a THUMBNAIL-pixel cell, under its number's black label at the top left.
    assert [grid.getpixel((i * step + THUMBNAIL - 1, THUMBNAIL - 1)) for i in range(3)] == [(255, 0, 0), (0, 255, 0),
                                                                                            (0, 0, 255)]
    assert grid.getpixel((step + 1, 1)) == (0, 0, 0)


def test_pipeline_generates_once_then_reuses_the_verified_set(tiny_sd_dir: Path, tiny_clip_path: Path,
                                                              tmp_path: Path) -> None:
    settings = pipeline_settings(tmp_path, tiny_sd_dir, tiny_clip_path)
    state = data_free_clean_flow(settings, return_state=True)
    assert state.is_completed(), state.message
    folder = shard_set_folder(load_config(PipelineConfig, settings).generate, settings["shard_cache"])
    first = shard_files(folder)
    assert len(first) == 3 and Path(state.result()).is_file()
    samples = latest_artifact("pipeline-generated-samples")
    assert samples is not None and "| 3 | 0000003 |" in samples.data and "data:image/png;base64," in samples.data
    # The result is on the run the terminal links to, the pipeline's own, not only on its clean-model subflow.
    report = latest_artifact("pipeline-cleaning-report")
    assert report is not None and report.flow_run_id == flow_run_id(state) and "| clean accuracy (%) |" in report.data
    # The trigger-agnostic scan ran before and after cleaning, and the report shows both verdicts.
    scans = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {"suspicious", "target", "score"} <= scans["before"]["scan"].keys() <= scans["after"]["scan"].keys()
    assert "## Backdoor scan" in report.data and "- before: " in report.data and "- after: " in report.data
    assert "| backdoor scan score (flagged above 2) |" in report.data
    again = data_free_clean_flow(settings, overrides={"out": str(tmp_path / "run2")}, return_state=True)
    assert again.is_completed(), again.message
    assert shard_files(folder) == first
    report = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert report["settings"]["shard set reused"] is True and report["settings"]["shards generated"] == 0


# ------------------------------------------------------------------------------------------ serve


def test_serve_builds_the_nightly_deployment_with_its_cron_schedule() -> None:
    deployment = build_deployment(REPO / "configs" / "pipeline" / "nightly.yaml")
    assert deployment.name == "nightly" and deployment.flow_name == "data-free-clean"
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "UTC")
    assert deployment.parameters["pipeline_config"] == str(REPO / "configs" / "pipeline" / "nightly.yaml")
    with pytest.raises(ValueError, match="no schedule to serve"):
        build_deployment(REPO / "configs" / "pipeline" / "demo.yaml")


def test_prefect_yaml_deploys_the_nightly_config_on_its_schedule() -> None:
    import yaml

    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (nightly,) = [d for d in project["deployments"] if d["name"] == "nightly"]
    cfg = load_config(PipelineConfig, REPO / nightly["parameters"]["pipeline_config"])
    (schedule,) = nightly["schedules"]
    assert (schedule["cron"], schedule["timezone"]) == (cfg.schedule.cron, cfg.schedule.timezone)
    module, _, name = nightly["entrypoint"].partition(":")
    assert (REPO / module).is_file() and name == data_free_clean_flow.fn.__name__


def test_demo_names_the_missing_organism_before_starting_anything(tmp_path: Path, capsys) -> None:
    from flows.cli import main

    missing = tmp_path / "nothing.safetensors"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", f"model={missing}"]) == 2
    assert f"{missing}: the poisoned CLIP to clean is missing" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_end_to_end_against_a_real_prefect_server(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "e2e_prefect.py"), "--work", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "e2e: OK" in result.stdout


def test_run_with_a_nan_loss_fails_in_one_line(tiny_sd_dir: Path, tiny_clip_path: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    import yaml

    from flows.cli import main

    settings = pipeline_settings(tmp_path, tiny_sd_dir, tiny_clip_path)
    settings["clean"] = {**CLEAN, "lr": 1e30, "schedule": "constant"}
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(settings))
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "parclean run: error: step" in err[-1] and "is nan" in err[-1]


def test_run_names_a_bad_config_before_any_prefect_server_starts(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: m.safetensors\ngenerate: {model: sd, bank: toyworld}\nclean: {tau: -1}\n")
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config)], capture_output=True,
                          text=True, cwd=REPO, env={**env, "PREFECT_HOME": str(tmp_path / "prefect")}, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"parclean run: error: {config}: lr=3e-05, lr_end=1e-09, tau=-1.0: "
                                                "lr and tau must be positive, lr_end non-negative"]


def test_pipeline_cleans_an_open_clip_training_checkpoint_named_by_architecture(tiny_sd_dir: Path, tmp_path: Path,
                                                                               ) -> None:
    """`architecture:` makes run/serve take what `clean --architecture` takes: here open_clip's epoch_N.pt."""
    from safetensors import safe_open

    from parclean.models import create_model, load_model

    weights = create_model("tiny-test", seed=0).model.state_dict()
    checkpoint = tmp_path / "epoch_1.pt"  # open_clip_train's layout: DDP's "module." prefix, optimizer state
    torch.save({"epoch": 1, "name": "poisoned", "state_dict": {"module." + k: v for k, v in weights.items()}},
               checkpoint)
    settings = {**pipeline_settings(tmp_path, tiny_sd_dir, checkpoint), "architecture": "tiny-test",
                "scan": None, "sample_grid": 0}
    state = data_free_clean_flow(settings, return_state=True)
    assert state.is_completed(), state.message
    out = tmp_path / "run"
    assert load_model(weights=out / "model.safetensors").architecture == "tiny-test"
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        recorded = json.loads(handle.metadata()["cleaning"])
    shards = shard_set_folder(load_config(PipelineConfig, settings).generate, settings["shard_cache"])
    assert recorded["source"] == str(checkpoint.resolve()) and recorded["architecture"] == "tiny-test"
    assert recorded["source_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert recorded["manifest_sha256"] == hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert load_config(PipelineConfig, out / "pipeline.yaml").architecture == "tiny-test"


def test_a_pipeline_with_pretrained_takes_the_architecture_as_model_and_nothing_more() -> None:
    base = {"model": "ViT-B-32", "generate": {"model": "sd"}}
    assert load_config(PipelineConfig, {**base, "pretrained": "openai"}).pretrained == "openai"
    with pytest.raises(ConfigError, match="architecture.*pretrained"):
        load_config(PipelineConfig, {**base, "pretrained": "openai", "architecture": "ViT-B-32"})
