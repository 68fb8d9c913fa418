"""Train the toy Stable Diffusion on the toy world and save it in the diffusers layout (loads like SD 1.5).

    python -m toyworld.train_sd --config configs/organism/toy-sd.yaml --out toyworld/models/toy-sd

Three parts, as in Stable Diffusion: the clean toy CLIP's text tower, converted and frozen; an AutoencoderKL
trained on toy images (phase 1); a UNet2DConditionModel trained on its latents, conditioned on the frozen
text states, with caption dropout for classifier-free guidance (phase 2). Fresh toy pairs every step, the
batch of step N a pure function of (seed, N), so a killed run resumes from its last checkpoint and sees what
it would have seen. A finished phase is skipped on rerun (vae/ exists: the VAE is done). Writes the pipeline
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), config.yaml, log.jsonl, card.json.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from parclean.attacks import to_float_images
from parclean.checkpoint_file import load_checkpoint_file, save_checkpoint_file
from parclean.command import run_command, script_parser, set_overrides
from parclean.config import load_config, to_dict, write_resolved
from parclean.evaluate import DEFAULT_TEMPLATES, predict, zero_shot_classifier
from parclean.models import LoadedModel, load_model
from parclean.run_log import append_record, truncate_after
from prompts.bank import load_bank
from toyworld.fidelity import HELD_OUT_SEED, measure_fidelity
from toyworld.render import classes, eval_set, make_pairs
from toyworld.text_encoder import build_tokenizer, convert_text_tower, prune_vocabulary

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

STORAGE = {"fp16": torch.float16, "fp32": torch.float32}
PHASE_SEED = {"vae": 0, "unet": 5_000_000}  # keeps the two phases' batches apart


@dataclass(frozen=True)
class VaeConfig:
    block_out_channels: tuple[int, ...] = (32, 64)  # n blocks: 32x32 images -> latents of side 32 / 2**(n-1)
    layers_per_block: int = 1
    latent_channels: int = 4
    mid_attention: bool = False
    steps: int = 1000
    batch_size: int = 16  # small batches, more updates: 16 x 1000 beat 32 x 250 and 32 x 500 per second here
    lr: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-6  # on the KL summed over latent elements; the MSE is a per-pixel mean
    initial_logvar: float = -6.0  # the posterior's starting log-variance (see build_vae)


@dataclass(frozen=True)
class UnetConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    cross_attention: tuple[bool, ...] = (False, True, True)  # per resolution level, finest first
    layers_per_block: int = 1
    attention_head_channels: int = 32  # heads per level = channels / this (few wide heads: fast SDPA on CPU)
    steps: int = 4500
    batch_size: int = 64
    lr: float = 4e-4
    warmup_steps: int = 200  # then constant: EMA smooths, and a finished run can be extended (raise steps)
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    caption_dropout: float = 0.1
    snr_gamma: float | None = 5.0  # min-SNR loss weighting (Hang et al. 2023); None: plain MSE
    ema_max_decay: float = 0.999
    ema_power: float = 0.75  # EMA warm-up: decay = 1 - (1 + step) ** -power, capped at ema_max_decay


@dataclass(frozen=True)
class NoiseConfig:
    """DDPM training schedule; the saved DDIMScheduler gets the same betas (SD 1.5's by default)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"


@dataclass(frozen=True)
class FidelityConfig:
    """How the fidelity of the pipeline in training is measured (the YAML's `eval:` group)."""

    every: int = 500  # UNet steps between fidelity measurements (0: never)
    count: int = 100
    steps: int = 20
    guidance: float = 3.0
    batch_size: int = 100
    seed: int = HELD_OUT_SEED
    reconstruction_count: int = 500  # held-out real images the finished VAE reconstructs for its report


@dataclass(frozen=True)
class ToySDConfig:
    clip: str = "toyworld/models/clip-clean/model.safetensors"  # its text tower becomes the text encoder
    judge: str | None = None  # fidelity judge; None: the same CLIP
    prune_vocabulary: bool = True  # keep the ~650 BPE tokens the toy bank needs (see docs/toy-sd.md)
    resolution: int = 32
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default
    storage_dtype: str = "fp16"  # UNet and VAE weights on disk; they load as fp32 unless asked otherwise
    checkpoint_every: int = 250
    log_every: int = 25
    keep_checkpoints: bool = True  # keep the last UNet checkpoint so a finished run can be extended
    vae: VaeConfig = field(default_factory=VaeConfig)
    unet: UnetConfig = field(default_factory=UnetConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    eval: FidelityConfig = field(default_factory=FidelityConfig)

    def __post_init__(self) -> None:
        if self.storage_dtype not in STORAGE:
            raise ValueError(f"storage_dtype={self.storage_dtype!r}: use one of {sorted(STORAGE)}")
        if any(c % self.unet.attention_head_channels for c in self.unet.block_out_channels):
            raise ValueError("unet.block_out_channels must be multiples of unet.attention_head_channels")
        if len(self.unet.cross_attention) != len(self.unet.block_out_channels):
            raise ValueError("unet.cross_attention needs one entry per unet.block_out_channels entry")
        if self.resolution % 2 ** (len(self.vae.block_out_channels) - 1):
            raise ValueError(f"resolution {self.resolution} is not divisible by the VAE's downsampling")
        if self.noise.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"noise.prediction_type={self.noise.prediction_type!r}: epsilon or v_prediction")


# ----------------------------------------------------------------------------------------------- components


def build_vae(cfg: ToySDConfig) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    blocks = cfg.vae.block_out_channels
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=blocks, layers_per_block=cfg.vae.layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * len(blocks), up_block_types=("UpDecoderBlock2D",) * len(blocks),
        latent_channels=cfg.vae.latent_channels, sample_size=cfg.resolution, norm_num_groups=min(32, min(blocks)),
        mid_block_add_attention=cfg.vae.mid_attention,
    )
    # Adam moves a bias by about lr per step, so a log-variance starting at 0 (posterior std 1, as large as the
    # latents) needs thousands of steps to shrink, and until then the decoder learns from noise: start it low.
    moments = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out  # last layer: (mean, logvar)
    with torch.no_grad():
        moments.bias[cfg.vae.latent_channels:] = cfg.vae.initial_logvar
    return vae


