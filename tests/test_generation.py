"""Generation stage on a tiny random Stable Diffusion: real diffusers, real shards, real kills."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
import yaml

from generation.config import GenerateConfig
from generation.images import generate_batch, image_seed, resize_for_storage
from generation.pipeline import FLAG_ONLY_CHECKER, load_pipeline
from generation.run import caption_list, generate_shards
from parclean.config import ConfigError, load_config
from parclean.shards import iter_samples, read_manifest, shard_urls, verify_shards

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a small red circle on a black background", "A large blue star, top left!", "ring"]


def tiny_config(model: Path, **changes) -> GenerateConfig:
    settings = dict(
        model=str(model), bank="toyworld", seed=3, num_samples=10, shard_size=4, batch_size=4, steps=2,
        height=32, width=32, device="cpu", dtype="fp32", image_format="png",
    )
    return GenerateConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd_dir):
    return load_pipeline(tiny_config(tiny_sd_dir))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def arrays(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


# ------------------------------------------------------------------------------------------ the pipeline


def test_saved_tiny_pipeline_loads_and_makes_images_of_the_right_size(tiny_sd_dir, tiny_pipe):
    assert type(tiny_pipe).__name__ == "StableDiffusionPipeline"
    assert tiny_pipe.text_encoder.config.vocab_size == 49408
    for part in ("unet", "vae", "text_encoder"):
        params = sum(p.numel() for p in getattr(tiny_pipe, part).parameters())
        assert params < 2_000_000, (part, params)
    # SDPA (diffusers' default) is what runs: nothing switched attention back to the slow path.
    assert {type(p).__name__ for p in tiny_pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    out = generate_batch(tiny_pipe, CAPTIONS, [1, 2, 3], tiny_config(tiny_sd_dir))
    assert [image.size for image in out.images] == [(32, 32)] * 3  # padded 4th image dropped
    assert out.nsfw == [False, False, False]
    assert {image.mode for image in out.images} == {"RGB"}


def test_tokenizer_ids_equal_open_clip(tiny_pipe):
    captions = [*CAPTIONS, "Ünïcödé café: it's 3 o'clock, isn't it?", "a  photo\tof   a dog " * 3]
    for text in captions:
        ours = tiny_pipe.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        theirs = open_clip.tokenize([text])[0].tolist()
        end = theirs.index(49407) + 1
        assert ours[:end] == theirs[:end], text
        assert len(ours) == 77 and set(ours[end:]) <= {49407}  # SD pads with end-of-text


def test_same_seeds_same_images_other_seeds_other_images(tiny_sd_dir, tiny_pipe):
    cfg = tiny_config(tiny_sd_dir)
    first = arrays(generate_batch(tiny_pipe, CAPTIONS, [7, 8, 9], cfg).images)
    again = arrays(generate_batch(tiny_pipe, CAPTIONS, [7, 8, 9], cfg).images)
    other = arrays(generate_batch(tiny_pipe, CAPTIONS, [7, 8, 10], cfg).images)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first[:2], other[:2])  # one generator per image: neighbours unaffected
    assert np.abs(first[2].astype(int) - other[2].astype(int)).mean() > 1.0


def test_batch_larger_than_batch_size_is_refused(tiny_sd_dir, tiny_pipe):
    with pytest.raises(ValueError, match="batch_size=2"):
        generate_batch(tiny_pipe, CAPTIONS, [1, 2, 3], tiny_config(tiny_sd_dir, batch_size=2))


def test_image_seed_is_a_stable_hash():
    assert image_seed(0, 0) == image_seed(0, 0)
    seeds = {image_seed(run, index) for run in range(3) for index in range(1000)}
    assert len(seeds) == 3000 and all(0 <= seed < 2**63 for seed in seeds)
    # Pinned: a changed derivation would silently change every image of every existing run.
    assert (image_seed(0, 1), image_seed(7, 123456)) == (5836529245451711556, 8401554909693080706)


def test_resize_for_storage_keeps_aspect():
    from PIL import Image

    assert resize_for_storage(Image.new("RGB", (64, 32)), 16).size == (32, 16)
    image = Image.new("RGB", (32, 32))
    assert resize_for_storage(image, None) is image


def save_pipeline_with_safety_checker(tiny_sd_dir: Path, out: Path) -> Path:
    """The tiny pipeline plus a tiny random safety checker that flags every image."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8}, projection_dim=32
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    # A concept fires when cosine(image, concept) > its weight; cosines are >= -1, weights start at 1.
    checker.concept_embeds_weights.data.fill_(-2.0)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir, safety_checker=checker, feature_extractor=extractor, requires_safety_checker=True
    )
    pipe.save_pretrained(out)
    return out


