"""Generation throughput: our batched generator against a naive one-caption-at-a-time diffusers loop.

Same weights, captions, steps, guidance and size for all; images/s for each and their ratios. With --compile or
--channels-last (--optimized: both, and fp16), a third method runs the batched generator on a copy of the UNet
with those levers, so the naive eager loop, the eager batched loop and the optimized one are timed in one run.

    python -m bench.generation                          # CPU, the tiny pipeline (seconds)
    python -m bench.generation --sd15-architecture      # GPU: SD 1.5's UNet/VAE/text encoder, random
                                                        # weights, fp16, 512x512, 25 steps; + UNet TFLOP/s
    python -m bench.generation --sd15-architecture --optimized   # + compile, channels_last (GPU)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from generation.config import GenerateConfig
from generation.images import generate_batch, image_seed
from generation.pipeline import (
    load_pipeline,
    prepare_pipeline,
    resolve_device,
    resolve_dtype,
    settings_for_device,
)
from generation.run import caption_list
from generation.tiny_pipeline import build_tiny_pipeline
from parclean.clip_bpe import build_clip_tokenizer


def build_sd15_architecture(device: torch.device, dtype: torch.dtype, tokenizer_dir: Path):
    """SD 1.5's components built from their configs with random weights (no download), on `device`."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(tokenizer_dir), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.to(device, dtype)


def optimized_copy(pipe, cfg: GenerateConfig, device: torch.device):
    """The same pipeline around a copy of its UNet, with cfg's channels_last and compile applied to the copy only
    (compile works in place, so the eager pipeline keeps an untouched UNet)."""
    components = {**pipe.components, "unet": copy.deepcopy(pipe.unet)}
    if "requires_safety_checker" in pipe.config:
        components["requires_safety_checker"] = False
    return prepare_pipeline(type(pipe)(**components), cfg, device)