def build_unet(cfg: ToySDConfig, latent_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    u = cfg.unet
    torch.manual_seed(cfg.seed + 1)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=cfg.vae.latent_channels, out_channels=cfg.vae.latent_channels,
        layers_per_block=u.layers_per_block, block_out_channels=u.block_out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in u.cross_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(u.cross_attention)),
        cross_attention_dim=cross_attention_dim, norm_num_groups=min(32, min(u.block_out_channels)),
        # diffusers' legacy naming: `attention_head_dim` is the number of heads (per level)
        attention_head_dim=tuple(max(1, c // u.attention_head_channels) for c in u.block_out_channels),
    )


def noise_schedulers(cfg: ToySDConfig):
    """(DDPMScheduler for training, DDIMScheduler for the saved pipeline), SD 1.5's settings otherwise."""
    from diffusers import DDIMScheduler, DDPMScheduler

    n = cfg.noise
    common = dict(num_train_timesteps=n.num_train_timesteps, beta_start=n.beta_start, beta_end=n.beta_end,
                  beta_schedule=n.beta_schedule, prediction_type=n.prediction_type, clip_sample=False)
    return DDPMScheduler(**common), DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1)


def prepare_text_encoder(cfg: ToySDConfig, out: Path) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """Convert the CLIP's text tower (and tokenizer) into out/text_encoder, out/tokenizer; load them back."""
    from transformers import CLIPTextModel, CLIPTokenizer

    loaded = load_model(weights=cfg.clip)
    text_encoder = convert_text_tower(loaded)
    shutil.rmtree(out / "tokenizer", ignore_errors=True)  # a stale tokenizer.json would win over new BPE files
    context = text_encoder.config.max_position_embeddings
    if cfg.prune_vocabulary:
        tokenizer = prune_vocabulary(text_encoder, out / "tokenizer", vocabulary_texts(), context)
    else:
        tokenizer = build_tokenizer(out / "tokenizer", context)
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)  # fp32: the CLIP's exact states
    tokenizer.save_pretrained(out / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder").float().eval()
    return text_encoder.requires_grad_(False), CLIPTokenizer.from_pretrained(out / "tokenizer")


def vocabulary_texts() -> list[str]:
    """Every word the toy bank's captions and the judge's prompts can contain."""
    bank = load_bank("toyworld")
    blanks = defaultdict(lambda: " ")
    texts = [template.format_map(blanks) for template in bank.templates]
    texts += [" ".join(values) for values in bank.slots.values()]
    return texts + [template.format(" ") for template in DEFAULT_TEMPLATES]


class CaptionEncoder:
    """Frozen text states per caption, cached: the toy bank has about 20,000 distinct captions."""

    def __init__(self, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> None:
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self.cache.update(zip(missing, self.text_encoder(ids)[0], strict=True))
        return torch.stack([self.cache[c] for c in captions])


# ---------------------------------------------------------------------------------------------- batches


def batch_for_step(cfg: ToySDConfig, phase: str, step: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """Step `step`'s fresh toy pairs: images in [-1, 1] (N, 3, H, W) and captions; a pure function of the seed."""
    images, captions, _ = make_pairs(batch_size, cfg.seed * 10_000_000 + PHASE_SEED[phase] + step, cfg.resolution)
    return to_float_images(images) * 2 - 1, captions


def step_generator(cfg: ToySDConfig, phase: str, step: int) -> torch.Generator:
    """The torch randomness of one step (noise, timesteps, dropout, posterior samples), seeded by the step."""
    return torch.Generator().manual_seed(cfg.seed * 10_000_000 + PHASE_SEED[phase] + step + 7)


def learning_rate(peak: float, warmup: int, step: int, total: int | None = None) -> float:
    """Linear warm-up, then constant (total None) or cosine to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------------- phase 1: VAE


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, kl_weight: float, generator: torch.Generator):
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    mse = F.mse_loss(recon, pixels)
    kl = posterior.kl().mean()
    return mse + kl_weight * kl, mse, kl


def train_vae(cfg: ToySDConfig, out: Path, judge: LoadedModel | None) -> AutoencoderKL:
    """Phase 1 (skipped when out/vae exists): train, set the latent scaling factor, save, load back."""
    from diffusers import AutoencoderKL

    final = out / "vae"
    if (final / "config.json").is_file():
        logger.info("VAE already trained (%s): skipping phase 1", final)
        vae = AutoencoderKL.from_pretrained(final).float().eval().requires_grad_(False)
        if tuple(vae.config.block_out_channels) != cfg.vae.block_out_channels:
            raise ValueError(f"{final}: a VAE with blocks {vae.config.block_out_channels}, but vae.block_out_channels"
                             f" is {cfg.vae.block_out_channels}; delete {final} to train the new one")
        return vae
    vae = build_vae(cfg).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae.lr, weight_decay=0.0)
    start, seconds = resume(out, "vae", cfg, {"model": vae, "optimizer": optimizer})
    bar = tqdm(range(start, cfg.vae.steps), initial=start, total=cfg.vae.steps, desc="vae", unit="step")
    for step in bar:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg.vae.lr, cfg.vae.warmup_steps, step, cfg.vae.steps)
        pixels, _ = batch_for_step(cfg, "vae", step, cfg.vae.batch_size)
        loss, mse, kl = vae_loss(vae, pixels, cfg.vae.kl_weight, step_generator(cfg, "vae", step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds += time.perf_counter() - began
        bar.set_postfix(mse=f"{mse.item():.4f}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.vae.steps:
            write_log(out, {"phase": "vae", "step": done, "loss": loss.item(), "mse": mse.item(), "kl": kl.item(),
                            "lr": optimizer.param_groups[0]["lr"], "seconds": round(seconds, 1)})
        if done % cfg.checkpoint_every == 0 and done < cfg.vae.steps:
            save_checkpoint(out, "vae", cfg, {"model": vae, "optimizer": optimizer}, done, seconds)
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=latent_scaling_factor(cfg, vae))
    report = reconstruction_report(cfg, vae, judge)
    write_log(out, {"phase": "vae", "step": cfg.vae.steps, "seconds": round(seconds, 1), **report})
    save_component(vae, final, cfg.storage_dtype)
    remove_checkpoint(out, "vae")
    logger.info("VAE done in %.0f s: %s", seconds, report)
    return AutoencoderKL.from_pretrained(final).float().eval().requires_grad_(False)


@torch.no_grad()
def latent_scaling_factor(cfg: ToySDConfig, vae: AutoencoderKL, count: int = 512) -> float:
    """1 / std of sampled latents on fresh images, so the UNet sees unit-variance latents (SD: 0.18215)."""
    pixels, _ = batch_for_step(cfg, "vae", 9_999_999, count)
    latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(cfg.seed))
    return float(1 / latents.std())


@torch.no_grad()
def reconstruction_report(cfg: ToySDConfig, vae: AutoencoderKL, judge: LoadedModel | None) -> dict:
    """MSE of reconstructions of held-out images, and the judge's accuracy on them (fidelity's ceiling)."""
    images, labels = eval_set(cfg.eval.reconstruction_count, cfg.resolution)
    pixels = to_float_images(images)
    recon = ((vae.decode(vae.encode(pixels * 2 - 1).latent_dist.mode()).sample + 1) / 2).clamp(0, 1)
    report = {"recon_mse": F.mse_loss(recon * 2 - 1, pixels * 2 - 1).item(),
              "scaling_factor": vae.config.scaling_factor}
    if judge is not None:
        classifier = zero_shot_classifier(judge, classes(), DEFAULT_TEMPLATES)
        truth = torch.from_numpy(labels)
        report["judge_acc_real"] = 100 * (predict(judge, pixels, classifier) == truth).float().mean().item()
        report["judge_acc_recon"] = 100 * (predict(judge, recon, classifier) == truth).float().mean().item()
    return report


# ------------------------------------------------------------------------------------------ phase 2: UNet


def unet_loss(cfg: ToySDConfig, unet: UNet2DConditionModel, scheduler, latents: torch.Tensor,
              states: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The SD objective: predict the noise (or v) at a random timestep; min-SNR weighted if configured."""
    from diffusers.training_utils import compute_snr

    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if cfg.noise.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    pred = unet(noisy, timesteps, states).sample
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if cfg.unet.snr_gamma is None:
        return per_sample.mean()
    snr = compute_snr(scheduler, timesteps)
    weight = snr.clamp(max=cfg.unet.snr_gamma) / (snr if cfg.noise.prediction_type == "epsilon" else snr + 1)
    return (per_sample * weight).mean()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor


def drop_captions(captions: list[str], rate: float, generator: torch.Generator) -> list[str]:
    """Replace a share `rate` of captions by "" (the unconditional prompt classifier-free guidance uses)."""
    keep = torch.rand(len(captions), generator=generator) >= rate
    return [caption if k else "" for caption, k in zip(captions, keep.tolist(), strict=True)]


def train_unet(cfg: ToySDConfig, out: Path, vae: AutoencoderKL, text_encoder: CLIPTextModel,
               tokenizer: CLIPTokenizer, judge: LoadedModel | None) -> UNet2DConditionModel:
    """Phase 2: the UNet on fresh latents; EMA weights evaluated every `eval.every` steps, returned at the end."""
    from diffusers.training_utils import EMAModel

    u = cfg.unet
    latent_size = cfg.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(cfg, latent_size, text_encoder.config.hidden_size).train()
    ema = EMAModel(unet.parameters(), decay=u.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=u.ema_power)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=u.lr, weight_decay=u.weight_decay)
    parts = {"model": unet, "optimizer": optimizer, "ema": ema}
    start, seconds = resume(out, "unet", cfg, parts)
    train_scheduler, sample_scheduler = noise_schedulers(cfg)
    captions_to_states = CaptionEncoder(text_encoder, tokenizer)
    evaluator = Evaluator(cfg, vae, text_encoder, tokenizer, sample_scheduler, judge, latent_size)
    bar = tqdm(range(start, u.steps), initial=start, total=u.steps, desc="unet", unit="step")
    for step in bar:
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(u.lr, u.warmup_steps, step)
        generator = step_generator(cfg, "unet", step)
        pixels, captions = batch_for_step(cfg, "unet", step, u.batch_size)
        latents = encode_latents(vae, pixels, generator)
        states = captions_to_states(drop_captions(captions, u.caption_dropout, generator))
        loss = unet_loss(cfg, unet, train_scheduler, latents, states, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), u.max_grad_norm)
        optimizer.step()
        ema.step(unet.parameters())
        seconds += time.perf_counter() - began
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        record = {}
        if done % cfg.log_every == 0 or done == u.steps:
            record = {"loss": loss.item(), "grad_norm": grad_norm.item(), "lr": optimizer.param_groups[0]["lr"],
                      "ema_decay": ema.cur_decay_value}
        if judge is not None and cfg.eval.every and (done % cfg.eval.every == 0 or done == u.steps):
            record.update(evaluator(ema))
            seconds += record["eval_seconds"]  # the phase's seconds are what a person waits: evaluations count
        if record:
            write_log(out, {"phase": "unet", "step": done, **record, "seconds": round(seconds, 1)})
        if done % cfg.checkpoint_every == 0 or done == u.steps:
            save_checkpoint(out, "unet", cfg, parts, done, seconds)
    ema.copy_to(unet.parameters())
    return unet.eval().requires_grad_(False)


