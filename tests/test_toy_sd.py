"""The toy Stable Diffusion: text tower conversion, a 3-step training run end to end, resume, fidelity plumbing."""

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
from PIL import Image

from generation.config import GenerateConfig
from generation.pipeline import load_pipeline
from parclean.attacks import to_float_images
from parclean.config import load_config, to_dict
from parclean.evaluate import DEFAULT_TEMPLATES, LabelledImages, clean_accuracy, zero_shot_classifier
from parclean.models import create_model, save_model
from toyworld.fidelity import caption_labels, held_out_captions, judge_fidelity, save_grid
from toyworld.render import classes, eval_set
from toyworld.text_encoder import build_tokenizer, convert_text_tower, open_clip_token_states, prune_vocabulary
from toyworld.train_sd import ToySDConfig, train, vocabulary_texts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_clip():
    """The organism's CLIP architecture (text: width 128, 3 layers, context 24), random weights, and its layer
    norms moved off their (1, 0) init so a mix-up of weight and bias or of q/k/v cannot cancel out."""
    loaded = create_model("toy-vit-32", seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if "ln" in name or "bias" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return loaded


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [c.text for c in held_out_captions(30, seed=5)] + ["a photo of a moon.", "a red ring"]


def up_to_eos(values: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Entries through each row's first <|endoftext|> (`eos` marks it); after it the tokenizers pad differently."""
    keep = (torch.cumsum(eos.int(), dim=1) - eos.int()) == 0
    return values[keep]


# ------------------------------------------------------------------------------------------- text encoder


def test_converted_text_encoder_matches_open_clip_per_token(toy_clip, captions, tmp_path):
    text_encoder = convert_text_tower(toy_clip)
    assert text_encoder.config.hidden_act == "gelu"
    assert text_encoder.config.max_position_embeddings == 24
    tokens = toy_clip.tokenizer(captions)
    with torch.no_grad():
        ours = text_encoder(tokens).last_hidden_state
        pooled = text_encoder(tokens).pooler_output @ toy_clip.model.text_projection
    reference = open_clip_token_states(toy_clip, tokens)
    assert reference.abs().mean() > 0.1  # not a degenerate all-zero comparison
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # The pooled <|endoftext|> state, projected, is open_clip's text embedding: same model, not just same shapes.
    torch.testing.assert_close(pooled, toy_clip.model.encode_text(tokens).detach(), atol=1e-5, rtol=0)

    tokenizer = build_tokenizer(tmp_path / "tokenizer", context_length=24)
    assert tokenizer.model_max_length == 24
    ids = tokenizer(captions, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(up_to_eos(ids, ids == 49407), up_to_eos(tokens, tokens == 49407))
    with torch.no_grad():  # what the pipeline feeds (padded with <|endoftext|>) agrees up to the end of text
        padded = text_encoder(ids).last_hidden_state
    torch.testing.assert_close(up_to_eos(padded, ids == 49407), up_to_eos(reference, tokens == 49407),
                               atol=1e-5, rtol=0)


def test_pruned_vocabulary_keeps_toy_captions_identical(toy_clip, tmp_path):
    text_encoder = convert_text_tower(toy_clip)
    tokenizer = prune_vocabulary(text_encoder, tmp_path, vocabulary_texts(), context_length=24)
    assert 500 < text_encoder.config.vocab_size < 1000  # 512 byte tokens + the toy words' merges + 2 specials
    assert text_encoder.get_input_embeddings().weight.shape[0] == text_encoder.config.vocab_size
    texts = [c.text for c in held_out_captions(300, seed=11)] + [t.format(s) for t in DEFAULT_TEMPLATES
                                                                  for s in classes()]
    ids = tokenizer(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    tokens = toy_clip.tokenizer(texts)
    with torch.no_grad():
        pruned = text_encoder(ids).last_hidden_state
    reference = open_clip_token_states(toy_clip, tokens)
    torch.testing.assert_close(up_to_eos(pruned, ids == tokenizer.eos_token_id), up_to_eos(reference, tokens == 49407),
                               atol=1e-5, rtol=0)
    # A word the toy world never uses still tokenizes (into smaller pieces), never into an unknown token.
    odd = tokenizer("a zebra").input_ids
    assert len(odd) > 4 and tokenizer.unk_token_id not in odd[1:-1]


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


# ------------------------------------------------------------------------------------------------ fidelity


def test_held_out_labels_name_the_captioned_shape():
    captions = held_out_captions(40)
    labels = caption_labels(captions)
    assert all(f" {classes()[int(label)]}" in c.text for c, label in zip(captions, labels, strict=True))
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10  # balanced: chance is 10%


def test_fidelity_of_real_images_is_the_judges_accuracy(toy_clip):
    images, labels = eval_set(200)
    data = LabelledImages(to_float_images(images), torch.from_numpy(labels), classes())
    result = judge_fidelity(toy_clip, data.images, data.labels)
    expected = 100 * clean_accuracy(toy_clip, data, zero_shot_classifier(toy_clip, classes()))
    assert result["fidelity"] == pytest.approx(expected) and result["count"] == 200
    assert set(result["per_class"]) == set(classes())


def test_save_grid_writes_one_tile_per_image(tmp_path):
    images = torch.rand(10, 3, 32, 32)
    path = save_grid(images, [f"caption {i}" for i in range(10)], tmp_path / "grid.png", columns=5, scale=2)
    with Image.open(path) as grid:
        assert grid.width == 5 * (64 + 4) and grid.height > 2 * 64
        tile = np.asarray(grid)[:64, :64]
    expected = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(2, 0).repeat(2, 1)
    assert np.array_equal(tile, expected)


SHIPPED_SD = REPO / "toyworld" / "models" / "toy-sd"
JUDGE = REPO / "toyworld" / "models" / "clip-clean" / "model.safetensors"


def test_shipped_toy_sd_loads_like_sd15_and_draws_the_captioned_shapes():
    """The shipped pipeline through diffusers' own loader, 40 held-out captions (about 10 s on one thread)."""
    from diffusers import DiffusionPipeline

    from toyworld.fidelity import fidelity

    pipe = DiffusionPipeline.from_pretrained(SHIPPED_SD)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.vae.config.latent_channels == 4
    result = fidelity(SHIPPED_SD, JUDGE, count=40, steps=20)
    assert result["fidelity"] >= 50, result  # 68.4% on 500 captions (card.json); chance is 10%


def test_a_linear_probe_judges_real_images_far_better_than_zero_shot_prompts():
    """The probe judge (fidelity --probe) reads real toy images at ~97% where the prompts read 79%."""
    from parclean.models import load_model
    from toyworld.fidelity import linear_probe, real_accuracy

    judge = load_model(weights=JUDGE)
    judge.model.eval()
    zero_shot = real_accuracy(judge, zero_shot_classifier(judge, classes()), count=1000)
    probe = real_accuracy(judge, linear_probe(judge, 3000), count=1000)
    assert probe >= 93 and probe > zero_shot + 10, (probe, zero_shot)


@pytest.mark.slow
def test_shipped_toy_sd_keeps_its_measured_fidelity():
    """500 held-out captions at the generation config's 20 steps, as card.json records: 68.4% judged zero-shot,
    84.2% judged by a linear probe on the same CLIP (docs/toy-sd.md). About 4 minutes on one CPU thread."""
    from toyworld.fidelity import fidelity

    card = json.loads((SHIPPED_SD / "card.json").read_text())
    for key, probe in (("fidelity", 0), ("fidelity_probe", 20_000)):
        result = fidelity(SHIPPED_SD, JUDGE, count=500, steps=20, probe=probe)
        assert abs(result["fidelity"] - card[key]["fidelity"]) <= 1.0, (key, result)
        assert result["judge_real_accuracy"] > result["chance"] + 50
    assert result["fidelity"] >= 70  # the bar, judged by the probe (84.2%)


def test_fidelity_curve_plots_the_training_log(tmp_path):
    from toyworld.fidelity import plot_curve

    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(row) for row in [{"phase": "unet", "step": 25, "loss": 0.5},
                                                          {"phase": "unet", "step": 500, "fidelity": 11.0},
                                                          {"phase": "unet", "step": 1000, "fidelity": 24.0}]))
    assert plot_curve(log, tmp_path / "curve.png", final=30.0).stat().st_size > 5000
    log.write_text(json.dumps({"phase": "vae", "step": 25}))
    with pytest.raises(ValueError, match="no fidelity lines"):
        plot_curve(log, tmp_path / "none.png")