def unet_flops_per_image(pipe, cfg: GenerateConfig) -> float:
    """FLOPs the UNet spends on one image over all steps (both guidance branches), counted on one call."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    scale = pipe.vae_scale_factor
    height = cfg.height or pipe.unet.config.sample_size * scale
    width = cfg.width or pipe.unet.config.sample_size * scale
    branches = 2 if cfg.guidance > 1 else 1
    rows = branches * cfg.batch_size
    shape = (rows, pipe.unet.config.in_channels, height // scale, width // scale)
    latents = torch.randn(shape, device=device, dtype=dtype)
    context = torch.randn(rows, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        pipe.unet(latents, torch.tensor(500, device=device), encoder_hidden_states=context)
    return counter.get_total_flops() * cfg.steps / cfg.batch_size


def time_batched(pipe, cfg: GenerateConfig, texts: list[str], seeds: list[int]) -> float:
    start = _now(pipe)
    for first in range(0, len(texts), cfg.batch_size):
        generate_batch(pipe, texts[first : first + cfg.batch_size], seeds[first : first + cfg.batch_size], cfg)
    return _now(pipe) - start


def time_naive(pipe, cfg: GenerateConfig, texts: list[str], seeds: list[int]) -> float:
    """What a first script does: pipe(prompt) per caption, a seeded generator each."""
    start = _now(pipe)
    for text, seed in zip(texts, seeds, strict=True):
        pipe(
            text, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance, height=cfg.height,
            width=cfg.width, generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
    return _now(pipe) - start


def _now(pipe) -> float:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return time.perf_counter()


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd15-architecture", action="store_true", help="SD 1.5-sized random model (GPU)")
    parser.add_argument("--images", type=int, help="images per method (default 64 tiny, 32 SD 1.5)")
    parser.add_argument("--batch-size", type=int, help="default 16")
    parser.add_argument("--steps", type=int, help="default 10 tiny, 25 SD 1.5")
    parser.add_argument("--size", type=int, help="image size in px (default 32 tiny, 512 SD 1.5)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (optimized method)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last UNet (optimized method)")
    parser.add_argument("--optimized", action="store_true", help="--compile --channels-last --dtype fp16")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best one counts)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the card's dense fp16 peak (H100 SXM)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.optimized:
        args.compile, args.channels_last, args.dtype = True, True, "fp16"
    big = args.sd15_architecture
    size = args.size or (512 if big else 32)
    with tempfile.TemporaryDirectory() as tmp:
        asked = GenerateConfig(
            model=str(Path(tmp) / "tiny-sd"), bank="general" if big else "toyworld",
            num_samples=args.images or (32 if big else 64), batch_size=args.batch_size or 16,
            steps=args.steps or (25 if big else 10), guidance=7.5, height=size, width=size,
            scheduler="DDIMScheduler", device=args.device, dtype=args.dtype, compile=args.compile,
            channels_last=args.channels_last,
        )
        device = resolve_device(asked.device)
        cfg = settings_for_device(asked, device)  # the GPU levers on a CPU: fp32, no compile (logged)
        eager = dataclasses.replace(cfg, compile=False, channels_last=False)
        if big:
            pipe = build_sd15_architecture(device, resolve_dtype(cfg.dtype, device), Path(tmp) / "tokenizer")
            pipe = prepare_pipeline(pipe, eager, device)
        else:
            build_tiny_pipeline(cfg.model, sample_size=size)
            pipe = load_pipeline(eager)
        fast = optimized_copy(pipe, cfg, device) if (cfg.compile or cfg.channels_last) else None
        rates = measure(pipe, fast, cfg, args.repeats)
        flops = unet_flops_per_image(pipe, cfg)

    label = "SD 1.5 architecture (random weights)" if big else "tiny SD (random weights)"
    print(f"model: {label}, {size}x{size}, {cfg.steps} steps, guidance {cfg.guidance}, {pipe.unet.dtype}")
    print(f"machine: {machine(device)}")
    if cfg != asked:
        print(f"asked for dtype {asked.dtype}, compile {asked.compile}; on the CPU: dtype {cfg.dtype}, compile off")
    print(f"images: {cfg.num_samples} per method and run, best of {args.repeats} runs, batch size {cfg.batch_size}")
    print(f"naive (pipe(prompt) per caption, eager): {rates['naive']:.2f} images/s")
    print(f"batched (parclean, eager): {rates['batched']:.2f} images/s, {rates['batched'] / rates['naive']:.2f}x naive")
    if "optimized" in rates:
        print(f"batched (parclean, compile {cfg.compile}, channels_last {cfg.channels_last}): "
              f"{rates['optimized']:.2f} images/s, {rates['optimized'] / rates['naive']:.2f}x naive, "
              f"{rates['optimized'] / rates['batched']:.2f}x eager batched")
    for method in ("batched", "optimized"):
        if method in rates:
            achieved = flops * rates[method] / 1e12
            line = f"UNet ({method}): {flops / 1e9:.2f} GFLOP per image, {achieved:.3f} TFLOP/s"
            if device.type == "cuda":
                line += f" ({100 * achieved / args.peak_tflops:.1f}% of {args.peak_tflops:g} TFLOP/s peak)"
            print(line)


def measure(pipe, fast, cfg: GenerateConfig, repeats: int) -> dict[str, float]:
    """Best images/s of each method over `repeats` interleaved runs, after a warm-up of each."""
    captions = caption_list(cfg)
    texts = [caption.text for caption in captions]
    seeds = [image_seed(cfg.seed, caption.index) for caption in captions]
    methods = {"naive": lambda n: time_naive(pipe, cfg, texts[:n], seeds[:n]),
               "batched": lambda n: time_batched(pipe, cfg, texts[:n], seeds[:n])}
    if fast is not None:
        methods["optimized"] = lambda n: time_batched(fast, cfg, texts[:n], seeds[:n])
    # Warm-up: compile and kernel selection happen here, for the full batch and the run's short last batch.
    warm = {"naive": 2, "batched": cfg.batch_size + len(texts) % cfg.batch_size}
    for name, run in methods.items():
        run(min(len(texts), warm.get(name, warm["batched"])))
    # Interleaved repeats, best of each: a shared machine's other jobs slow runs down, never speed them up.
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, run in methods.items():
            times[name].append(run(len(texts)))
    return {name: len(texts) / min(seconds) for name, seconds in times.items()}


if __name__ == "__main__":
    main()