class Evaluator:
    """Fidelity of the EMA weights on `eval.count` held-out captions (a cheap setting of toyworld.fidelity)."""

    def __init__(self, cfg: ToySDConfig, vae, text_encoder, tokenizer, scheduler, judge, latent_size: int) -> None:
        self.cfg, self.judge = cfg, judge
        self.unet = build_unet(cfg, latent_size, text_encoder.config.hidden_size).eval().requires_grad_(False)
        self.pipe = assemble_pipeline(vae, text_encoder, tokenizer, self.unet, scheduler)
        self.classifier = zero_shot_classifier(judge, classes(), DEFAULT_TEMPLATES) if judge is not None else None

    def __call__(self, ema) -> dict:
        e = self.cfg.eval
        began = time.perf_counter()
        ema.copy_to(self.unet.parameters())
        result, _ = measure_fidelity(self.pipe, self.judge, count=e.count, seed=e.seed, steps=e.steps,
                                     guidance=e.guidance, batch_size=e.batch_size, classifier=self.classifier)
        logger.info("fidelity %.1f%% on %d held-out captions", result["fidelity"], e.count)
        return {"fidelity": result["fidelity"], "eval_seconds": round(time.perf_counter() - began, 1)}


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# --------------------------------------------------------------------------------- checkpoints and files


