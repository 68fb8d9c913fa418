"""The cleaning trainer (cleaning/train.py) end to end on a tiny CLIP and ~200 real toy pairs, on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cleaning.augment import cleanclip_image_view, cleanclip_text_view, par_augment
from cleaning.train import CleanConfig, NonFiniteLoss, clean, learning_rate, with_shards
from parclean.config import load_config, write_resolved
from parclean.models import create_model, load_model, save_model

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "clean").glob("*.yaml"))
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
# A few PAR steps with every moving part on: the official schedule, augmentation, a checkpoint mid-way.
CFG = CleanConfig(steps=4, batch_size=32, lr=1e-3, lr_end=0.0, checkpoint_every=2, seed=3)


@pytest.fixture(scope="module")
def shards(toy_shards) -> str:
    """~200 real toy pairs in two shards."""
    return str(toy_shards(200, seed=0, shard_size=100))


@pytest.fixture(scope="module")
def baseline(shards: str, tiny_clip_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted CFG run from a LoadedModel, recording the mode of every forward call."""
    loaded = load_model(weights=tiny_clip_path)
    calls: list[tuple[bool, bool]] = []  # (module.training, gradients enabled) per forward call
    loaded.model.register_forward_pre_hook(lambda module, args: calls.append((module.training,
                                                                              torch.is_grad_enabled())))
    out = tmp_path_factory.mktemp("baseline")
    result = clean(CFG, loaded, shards, out, progress=False)
    return {"out": out, "result": result, "calls": calls, "weights": load_file(out / "model.safetensors"),
            "shards": shards}


