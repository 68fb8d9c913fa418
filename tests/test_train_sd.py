"""toyworld/train_sd.py: a 3-step toy Stable Diffusion training run end to end, resume, errors, shipped config."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from generation.config import GenerateConfig
from generation.pipeline import load_pipeline
from parclean.config import load_config, to_dict
from parclean.models import create_model, save_model
from toyworld.train_sd import ToySDConfig, train

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "model.safetensors"
    return save_model(create_model("tiny-test", seed=0), path, dtype=torch.float16)


def tiny_config(clip: Path, **changes) -> ToySDConfig:
    """Tiny sizes (tens of thousands of parameters), 3 steps per phase; `changes` as dotted keys."""
    settings = {
        "clip": str(clip), "threads": 1, "checkpoint_every": 2, "log_every": 1,
        "vae.block_out_channels": [8, 16], "vae.steps": 3, "vae.batch_size": 4,
        "unet.block_out_channels": [8, 16], "unet.cross_attention": [False, True], "unet.attention_head_channels": 8,
        "unet.steps": 3, "unet.batch_size": 4,
        "eval.every": 3, "eval.count": 10, "eval.steps": 2, "eval.batch_size": 10, "eval.reconstruction_count": 20,
    }
    return load_config(ToySDConfig, overrides={**settings, **changes})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_clip_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy-sd")
    train(tiny_config(tiny_clip_file), out, command="test")
    return out


def test_smoke_training_saves_a_pipeline_that_loads_like_sd15(trained):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(trained)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert {getattr(pipe, part).dtype for part in ("unet", "vae", "text_encoder")} == {torch.float32}
    assert pipe.tokenizer.model_max_length == 24
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.cross_attention_dim == 32
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the toy latents, not SD's constant
    images = pipe(["a small red circle in the center on a black background"] * 2, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    unet_file = trained / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(unet_file), framework="pt") as handle:
        assert handle.get_tensor(next(iter(handle.keys()))).dtype == torch.float16  # stored half, loaded fp32

    # Our generation stage loads it through the very path it uses for SD 1.5.
    cfg = GenerateConfig(model=str(trained), bank="toyworld", seed=0, num_samples=2, batch_size=2, steps=2,
                         height=32, width=32, device="cpu", dtype="fp32")
    assert type(load_pipeline(cfg)).__name__ == "StableDiffusionPipeline"


def test_smoke_training_writes_log_card_and_config(trained):
    records = log_lines(trained)
    assert [r["step"] for r in records if r["phase"] == "vae" and "mse" in r] == [1, 2, 3]
    assert [r["step"] for r in records if r["phase"] == "unet"] == [1, 2, 3]
    assert 0 <= records[-1]["fidelity"] <= 100
    card = json.loads((trained / "card.json").read_text())
    assert card["steps"] == {"vae": 3, "unet": 3} and card["latent_shape"] == [4, 16, 16]
    assert card["fidelity_curve"][-1]["step"] == 3
    assert card["folder_mb"] < 2
    assert yaml.safe_load((trained / "config.yaml").read_text())["unet"]["steps"] == 3
    assert (trained / "checkpoints" / "unet" / "checkpoint.pt").is_file()  # keep_checkpoints: extendable
    assert not (trained / "checkpoints" / "vae").exists()


def test_rerun_skips_the_finished_vae_and_extends_the_unet(tiny_clip_file, trained, tmp_path):
    out = tmp_path / "toy-sd"
    shutil.copytree(trained, out)
    vae_hash = sha256(out / "vae" / "diffusion_pytorch_model.safetensors")
    train(tiny_config(tiny_clip_file, **{"unet.steps": 5}), out)
    records = log_lines(out)
    assert sum(r["phase"] == "vae" for r in records) == 4  # the first run's 3 steps + its report; nothing new
    assert sha256(out / "vae" / "diffusion_pytorch_model.safetensors") == vae_hash
    assert [r["step"] for r in records if r["phase"] == "unet"] == [1, 2, 3, 4, 5]

    # Resumed from step 3 = trained straight to step 5: batches, noise and dropout are functions of the step.
    straight = tmp_path / "straight"
    train(tiny_config(tiny_clip_file, **{"unet.steps": 5}), straight)
    assert sha256(out / "unet" / "diffusion_pytorch_model.safetensors") == sha256(
        straight / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_a_killed_vae_phase_resumes_from_its_checkpoint(tiny_clip_file, tmp_path):
    out = tmp_path / "toy-sd"
    config = tmp_path / "tiny.yaml"
    settings = {"vae.steps": 10_000, "unet.steps": 1, "eval.every": 0}
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tiny_clip_file, **settings))))
    command = [sys.executable, "-m", "toyworld.train_sd", "--config", str(config), "--out", str(out)]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoints" / "vae" / "checkpoint.pt"
    try:
        deadline = time.time() + 300  # a loaded 2-core machine starts the subprocess slowly
        while not checkpoint.is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert checkpoint.is_file(), "the run never wrote a VAE checkpoint"
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    steps = killed_at + 3
    train(tiny_config(tiny_clip_file, **{**settings, "vae.steps": steps}), out)
    logged = [r["step"] for r in log_lines(out) if r["phase"] == "vae" and "mse" in r]
    assert logged == list(range(1, steps + 1))  # lines past the checkpoint dropped, then written once
    assert (out / "vae" / "config.json").is_file() and not checkpoint.exists()


def test_missing_clip_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors not found"):
        train(tiny_config(tmp_path / "nowhere.safetensors"), tmp_path / "out")


def test_shipped_config_loads():
    cfg = load_config(ToySDConfig, REPO / "configs" / "organism" / "toy-sd.yaml")
    assert cfg.unet.caption_dropout == 0.1 and cfg.noise.prediction_type == "epsilon"
    assert cfg.resolution // 2 ** (len(cfg.vae.block_out_channels) - 1) == 16  # 16x16x4 latents
    header = (REPO / "configs" / "organism" / "toy-sd.yaml").read_text().splitlines()[0]
    assert header == "# python -m toyworld.train_sd --config configs/organism/toy-sd.yaml --out toyworld/models/toy-sd"