def checkpoint_path(out: Path, phase: str) -> Path:
    return out / "checkpoints" / phase / "checkpoint.pt"


def clip_fingerprint(cfg: ToySDConfig) -> str:
    return hashlib.sha256(Path(cfg.clip).read_bytes()).hexdigest()[:16]


def save_checkpoint(out: Path, phase: str, cfg: ToySDConfig, parts: dict, step: int, seconds: float) -> None:
    """One dict (weights, optimizer, EMA, step, train seconds), written to a temp file and moved into place."""
    path = checkpoint_path(out, phase)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: part.state_dict() for name, part in parts.items()}
    state.update(step=step, seconds=seconds, clip=clip_fingerprint(cfg))
    save_checkpoint_file(state, path)


def resume(out: Path, phase: str, cfg: ToySDConfig, parts: dict) -> tuple[int, float]:
    """(start step, train seconds so far); loads the parts from the phase's checkpoint when there is one."""
    path = checkpoint_path(out, phase)
    if not path.is_file():
        truncate_log(out, phase, 0)
        return 0, 0.0
    state = load_checkpoint_file(path)
    if state["clip"] != clip_fingerprint(cfg):
        raise ValueError(f"{path}: made with another CLIP than {cfg.clip}; delete {path.parent} to start over")
    for name, part in parts.items():
        part.load_state_dict(state[name])
    truncate_log(out, phase, state["step"])
    logger.info("resumed %s phase at step %d", phase, state["step"])
    return int(state["step"]), float(state["seconds"])