def test_safety_checker_flags_images_but_keeps_them(tiny_sd_dir, tiny_pipe, tmp_path):
    model = save_pipeline_with_safety_checker(tiny_sd_dir, tmp_path / "model")
    cfg = tiny_config(model, safety_checker=True, num_samples=4)
    flagged = generate_batch(load_pipeline(cfg), CAPTIONS, [1, 2, 3], cfg)
    plain = generate_batch(tiny_pipe, CAPTIONS, [1, 2, 3], tiny_config(tiny_sd_dir))
    assert flagged.nsfw == [True, True, True]
    np.testing.assert_array_equal(arrays(flagged.images), arrays(plain.images))  # not blackened
    assert arrays(flagged.images).max() > 0
    generate_shards(cfg, tmp_path / "out", progress=False)
    stats = json.loads((tmp_path / "out" / "synth-000000_stats.json").read_text())
    assert (stats["count"], stats["failed_to_generate"], stats["successes"]) == (4, 4, 0)
    assert {meta["nsfw"] for *_, meta in iter_samples(tmp_path / "out")} == {True}
    off = load_pipeline(tiny_config(model, safety_checker=False))
    assert off.safety_checker is None  # not even loaded
    pipe = load_pipeline(cfg)
    getattr(pipe, FLAG_ONLY_CHECKER).concept_embeds_weights.data.fill_(2.0)  # now it never fires
    assert generate_batch(pipe, CAPTIONS, [1, 2, 3], cfg).nsfw == [False, False, False]


def test_loading_a_pipeline_draws_no_progress_bars(tiny_sd_dir, capfd):
    capfd.readouterr()
    load_pipeline(tiny_config(tiny_sd_dir))
    out, err = capfd.readouterr()
    assert "it/s" not in out + err and "%|" not in out + err  # neither diffusers' nor transformers' loading bars

def test_a_folder_without_feature_extractor_loads(tiny_sd_dir, tmp_path):
    model = save_pipeline_with_safety_checker(tiny_sd_dir, tmp_path / "model")
    shutil.rmtree(model / "feature_extractor")  # still listed in model_index.json, as in partial copies
    shutil.rmtree(model / "safety_checker")
    pipe = load_pipeline(tiny_config(model))
    assert pipe.feature_extractor is None and pipe.safety_checker is None
    assert len(generate_batch(pipe, CAPTIONS[:1], [1], tiny_config(model)).images) == 1


def test_safety_checker_asked_for_but_absent_names_the_checker_and_the_folder(tiny_sd_dir, tmp_path):
    model = save_pipeline_with_safety_checker(tiny_sd_dir, tmp_path / "model")
    shutil.rmtree(model / "safety_checker")
    named = rf"safety_checker=true: {model} has no safety checker.*safety_checker/"
    with pytest.raises(FileNotFoundError, match=named):
        load_pipeline(tiny_config(model, safety_checker=True))
    with pytest.raises(FileNotFoundError, match=rf"safety_checker=true: {tiny_sd_dir} has no safety checker"):
        load_pipeline(tiny_config(tiny_sd_dir, safety_checker=True))  # none saved: model_index.json says null
    model = save_pipeline_with_safety_checker(tiny_sd_dir, tmp_path / "model2")
    shutil.rmtree(model / "feature_extractor")
    with pytest.raises(FileNotFoundError, match=rf"{model} has no feature_extractor/.*the safety checker needs"):
        load_pipeline(tiny_config(model, safety_checker=True))


def test_the_gpu_recipe_on_a_cpu_runs_in_fp32_without_compile_and_says_so_once(tiny_sd_dir, caplog):
    cfg = tiny_config(tiny_sd_dir, device="cpu", dtype="fp16", compile=True)
    with caplog.at_level("INFO", logger="generation.pipeline"):
        pipe = load_pipeline(cfg)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    assert getattr(pipe.unet, "_compiled_call_impl", None) is None  # nn.Module.compile() sets it
    said = [r.getMessage() for r in caplog.records if "on the CPU" in r.getMessage()]
    assert len(said) == 1 and "fp32" in said[0] and "compile off" in said[0], said
    assert len(generate_batch(pipe, CAPTIONS[:1], [1], cfg).images) == 1


@pytest.mark.parametrize(("num_samples", "shard_size", "batch_size"), [(3, 4, 8), (10, 4, 3)])
def test_no_image_is_generated_beyond_the_captions(tiny_sd_dir, tmp_path, num_samples, shard_size, batch_size):
    cfg = tiny_config(tiny_sd_dir, num_samples=num_samples, shard_size=shard_size, batch_size=batch_size)
    pipe = load_pipeline(cfg)
    rows = []  # the UNet's batch rows per call: two per image (classifier-free guidance)
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        generate_shards_with(pipe, cfg, tmp_path)
    finally:
        hook.remove()
    assert sum(rows) == 2 * num_samples * cfg.steps
    assert max(rows) <= 2 * min(batch_size, num_samples)