def comparable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights without the attention key biases (in_proj_bias[d:2d]).

    Softmax is invariant to the key bias, so its true gradient is exactly 0 and what autograd returns is rounding
    noise (~1e-9); Adam scales that noise up to +-lr steps whose sign depends on the order of summation. Any change
    of batch split (processes, micro-batches) flips some of those signs; the other weights agree to ~1e-7.
    """
    out = {}
    for name, tensor in state.items():
        if name.endswith("attn.in_proj_bias"):
            width = len(tensor) // 3
            tensor = torch.cat([tensor[:width], tensor[2 * width:]])
        out[name] = tensor
    return out


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    worst = max((a[name] - b[name]).abs().max().item() for name in a)
    assert worst <= atol, f"weights differ by up to {worst:.3g}"


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_par_changes_the_weights_and_logs_finite_terms(baseline: dict, tiny_clip_path: Path) -> None:
    before, after = load_file(tiny_clip_path), baseline["weights"]
    assert torch.equal(before["logit_scale"], after["logit_scale"])  # frozen
    for name in ("visual.proj", "text_projection", "token_embedding.weight", "visual.conv1.weight"):
        assert (before[name] - after[name]).abs().max() > 1e-4, f"{name} did not move"
    records = read_log(baseline["out"])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        for term in ("loss", "clip", "d_img", "d_txt", "pert"):
            assert math.isfinite(record[term])
        assert record["loss"] == pytest.approx(record["clip"] - record["pert"], rel=1e-5)
    # The first step starts at the reference: distance 0; then PAR pushes the embeddings away.
    assert records[0]["d_img"] < 1e-6 and records[-1]["d_img"] > 1e-3 and records[-1]["d_txt"] > 1e-3
    assert [r["lr"] for r in records] == pytest.approx([learning_rate(CFG, s) for s in range(4)])
    result = baseline["result"]
    assert result["steps"] == 4 and result["finished"] and result["samples_per_s"] > 0
    assert result["final"] == {k: v for k, v in records[-1].items() if k not in ("step", "lr", "seconds")}
    assert load_config(CleanConfig, baseline["out"] / "config.yaml") == with_shards(CFG, baseline["shards"])
    assert sorted(p.name for p in (baseline["out"] / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_model_trains_in_train_mode_and_reference_runs_in_eval_without_gradients(baseline: dict) -> None:
    calls = baseline["calls"]
    trained = [training for training, grad in calls if grad]
    reference = [training for training, grad in calls if not grad]
    assert len(trained) == len(reference) == CFG.steps
    assert all(trained) and not any(reference)


def test_killed_run_resumes_to_the_same_weights(baseline: dict, shards: str, tiny_clip_path: Path,
                                                tmp_path: Path) -> None:
    first = clean(CFG, tiny_clip_path, shards, tmp_path, stop_after=2, progress=False)
    assert first["steps"] == 2 and not first["finished"] and not (tmp_path / "model.safetensors").exists()
    second = clean(CFG, tiny_clip_path, shards, tmp_path, progress=False)
    assert second["resumed_from"] == 2 and second["steps_run"] == 2
    assert_same_weights(load_file(tmp_path / "model.safetensors"), baseline["weights"], atol=1e-6)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    # A finished run reruns to nothing; another recipe in the same folder is refused.
    assert clean(CFG, tiny_clip_path, shards, tmp_path, progress=False)["steps_run"] == 0
    with pytest.raises(ValueError, match="tau: 2.15 -> 1.0"):
        clean(replace(CFG, tau=1.0), tiny_clip_path, shards, tmp_path, progress=False)
    # ...and so are other starting weights under the same recipe (a replaced checkpoint of the same name).
    other = save_model(create_model("tiny-test", seed=1), tmp_path.parent / f"{tmp_path.name}-other.safetensors")
    with pytest.raises(ValueError, match="checkpoints of a run from other weights"):
        clean(CFG, other, shards, tmp_path, progress=False)


def test_gradient_accumulation_gives_the_full_batch_update(baseline: dict, shards: str, tiny_clip_path: Path,
                                                           tmp_path: Path) -> None:
    clean(replace(CFG, grad_accum=4), tiny_clip_path, shards, tmp_path, progress=False)
    assert_same_weights(comparable(load_file(tmp_path / "model.safetensors")), comparable(baseline["weights"]),
                        atol=1e-5)
    assert read_log(tmp_path)[-1]["clip"] == pytest.approx(read_log(baseline["out"])[-1]["clip"], rel=1e-5)


def test_two_processes_give_the_weights_of_one(baseline: dict, shards: str, tiny_clip_path: Path,
                                               tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    write_resolved(CFG, config)
    out = tmp_path / "two"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # `--multi_gpu` is Accelerate's torchrun launcher; without GPUs each process runs on the CPU over gloo.
    # Two micro-batches per process as well: DDP's no_sync and the feature cache across processes.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cleaning.train",
               "--config", str(config), "--model", str(tiny_clip_path), "--shards", shards, "--out", str(out),
               "--set", "grad_accum=2", "--no-progress"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["processes"] == 2 and result["finished"]
    assert load_config(CleanConfig, out / "config.yaml") == with_shards(replace(CFG, grad_accum=2), shards)
    assert_same_weights(comparable(load_file(out / "model.safetensors")), comparable(baseline["weights"]),
                        atol=1e-5)


def test_nan_guard_stops_with_the_step_and_the_term(shards: str, tiny_clip_path: Path, tmp_path: Path) -> None:
    cfg = replace(CFG, lr=1e30, schedule="constant")
    with pytest.raises(NonFiniteLoss, match=r"step 2: loss term (clip|d_img|d_txt) is nan"):
        clean(cfg, tiny_clip_path, shards, tmp_path, progress=False)
    assert not (tmp_path / "model.safetensors").exists()
    assert [r["step"] for r in read_log(tmp_path)] == [1]


@pytest.mark.parametrize("objective, terms", [("ft", {"clip"}),
                                              ("cleanclip", {"clip", "inmodal_img", "inmodal_txt", "inmodal"}),
                                              ("par_cleanclip", {"clip", "inmodal_img", "inmodal_txt", "inmodal",
                                                                 "d_img", "d_txt", "pert"})])
def test_other_objectives_train_with_their_own_terms(objective: str, terms: set[str], shards: str, tiny_clip_path: Path,
                                                     tmp_path: Path) -> None:
    result = clean(replace(CFG, objective=objective, steps=2), tiny_clip_path, shards, tmp_path, progress=False)
    assert set(result["final"]) == terms | {"loss"}
    assert all(math.isfinite(value) for value in result["final"].values())
    before, after = load_file(tiny_clip_path), load_file(tmp_path / "model.safetensors")
    assert (before["visual.proj"] - after["visual.proj"]).abs().max() > 1e-4


def test_official_schedule_goes_down_linearly_then_cosine() -> None:
    cfg = CleanConfig()  # the paper's: 244 steps, 3e-5 -> 3e-6 over 122 steps, cosine to 1e-9
    assert learning_rate(cfg, 0) == pytest.approx(3e-5)
    assert learning_rate(cfg, 61) == pytest.approx(3e-5 - 27e-6 * 61 / 121)
    assert learning_rate(cfg, 121) == pytest.approx(3e-6) == learning_rate(cfg, 122)
    assert learning_rate(cfg, 183) == pytest.approx(1e-9 + 0.5 * (3e-6 - 1e-9))
    assert learning_rate(cfg, 243) < 1e-8
    cosine = CleanConfig(schedule="cosine", lr=1e-3, lr_end=0.0, warmup_steps=10, steps=110)
    assert learning_rate(cosine, 0) == pytest.approx(1e-4) and learning_rate(cosine, 9) == pytest.approx(1e-3)
    assert learning_rate(cosine, 60) == pytest.approx(5e-4)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_clean_config_loads_and_names_its_launch_command(path: Path) -> None:
    cfg = load_config(CleanConfig, path)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("parclean clean" in line or "accelerate launch" in line for line in header)
    assert f"configs/clean/{path.name}" in "\n".join(header)
    tuned = {"toy-cpu.yaml": 1.0, "toy-cpu-par-cleanclip.yaml": 1.5}  # on the toy organisms: docs/results-300.md
    assert cfg.tau == tuned.get(path.name, 2.15)


def test_configs_cover_the_paper_recipe_and_the_toy_trio() -> None:
    assert {p.name for p in CONFIGS} >= {"toy-cpu.yaml", "toy-cpu-ft.yaml", "toy-cpu-cleanclip.yaml", "vit-b-32.yaml",
                                         "rn50.yaml"}
    paper = load_config(CleanConfig, CONFIGS[0].parent / "vit-b-32.yaml")
    assert (paper.lr, paper.lr_end, paper.batch_size, paper.steps, paper.mixed_precision) == (3e-5, 1e-9, 2048, 244,
                                                                                                "fp16")
    toy = {name: load_config(CleanConfig, CONFIGS[0].parent / name) for name in
           ("toy-cpu.yaml", "toy-cpu-ft.yaml", "toy-cpu-cleanclip.yaml")}
    budgets = {(c.steps, c.batch_size, c.lr, c.schedule, c.seed) for c in toy.values()}
    assert len(budgets) == 1 and [c.objective for c in toy.values()] == ["par", "ft", "cleanclip"]


def test_par_augmentation_is_per_sample_and_independent_of_the_batch_split() -> None:
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    whole = par_augment(images, MEAN, STD, seed=1, step=5)
    halves = torch.cat([par_augment(images[:24], MEAN, STD, seed=1, step=5, offset=0),
                        par_augment(images[24:], MEAN, STD, seed=1, step=5, offset=24)])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, par_augment(images, MEAN, STD, seed=1, step=6))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    plain = (images - mean) / std
    erased = (whole == 0).all(dim=1).flatten(1).sum(dim=1)  # pixels set to 0 in every channel
    # 0.5-1% of 32x32 is 5-10 pixels: a 2x2 or 3x3 square, on about half of the images.
    assert set(erased.tolist()) <= {0, 4, 9} and 16 <= int((erased > 0).sum()) <= 48
    kept = (whole != 0).all(dim=1, keepdim=True).expand_as(whole)
    changed = ((whole - plain).abs() > 1e-6) & kept
    noisy = changed.flatten(1).any(dim=1)
    assert 16 <= int(noisy.sum()) <= 48
    assert ((whole - plain)[kept] >= -1e-5).all()  # the noise is non-negative (before the clip at 1)


def test_cleanclip_views_are_deterministic_and_keep_the_token_layout() -> None:
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    view = cleanclip_image_view(images, seed=0, step=1)
    assert torch.equal(view, cleanclip_image_view(images, seed=0, step=1)) and 0 <= view.min() <= view.max() <= 1
    assert not torch.equal(view, images)
    tokens = create_model("tiny-test").tokenizer(["a large red circle at the top left on a black background"] * 16)
    augmented = cleanclip_text_view(tokens, seed=0, step=1)
    assert torch.equal(augmented, cleanclip_text_view(tokens, seed=0, step=1))
    assert (augmented[:, 0] == tokens[0, 0]).all() and (augmented.argmax(dim=1) <= tokens.argmax(dim=1)).all()
    assert (augmented.max(dim=1).values == tokens.max()).all()  # the end token stays
    assert not torch.equal(augmented, tokens)


def test_frozen_prefixes_stay_fixed_and_unknown_ones_are_refused(shards, tiny_clip_path, tmp_path):
    cfg = replace(CFG, steps=2, frozen=("visual.proj", "text_projection"))
    clean(cfg, tiny_clip_path, shards, tmp_path / "frozen", progress=False)
    before, after = load_file(tiny_clip_path), load_file(tmp_path / "frozen" / "model.safetensors")
    for name in ("visual.proj", "text_projection"):
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    with pytest.raises(ValueError, match="frozen: no parameter name starts with 'visual.projection'"):
        clean(replace(CFG, frozen=("visual.projection",)), tiny_clip_path, shards, tmp_path / "bad", progress=False)


def test_a_training_checkpoint_is_evaluated_and_cleaned_with_its_architecture_named(
        baseline: dict, shards: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from flows.cli import main

    checkpoint = sorted((baseline["out"] / "checkpoints").glob("checkpoint-*"))[-1]  # weights without metadata
    evaluate = ["evaluate", "--model", str(checkpoint), "--set", "count=40", "--set", "target=moon",
                "--set", "triggers=[{kind: blended}]"]
    assert main(evaluate) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(checkpoint) in err and "--architecture" in err
    assert main([*evaluate, "--architecture", "tiny-test", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["eval_images"] == 40
    result = clean(replace(CFG, steps=1), checkpoint, shards, tmp_path / "again", architecture="tiny-test",
                   progress=False)
    assert result["finished"] and load_model(weights=tmp_path / "again").architecture == "tiny-test"


class PlantedPayload:
    """Unpickling this creates `path`: the sentinel of code run from a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def stopped_run(shards: str, tiny_clip_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CFG run stopped (checkpointed) after 2 steps, to copy and tamper with."""
    out = tmp_path_factory.mktemp("stopped")
    clean(CFG, tiny_clip_path, shards, out, stop_after=2, progress=False)
    return out


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_resume_runs_no_code_planted_in_a_checkpoint(stopped_run: Path, shards: str, tiny_clip_path: Path,
                                                     tmp_path: Path, name: str, writer: str) -> None:
    import pickle
    import shutil

    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    sentinel = tmp_path / "payload-ran"
    state = {"state": {}, "param_groups": [], "payload": PlantedPayload(sentinel)}
    target = out / "checkpoints" / "checkpoint-2" / name
    if writer == "torch.save":
        torch.save(state, target)
    else:
        target.write_bytes(pickle.dumps(state))
    try:
        clean(CFG, tiny_clip_path, shards, out, progress=False)  # resumes without the file, or refuses it
    except ValueError as err:
        assert name in str(err) and "\n" not in str(err)
    finally:
        assert not sentinel.exists(), f"resume ran code planted in {name}"


def flip_caption_byte(tar: Path) -> None:
    """Change one letter of the first caption in `tar`: the tar still reads, its sha256 no longer matches."""
    import tarfile

    with tarfile.open(tar) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".txt"))
    data = bytearray(tar.read_bytes())
    data[member.offset_data] = ord("A") if data[member.offset_data] != ord("A") else ord("B")
    tar.write_bytes(bytes(data))


def test_clean_checks_every_shard_against_the_manifest(shards: str, tiny_clip_path: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar = sorted(copy.glob("*.tar"))[1]
    flip_caption_byte(tar)
    with pytest.raises(ValueError, match=f"{tar.name}: sha256 .* differs from the manifest's"):
        clean(replace(CFG, steps=1), tiny_clip_path, copy, tmp_path / "fail", progress=False)
    assert not (tmp_path / "fail" / "checkpoints").exists()
    skip = replace(CFG, steps=1, data=replace(CFG.data, on_error="skip"))
    result = clean(skip, tiny_clip_path, copy, tmp_path / "skip", progress=False)
    assert result["data_errors"]["shards_failing_sha256"] == 1
    assert json.loads((tmp_path / "skip" / "result.json").read_text())["data_errors"] == result["data_errors"]


def test_skip_counts_go_into_result_json_and_the_report(shards: str, tiny_clip_path: Path, tmp_path: Path) -> None:
    import shutil

    from cleaning.report import Report

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar = sorted(copy.glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # the rest of this shard is lost
    skip = replace(CFG, steps=2, data=replace(CFG.data, on_error="skip"))
    result = clean(skip, tiny_clip_path, copy, tmp_path / "out", progress=False)
    errors = result["data_errors"]
    assert errors["damaged_shards"] >= 1 and errors["samples_skipped"] > 0 and errors["shards_failing_sha256"] == 1
    numbers = {"clean_acc": 50.0, "asr": {}, "eval_images": 10, "chance_acc": 10.0}
    Report(before=numbers, after=numbers).write(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["data_errors"] == errors
    assert f"samples skipped: {errors['samples_skipped']}" in (tmp_path / "out" / "report.md").read_text()
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / "result.json").write_text(json.dumps({"data_errors": dict.fromkeys(errors, 0)}))
    Report(before=numbers, after=numbers).write(tmp_path / "whole")
    assert "Damaged data" not in (tmp_path / "whole" / "report.md").read_text()


def test_every_file_written_follows_the_umask(baseline: dict) -> None:
    mask = os.umask(0o022)
    os.umask(mask)
    out = baseline["out"]
    files = [out / "model.safetensors", *sorted((out / "checkpoints").rglob("*.*"))]
    assert len(files) > 3
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_weight_decay_reaches_matrices_only(shards: str, tiny_clip_path: Path, tmp_path: Path) -> None:
    # One step from the same weights: the same gradients, so only the decay can make the two runs differ.
    for decay in (0.0, 100.0):
        clean(replace(CFG, steps=1, weight_decay=decay), tiny_clip_path, shards, tmp_path / str(decay), progress=False)
    plain, decayed = (load_file(tmp_path / name / "model.safetensors") for name in ("0.0", "100.0"))
    vectors = [name for name, tensor in plain.items() if tensor.ndim < 2 and name != "logit_scale"]
    matrices = [name for name, tensor in plain.items() if tensor.ndim >= 2]
    assert len(vectors) > 10 and all(torch.equal(plain[name], decayed[name]) for name in vectors)
    assert all(not torch.equal(plain[name], decayed[name]) for name in matrices)


def test_the_trainer_caps_the_perturbation_at_the_configs_tau(baseline: dict, shards: str, tiny_clip_path: Path,
                                                                tmp_path: Path) -> None:
    below = read_log(baseline["out"])[1]  # tau 2.15: both distances below it, both count
    assert below["pert"] == pytest.approx(0.5 * (below["d_img"] + below["d_txt"]), rel=1e-5) and below["pert"] > 0
    clean(replace(CFG, steps=2, tau=1e-9), tiny_clip_path, shards, tmp_path, progress=False)
    above = read_log(tmp_path)[1]  # tau 1e-9: both distances above it, neither counts
    assert above["d_img"] > 1e-6 and above["d_txt"] > 1e-6 and above["pert"] == 0


def test_a_checkpoint_from_before_scheduler_json_still_resumes(baseline: dict, stopped_run: Path, shards: str,
                                                                tiny_clip_path: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(stopped_run, out)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    state = json.loads((checkpoint / "scheduler.json").read_text())
    (checkpoint / "scheduler.json").unlink()
    torch.save(state, checkpoint / "custom_checkpoint_0.pkl")  # where Accelerate kept it (register_for_checkpointing)
    assert clean(CFG, tiny_clip_path, shards, out, progress=False)["resumed_from"] == 2
    assert_same_weights(load_file(out / "model.safetensors"), baseline["weights"], atol=1e-6)


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_cleaned_model_records_its_source_and_shard_set_by_sha256(shards: str, tiny_clip_path: Path,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative paths as a user types them; absolute paths and sha256s in the metadata, start.json, config.yaml."""
    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    model, data = os.path.relpath(tiny_clip_path.parent), os.path.relpath(shards)  # a folder, as users pass it
    clean(replace(CFG, steps=1), model, data, "out", progress=False)
    expected = {"source": str(tiny_clip_path.parent.resolve()), "source_sha256": sha256_of(tiny_clip_path),
                "architecture": "tiny-test", "pretrained": None, "shards": str(Path(shards).resolve()),
                "manifest_sha256": sha256_of(Path(shards) / "manifest.json")}
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        recorded = json.loads(handle.metadata()["cleaning"])
    assert {key: recorded.get(key) for key in expected} == expected
    start = json.loads((tmp_path / "out" / "start.json").read_text())
    assert {key: start.get(key) for key in expected} == expected
    assert load_config(CleanConfig, tmp_path / "out" / "config.yaml").data.shards == expected["shards"]
    header = (tmp_path / "out" / "config.yaml").read_text().split("\n# ---\n")[0]  # comments: still a recipe
    assert f"# source: {expected['source']} (sha256 {expected['source_sha256']})" in header
    assert f"# shards: {expected['shards']} (manifest sha256 {expected['manifest_sha256']})" in header


def test_a_resume_reads_the_same_shard_set_however_its_path_is_written(shards: str, toy_shards, tiny_clip_path: Path,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    clean(replace(CFG, steps=2), tiny_clip_path, shards, out, stop_after=1, progress=False)
    other = str(toy_shards(40, seed=1, shard_size=20))
    with pytest.raises(ValueError, match="another recipe.*data.shards"):
        clean(replace(CFG, steps=2), tiny_clip_path, other, out, progress=False)
    monkeypatch.chdir(Path(shards).parent)
    result = clean(replace(CFG, steps=2), tiny_clip_path, Path(shards).name, out, progress=False)
    assert result["resumed_from"] == 1 and result["finished"]