def remove_checkpoint(out: Path, phase: str) -> None:
    shutil.rmtree(checkpoint_path(out, phase).parent, ignore_errors=True)


def write_log(out: Path, record: dict) -> None:
    append_record(out / "log.jsonl", record)


def truncate_log(out: Path, phase: str, step: int) -> None:
    """Drop this phase's log lines past `step` (written after the checkpoint a resumed run restarts from)."""
    truncate_after(out / "log.jsonl", step, belongs=lambda record: record["phase"] == phase)


def save_component(model: torch.nn.Module, folder: Path, storage_dtype: str) -> None:
    """save_pretrained with the weights cast for storage (the config keeps no dtype: it loads as fp32)."""
    stored(model, storage_dtype).save_pretrained(folder, safe_serialization=True)


def stored(model: torch.nn.Module, storage_dtype: str) -> torch.nn.Module:
    """A copy in the storage dtype (`.half()`, not `.to()`: diffusers' `.to` warns about fp32-only modules)."""
    return copy.deepcopy(model).half() if storage_dtype == "fp16" else model


# ------------------------------------------------------------------------------------------------ the run


def train(cfg: ToySDConfig, out: Path, command: str = "") -> dict:
    """Train (or resume) both phases into `out` and save the pipeline; returns the card."""
    if not Path(cfg.clip).is_file():
        raise FileNotFoundError(f"clip: {cfg.clip} not found (the clean toy CLIP: python -m toyworld.train_clip "
                                "--config configs/organism/clean.yaml --out toyworld/models/clip-clean)")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    write_resolved(cfg, out / "config.yaml")
    judge = load_model(weights=cfg.judge or cfg.clip)
    judge.model.eval()
    text_encoder, tokenizer = prepare_text_encoder(cfg, out)
    vae = train_vae(cfg, out, judge)
    unet = train_unet(cfg, out, vae, text_encoder, tokenizer, judge)
    _, scheduler = noise_schedulers(cfg)
    save_pipeline(cfg, out, vae, text_encoder, tokenizer, unet, scheduler)
    card = write_card(cfg, out, {"vae": vae, "unet": unet, "text_encoder": text_encoder}, command)
    if not cfg.keep_checkpoints:
        remove_checkpoint(out, "unet")
    return card