def generate_shards_with(pipe, cfg: GenerateConfig, out: Path) -> None:
    from generation.run import generate_shard, shard_plan

    for index, captions in enumerate(shard_plan(cfg)):
        generate_shard(cfg, out, index, captions, pipe)


# ------------------------------------------------------------------------------------------ shard sets


def test_a_stop_request_ends_generation_at_the_next_batch_and_a_rerun_completes(tiny_sd_dir, tmp_path):
    from parclean import stop

    cfg = tiny_config(tiny_sd_dir)
    stop.request()  # what the command layer does on SIGTERM / Ctrl-C, for worker threads signals never reach
    try:
        with pytest.raises(stop.StopRequested, match="shard 0: stopped"):
            generate_shards(cfg, tmp_path, progress=False)
    finally:
        stop.clear()
    assert not list(tmp_path.glob("*.tar"))
    assert generate_shards(cfg, tmp_path, progress=False)["shards_written"] == 3


def test_generate_shards_gives_a_set_webdataset_reads(tiny_sd_dir, tmp_path):
    cfg = tiny_config(tiny_sd_dir, store_size=16)
    summary = generate_shards(cfg, tmp_path, progress=False)
    assert summary["shards_written"] == 3 and summary["samples"] == 10
    dataset = wds.WebDataset(shard_urls(tmp_path), shardshuffle=False, nodesplitter=None, empty_check=False)
    rows = list(dataset.decode("pil").to_tuple("__key__", "png", "txt", "json"))
    expected = caption_list(cfg)
    assert [caption for _, _, caption, _ in rows] == [c.text for c in expected]
    assert len({key for key, *_ in rows}) == 10
    assert {image.size for _, image, _, _ in rows} == {(16, 16)}  # stored at store_size
    meta = rows[5][3]
    assert meta["caption_index"] == 5 and meta["seed"] == image_seed(3, 5)
    assert meta["prompt_id"] == expected[5].prompt_id and meta["resolution"] == [32, 32]
    assert (meta["scheduler"], meta["steps"], meta["nsfw"]) == ("DDIMScheduler", 2, False)
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "synth-000000.tar": 4, "synth-000001.tar": 4, "synth-000002.tar": 2
    }
    assert read_manifest(tmp_path)["config"]["model"] == str(tiny_sd_dir)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 3


def test_complete_shards_are_skipped_without_loading_the_model(tiny_sd_dir, tmp_path):
    model = shutil.copytree(tiny_sd_dir, tmp_path / "model")
    cfg = tiny_config(model, num_samples=2, shard_size=2, batch_size=2)
    generate_shards(cfg, tmp_path / "out", progress=False)
    before = sha256(tmp_path / "out" / "synth-000000.tar")
    shutil.rmtree(model)  # a load would fail now
    summary = generate_shards(cfg, tmp_path / "out", progress=False)
    assert (summary["shards_written"], summary["shards_skipped"]) == (0, 1)
    assert sha256(tmp_path / "out" / "synth-000000.tar") == before


