"""A tiny Stable Diffusion pipeline built from config (random weights), saved in the diffusers folder layout.

It loads through exactly the same `load_pipeline` path as SD 1.5, so tests and the CPU demo exercise the real
code. The tokenizer is the CLIP BPE that open_clip bundles, so no hub access is needed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from parclean.clip_bpe import CLIP_VOCAB_SIZE, MODEL_MAX_LENGTH, build_clip_tokenizer
from parclean.outputs import follow_umask

logger = logging.getLogger(__name__)


def build_tiny_pipeline(out_dir: str | Path, *, seed: int = 0, sample_size: int = 32) -> Path:
    """Build a randomly initialised tiny StableDiffusionPipeline making `sample_size` px images; save it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if sample_size < 16 or sample_size % 16:
        raise ValueError(f"sample_size={sample_size}: must be a multiple of 16 (the VAE downsamples by 4)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        sample_size=sample_size,
    )
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=sample_size // scale,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MODEL_MAX_LENGTH,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    tokenizer = build_clip_tokenizer(out_dir / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # vocab.json and merges.txt stay beside tokenizer.json, for transformers 4's slow CLIPTokenizer.
    pipe.save_pretrained(out_dir, safe_serialization=True)
    follow_umask(out_dir)
    sizes = {part: sum(p.numel() for p in getattr(pipe, part).parameters()) for part in ("unet", "vae", "text_encoder")}
    logger.info("tiny pipeline (%s parameters) saved to %s", sizes, out_dir)
    return out_dir