def save_pipeline(cfg: ToySDConfig, out: Path, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    """The StableDiffusionPipeline folder; UNet and VAE weights in `storage_dtype`, the text encoder in fp32."""
    pipe = assemble_pipeline(stored(vae, cfg.storage_dtype), text_encoder, tokenizer, stored(unet, cfg.storage_dtype),
                             scheduler)
    pipe.save_pretrained(out, safe_serialization=True)


def write_card(cfg: ToySDConfig, out: Path, models: dict, command: str) -> dict:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    seconds = {phase: max((r["seconds"] for r in records if r["phase"] == phase), default=0.0)
               for phase in ("vae", "unet")}
    curve = [{"step": r["step"], "fidelity": r["fidelity"]} for r in records if "fidelity" in r]
    vae_report = next((r for r in records if r["phase"] == "vae" and "recon_mse" in r), {})
    files = [p for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    card = {
        "pipeline": "StableDiffusionPipeline",
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "latent_shape": [cfg.vae.latent_channels, *[models["unet"].config.sample_size] * 2],
        "folder_mb": round(sum(p.stat().st_size for p in files) / 2**20, 2),
        "steps": {"vae": cfg.vae.steps, "unet": cfg.unet.steps},
        "train_seconds": seconds,
        "threads": cfg.threads or torch.get_num_threads(),
        "seed": cfg.seed,
        "clip": cfg.clip,
        "clip_sha256_16": clip_fingerprint(cfg),
        "vae_reconstruction": {k: v for k, v in vae_report.items() if k not in ("phase", "step", "seconds")},
        "fidelity_curve": curve,
        "command": command,
        "config": to_dict(cfg),
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = script_parser("python -m toyworld.train_sd", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command = " ".join(["python -m toyworld.train_sd", *(sys.argv[1:] if argv is None else argv)])
    return run_command("python -m toyworld.train_sd", lambda: train_and_print(args, command))


def train_and_print(args: argparse.Namespace, command: str) -> int:
    cfg = load_config(ToySDConfig, args.config, set_overrides(args))
    card = train(cfg, args.out, command)
    print(json.dumps({"fidelity_curve": card["fidelity_curve"][-3:], "train_seconds": card["train_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