def test_a_folder_made_with_other_settings_is_refused(tiny_sd_dir, tmp_path):
    generate_shards(tiny_config(tiny_sd_dir, num_samples=2, shard_size=2, batch_size=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different config \(steps: 2 -> 3\).*new --out folder"):
        generate_shards(tiny_config(tiny_sd_dir, num_samples=2, shard_size=2, batch_size=2, steps=3), tmp_path)


def test_corrupted_shard_is_regenerated_with_the_same_bytes(tiny_sd_dir, tmp_path):
    cfg = tiny_config(tiny_sd_dir)
    generate_shards(cfg, tmp_path, progress=False)
    shard = tmp_path / "synth-000001.tar"
    original = shard.read_bytes()
    damaged = bytearray(original)
    for offset in range(len(damaged) // 2, len(damaged) // 2 + 64):
        damaged[offset] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    assert any("synth-000001.tar" in problem for problem in verify_shards(tmp_path))
    summary = generate_shards(cfg, tmp_path, progress=False)
    assert (summary["shards_written"], summary["shards_skipped"]) == (1, 2)
    assert shard.read_bytes() == original
    assert verify_shards(tmp_path, deep=True) == []


def test_a_shard_made_by_another_config_is_never_counted_as_done(tiny_sd_dir, tmp_path):
    from generation.run import write_set_manifest
    from parclean.shards import ShardError

    cfg, other = tiny_config(tiny_sd_dir), tiny_config(tiny_sd_dir, seed=4)
    generate_shards(cfg, tmp_path / "a", progress=False)
    generate_shards(other, tmp_path / "b", progress=False)
    original = sha256(tmp_path / "a" / "synth-000001.tar")
    for name in ("synth-000001.tar", "synth-000001_stats.json"):  # what a concurrent run with seed 4 leaves
        shutil.copy(tmp_path / "b" / name, tmp_path / "a" / name)
    with pytest.raises(ShardError, match="synth-000001.*another config"):
        write_set_manifest(cfg, tmp_path / "a", 3)  # the flow's last task
    summary = generate_shards(cfg, tmp_path / "a", progress=False)
    assert (summary["shards_written"], summary["shards_skipped"]) == (1, 2)
    assert sha256(tmp_path / "a" / "synth-000001.tar") == original
    assert verify_shards(tmp_path / "a", deep=True) == []
    manifest = read_manifest(tmp_path / "a")
    assert manifest["config_sha256"] != read_manifest(tmp_path / "b")["config_sha256"]
    shutil.copy(tmp_path / "b" / "synth-000001_stats.json", tmp_path / "a" / "synth-000001_stats.json")
    assert any("another config" in problem for problem in verify_shards(tmp_path / "a"))


def test_killed_run_resumes_to_a_complete_set(tiny_sd_dir, tmp_path):
    cfg = tiny_config(tiny_sd_dir, num_samples=48, shard_size=3, batch_size=3, steps=2)
    config_path = tmp_path / "gen.yaml"
    config_path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    out = tmp_path / "out"
    first_stats = out / "synth-000000_stats.json"
    command = [sys.executable, "-m", "flows.cli", "generate", "--config", str(config_path), "--out", str(out),
               "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 120
    while not first_stats.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    assert first_stats.exists() and not (out / "manifest.json").exists()
    finished = {p.name.replace("_stats.json", ".tar") for p in out.glob("*_stats.json")}
    assert 1 <= len(finished) < 16
    before = {name: (sha256(out / name), (out / name).stat().st_mtime_ns) for name in finished}

    summary = generate_shards(cfg, out, progress=False)

    assert summary["shards_skipped"] == len(finished) and summary["shards_written"] == 16 - len(finished)
    assert verify_shards(out, deep=True) == []
    assert not list(out.glob(".*.tmp"))
    for name, (digest, mtime) in before.items():
        assert (sha256(out / name), (out / name).stat().st_mtime_ns) == (digest, mtime), name
    dataset = wds.WebDataset(shard_urls(out), shardshuffle=False, nodesplitter=None, empty_check=False)
    keys = [key for key, _ in dataset.to_tuple("__key__", "txt")]
    assert len(keys) == 48 and len(set(keys)) == 48


# ------------------------------------------------------------------------------------------ errors


def test_missing_model_path_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"model '{missing}': no such folder"):
        generate_shards(tiny_config(missing), tmp_path / "out")
    assert not (tmp_path / "out" / "config.yaml").exists()  # nothing written: a fixed rerun is not refused
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_pipeline(tiny_config(tmp_path / "empty"))


def test_hub_id_not_in_the_cache_says_weights_are_not_available_offline():
    with pytest.raises(FileNotFoundError, match="parclean-none/no-such-model.*not available offline"):
        load_pipeline(tiny_config(Path("parclean-none/no-such-model")))


def test_cli_missing_model_exits_2_with_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    command = [sys.executable, "-m", "flows.cli", "generate", "--config", "configs/generate/tiny-cpu.yaml",
               "--out", str(tmp_path / "out"), "--model", str(missing), "--num-samples", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and lines[0].startswith("parclean generate: error:")


def test_bad_settings_are_rejected_with_their_names(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: runs/tiny-sd\nstepz: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown setting\(s\) stepz"):
        load_config(GenerateConfig, path)
    with pytest.raises(ConfigError, match="steps=0: must be >= 1"):
        load_config(GenerateConfig, None, {"model": "m/m", "steps": 0})
    with pytest.raises(ConfigError, match="scheduler='NoSuchScheduler': not a diffusers scheduler"):
        load_config(GenerateConfig, None, {"model": "m/m", "scheduler": "NoSuchScheduler"})
    with pytest.raises(ConfigError, match="height=30: must be a positive multiple of 8"):
        load_config(GenerateConfig, None, {"model": "m/m", "height": 30})
    from flows.cli import main

    assert main(["generate", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "unknown setting(s) stepz" in capsys.readouterr().err


def test_shipped_configs_load_and_name_their_launch_command():
    paths = sorted((REPO / "configs" / "generate").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"tiny-cpu", "sd15", "sd-turbo", "sdxl"}
    for path in paths:
        cfg = load_config(GenerateConfig, path)
        assert cfg.num_samples >= cfg.shard_size >= cfg.batch_size
        assert "parclean generate --config configs/generate/" + path.name in path.read_text().split("\nmodel:")[0]
